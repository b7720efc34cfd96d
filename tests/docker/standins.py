"""Local stand-ins for the upstream base images, made from Debian's packages: this machine reaches
Debian's mirror but not Docker Hub. One bookworm root holds what every image the project names
needs, and is imported once per tag with that image's own settings (PATH, CMD, STOPSIGNAL)."""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

SUITE = "bookworm"
# python:3.11-slim-bookworm: Debian's Python 3.11 (with headers: the CPU kernel compiles against
# them), pip, and the g++ the Dockerfile installs (found installed, so its apt-get needs no
# network); passwd for useradd. nginx:1.27-alpine: nginx, and the wget its healthcheck runs.
PACKAGES = ["python3", "python3-venv", "python3-pip", "python3-dev", "g++", "ca-certificates", "passwd",
            "nginx-light", "wget"]
# The official images' settings that the project relies on.
IMAGES: Dict[str, List[str]] = {
    "python:3.11-slim-bookworm": [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["python3"]'],
    "nginx:1.27-alpine": [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "STOPSIGNAL SIGQUIT",
        'CMD ["nginx", "-g", "daemon off;"]'],
}


def apt_mirror() -> Optional[str]:
    """The Debian mirror this machine's apt uses for SUITE (None: debootstrap's default)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.sources")), *sorted(sources.glob("*.list"))]:
        text = path.read_text() if path.is_file() else ""
        for stanza in text.split("\n\n"):  # deb822: "URIs: ..." and "Suites: ..." fields
            fields = dict(re.findall(r"^(\w+):\s*(.+)$", stanza, flags=re.M))
            if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
        for uri, suite in re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, flags=re.M):
            if suite == SUITE:
                return uri
    return None


def root_archive(cache: Path) -> Path:
    """A tar of the stand-in root, made by debootstrap once per package list (about 2 minutes)."""
    mirror = apt_mirror()
    key = hashlib.sha256(" ".join([SUITE, str(mirror), *PACKAGES]).encode()).hexdigest()[:12]
    archive = cache / f"standin-{SUITE}-{key}.tar"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=cache, prefix="standin-root-"))
    try:
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root)]
        subprocess.run(command + ([mirror] if mirror else []), check=True, stdout=subprocess.DEVNULL)
        finish_root(root)
        partial = archive.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(archive)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return archive


def finish_root(root: Path) -> None:
    """What the official Python image has and debootstrap does not: python and pip on PATH, pip
    free to install system-wide; and no apt sources, so nothing in a build can reach a mirror."""
    for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        os.symlink(target, root / "usr" / "local" / "bin" / name)
    (root / "usr" / "lib" / "python3.11" / "EXTERNALLY-MANAGED").unlink()
    (root / "etc" / "apt" / "sources.list").unlink()
    shutil.rmtree(root / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()


def import_images(archive: Path, docker: Callable[..., subprocess.CompletedProcess]) -> None:
    """``docker import`` the root once, then give it each tag the project's Dockerfiles and compose
    file name, with that image's settings (a build of metadata only: no step runs)."""
    docker("import", str(archive), "halonet-e2e/standin-root")
    for tag, settings in IMAGES.items():
        docker("build", "--tag", tag, "-", input="\n".join(["FROM halonet-e2e/standin-root", *settings]))
