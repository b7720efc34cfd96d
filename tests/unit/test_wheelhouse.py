"""The compose end-to-end test's package index (tests/docker/wheelhouse.py), without downloading."""
from pathlib import Path

from tests.docker.wheelhouse import requirements, write_simple_index


def test_requirements_cover_every_image_install_and_the_build_backend() -> None:
    wanted = requirements()
    for needed in ("torch==2.14.1", "torchvision==0.29.1", "locust==2.47.0", "fastapi", "uvicorn[standard]"):
        assert needed in wanted, needed
    assert any(r.startswith("setuptools") for r in wanted)  # `pip install .` builds the project


def test_simple_index_links_each_wheel_under_its_normalized_name(tmp_path: Path) -> None:
    for name in ("Pillow-13.0.0-cp311-cp311-manylinux_2_28_x86_64.whl", "zope.interface-8.0-cp311-cp311-x.whl",
                 "typing_extensions-4.15.0-py3-none-any.whl", "typing_extensions-4.14.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    write_simple_index(tmp_path)
    assert sorted(p.name for p in (tmp_path / "simple").iterdir()) == ["pillow", "typing-extensions", "zope-interface"]
    page = (tmp_path / "simple" / "typing-extensions" / "index.html").read_text()
    assert page.count('href="../../typing_extensions-4.1') == 2
