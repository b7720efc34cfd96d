"""A local package index for the image builds: every wheel the project's Dockerfiles install, for
the images' Python (CPython 3.11 on x86_64 Linux), fetched by ``pip download`` while the network is
there and served afterwards as a PEP 503 simple index, as a company mirror would serve them."""
import hashlib
import html
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import List

from tests.dockerfiles import ROOT, pinned_requirements

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.loadtest"]
# The stand-in base image's Python and platform (Debian bookworm: glibc 2.36).
TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
          *[arg for glibc in range(36, 16, -1) for arg in ("--platform", f"manylinux_2_{glibc}_x86_64")],
          "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]


def requirements() -> List[str]:
    """What the images' ``pip install`` lines need: their pins, the project's dependencies, and its
    build backend (``pip install .`` builds the project in an isolated environment)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [pin for dockerfile in DOCKERFILES for pin in pinned_requirements(dockerfile)]
    return pins + project["project"]["dependencies"] + project["build-system"]["requires"]


def wheelhouse(cache: Path) -> Path:
    """The wheels with their simple index (``<folder>/simple``), made once per requirement list."""
    wanted = requirements()
    key = hashlib.sha256("\n".join(wanted + TARGET).encode()).hexdigest()[:12]
    folder = cache / f"wheelhouse-{key}"
    if (folder / "simple").is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--dest", str(partial), *TARGET, *wanted],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    write_simple_index(partial)
    partial.rename(folder)
    return folder


def write_simple_index(folder: Path) -> None:
    """``simple/<project>/index.html`` with a link to each of its wheels (PEP 503 names)."""
    projects = {}
    for wheel in sorted(folder.glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        projects.setdefault(name, []).append(wheel.name)
    for name, files in projects.items():
        (folder / "simple" / name).mkdir(parents=True)
        links = "".join(f'<a href="../../{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
        (folder / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
