"""Build the C++ CPU kernel ahead of its first use: ``python -m model.attention.build``.

``make install`` and the CPU Docker image run it, so that no service start or first request
pays for the compilation. Exits 1, saying why, when the kernel cannot be built.
"""
import sys

from . import cpp

if __name__ == "__main__":
    failure = cpp.load()
    if failure:
        print(f"C++ halo attention kernel not built: {failure}", file=sys.stderr)
        sys.exit(1)
    print("C++ halo attention kernel ready")
