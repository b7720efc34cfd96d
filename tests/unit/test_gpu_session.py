"""benchmarks/gpu_session.sh's flow with stand-ins for python and nvidia-smi (no GPU needed): every step
runs and is logged even after one fails, the wheels go on PYTHONPATH, the exit status and last line name
the failures; and benchmarks/offline_wheels.py's choice of the wheels to install."""
import os
import subprocess
from pathlib import Path

from benchmarks.offline_wheels import missing_wheels
from benchmarks.server import ROOT

# A python that runs nothing: it prints what it was asked and PYTHONPATH, and fails the attention benchmark.
STAND_IN_PYTHON = """#!/bin/sh
echo "asked: $* PYTHONPATH=${PYTHONPATH:-}"
case "$*" in *benchmarks.attention*) exit 3;; esac
"""


def stand_in(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_every_step_runs_and_the_failed_ones_are_named(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "nvidia-smi", "#!/bin/sh\necho 'GPU 0: stand-in'\n")
    python = stand_in(bin_dir, "python", STAND_IN_PYTHON)
    out = tmp_path / "out"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(python), "WHEELS": str(wheels),
           "SITE": str(tmp_path / "site")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "== failed: attention"
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [(name, status) for name, status, _ in rows] == [
        ("nvidia-smi", "0"), ("wheels", "0"), ("versions", "0"), ("kernel-tests", "0"), ("attention", "3"),
        ("model", "0"), ("service", "0")]
    assert f"-m benchmarks.offline_wheels {wheels} " in (out / "wheels.log").read_text()
    service = (out / "service.log").read_text()  # after the wheels: their folder on PYTHONPATH
    assert f"--json {out}/service.json" in service and f"PYTHONPATH={tmp_path / 'site'}" in service
    assert "tests/unit/test_triton_kernel.py" in (out / "kernel-tests.log").read_text()


def test_only_the_wheels_of_missing_distributions_are_installed(tmp_path: Path) -> None:
    for name in ("numpy-1.0-cp312-cp312-manylinux_2_17_x86_64.whl",  # installed here
                 "typing_extensions-9.9-py3-none-any.whl",  # installed as typing-extensions: names normalized
                 "no_such_distribution_here-1.0-py3-none-any.whl"):
        (tmp_path / name).touch()
    assert [w.name for w in missing_wheels(tmp_path)] == ["no_such_distribution_here-1.0-py3-none-any.whl"]
