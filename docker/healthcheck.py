"""``python healthcheck.py /healthz|/readyz``: exit 0 when the service in this container answers 200 there,
1 otherwise. The images' HEALTHCHECK (alive: /healthz) and compose's (ready: /readyz) both run it. Standard
library only, so that it runs in any image with the service's Python, and on the port the service listens
on (HALO_PORT, as app/config.py reads it)."""
import os
import sys
import urllib.request

# Below the healthchecks' own timeout (3 s): a hung service is reported unhealthy, not timed out.
TIMEOUT_S = 2


def healthy(path: str) -> bool:
    url = f"http://127.0.0.1:{os.environ.get('HALO_PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy(sys.argv[1]) else 1)
