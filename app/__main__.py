"""``python -m app [--host H] [--port P]``: serve the configured model with uvicorn."""
import argparse
import math
import logging

import uvicorn

from .config import Settings
from .main import create_app


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description="HaloNet inference service (settings: HALO_* variables)")
    parser.add_argument("--host", default=settings.host, help="default: HALO_HOST or 0.0.0.0")
    parser.add_argument("--port", type=int, default=settings.port, help="default: HALO_PORT or 8000")
    args = parser.parse_args()
    settings = settings.model_copy(update=dict(host=args.host, port=args.port))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=math.ceil(settings.drain_seconds))


if __name__ == "__main__":
    main()
