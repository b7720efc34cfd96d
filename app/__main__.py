"""``python -m app [--host H] [--port P]``: serve the configured model (app/server.py); the exit
status says how it ended (0: a clean shutdown). ``python -m app --prepare``: load the model as the
service would, compiling it into ``HALO_COMPILE_CACHE`` where ``HALO_COMPILE`` asks for it, and
exit: an image's build step, so that its containers start with a warm cache."""
import argparse
import logging
import sys

from .config import Settings
from .engine import Engine
from .main import create_app
from .server import serve


def main() -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(description="HaloNet inference service (settings: HALO_* variables)")
    parser.add_argument("--host", default=settings.host, help="default: HALO_HOST or 0.0.0.0")
    parser.add_argument("--port", type=int, default=settings.port, help="default: HALO_PORT or 8000")
    parser.add_argument("--prepare", action="store_true",
                        help="load (and with HALO_COMPILE, compile) the model, then exit without serving")
    args = parser.parse_args()
    settings = settings.model_copy(update=dict(host=args.host, port=args.port))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.prepare:
        engine = Engine(settings)
        print(f"{engine.name} on {engine.device}: forwards run {engine.execution}")
        return 0
    return serve(settings, create_app(settings))


if __name__ == "__main__":
    sys.exit(main())
