"""Reading the project's Dockerfiles and .dockerignore as Docker does, for the tests that check them."""
import fnmatch
import re
from pathlib import Path, PurePosixPath
from typing import List, Tuple

from benchmarks.server import ROOT

# What the images' HEALTHCHECK and compose's healthcheck run.
HEALTHCHECK_SCRIPT = "docker/healthcheck.py"


def copy_instructions(dockerfile: Path) -> List[Tuple[List[str], str]]:
    """Each COPY line's (project paths taken from the build context, destination in the image)."""
    instructions = []
    for line in re.findall(r"^COPY (.+)$", dockerfile.read_text(), flags=re.M):
        *sources, destination = line.split()
        instructions.append((sources, destination))
    return instructions


def image_path(dockerfile: Path, source: str) -> str:
    """Where the Dockerfile's COPY puts the project file ``source`` in the image: relative
    destinations start at its WORKDIR, and one ending in / is a folder."""
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile.read_text(), flags=re.M)[1]
    destination = next(destination for sources, destination in copy_instructions(dockerfile) if source in sources)
    path = PurePosixPath(workdir, destination)
    return str(path / PurePosixPath(source).name if destination.endswith("/") else path)


def docker_ignored(path: str) -> bool:
    """.dockerignore's rule: the last pattern that matches the path or a folder above it decides,
    and a ``!`` pattern takes the path back in."""
    parts = path.split("/")
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def pinned_requirements(dockerfile: Path) -> List[str]:
    """The ``name==version`` requirements its ``pip install`` lines name."""
    return re.findall(r"(?<![\w.-])[A-Za-z0-9][\w.-]*==[\w.+!-]+", "\n".join(
        line for line in dockerfile.read_text().splitlines() if "pip install" in line))
