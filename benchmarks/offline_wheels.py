"""Install the wheels of a folder (``make gpu-wheels``) whose distributions this python lacks into a
folder to put on PYTHONPATH, offline: for a machine's own python that has torch but not the
service's web stack (benchmarks/gpu_session.sh, WHEELS=...).

Each wheel is installed as it is (no index, no dependency resolution: what it needs is in the folder
or already here), and never one of a package this python already has, so that nothing torch or the
machine's other packages were installed with is shadowed by another version.

    python -m benchmarks.offline_wheels gpu-wheels /tmp/halo-site
"""
import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import List


def missing_wheels(folder: Path) -> List[Path]:
    """The wheels in ``folder`` whose distribution this python does not have."""
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        try:
            metadata.version(wheel.name.split("-")[0])  # the name as the wheel spells it; lookups normalize it
        except metadata.PackageNotFoundError:
            missing.append(wheel)
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="folder of wheels")
    parser.add_argument("target", type=Path, help="folder to install into (for PYTHONPATH)")
    args = parser.parse_args()
    wheels = missing_wheels(args.wheels)
    print(f"installing {len(wheels)} wheels into {args.target}: {', '.join(w.name for w in wheels) or 'none'}")
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                        "--target", str(args.target), *map(str, wheels)], check=True)


if __name__ == "__main__":
    main()
