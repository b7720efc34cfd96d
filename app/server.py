"""The process around the app: uvicorn, with a time limit on every phase of a connection, a
shutdown that answers every client, and an exit status that says how it ended.

Phases and their settings: the request headers (``header_timeout_s``, here), the body
(``body_timeout_s`` and the request's deadline, app/routes.py), an idle keep-alive connection
(``keep_alive_s``, uvicorn's own timer). On SIGTERM or SIGINT: the service stops taking work (new
requests get 503 ``shutting_down`` with ``Connection: close``) while the port stays open for
``shutdown_grace_s``; then the port closes, idle connections are closed, accepted requests are
answered, the batcher drains, and the process exits 0. It exits 1 when the model fails to load
(a supervisor restarts it or reports it; /readyz says why meanwhile) or when the drain ran out of
time."""
import asyncio
import contextlib
import logging
import math
import signal
from typing import Callable, Iterator, List, Optional

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import Settings
from .service import Service

log = logging.getLogger("halo.server")

REQUEST_TIMEOUT_BODY = b'{"error": {"code": "header_timeout", "message": "the request headers did not arrive in time"}}'


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for the request headers: they must arrive in
    full within ``header_timeout_s`` of the connection opening or of its previous answer, else the
    connection is closed (with a 408 when the request had begun). uvicorn times only idle
    keep-alive connections, and any byte received stops that timer: a client sending its headers a
    byte a second, or nothing at all after connecting, held a connection open for ever. And while
    the server shuts down, every answer closes its connection."""

    header_timeout_s: float = 10.0
    shutting_down: Callable[[], bool] = staticmethod(lambda: False)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._request_begun = False
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.shutting_down() and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle, waiting for its next request (none pipelined)
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._request_begun = False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(b"".join([
                STATUS_LINE[408], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(REQUEST_TIMEOUT_BODY), b"connection: close\r\n\r\n",
                REQUEST_TIMEOUT_BODY]))
        self.transport.close()


class HaloServer(uvicorn.Server):
    """uvicorn's server with the shutdown sequence and exit status described above."""

    def __init__(self, app: FastAPI, settings: Settings):
        protocol = type("TimedHttpProtocol", (TimedHttpProtocol,), {
            "header_timeout_s": settings.header_timeout_s,
            "shutting_down": staticmethod(lambda: self.should_exit)})
        super().__init__(uvicorn.Config(
            app, host=settings.host, port=settings.port, http=protocol, lifespan="on",
            log_level=settings.log_level, access_log=False, timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=math.ceil(settings.drain_seconds)))
        self.fastapi_app, self.settings = app, settings
        self.exit_code = 0

    @property
    def service(self) -> Optional[Service]:
        return getattr(self.fastapi_app.state, "service", None)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT start the graceful shutdown. Unlike uvicorn's own handling, the signal
        is not raised again once it is done: a clean drain is a clean exit (status 0, not 143)."""
        handled: List[int] = [signal.SIGTERM, signal.SIGINT]
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        service = self.service
        if service is not None and service.load_error is not None:
            log.error("exiting: %s", service.not_ready_reason())
            self.exit_code = 1
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        service = self.service
        if service is not None and service.load_error is None:
            service.stop_accepting()
            # The port stays open a moment, answering 503: a client that connected just after the
            # signal gets an answer, where a closing listener would reset its connection.
            await asyncio.sleep(self.settings.shutdown_grace_s)
        await super().shutdown(sockets)
        if service is not None and not service.drained:
            self.exit_code = 1


def serve(settings: Settings, app: FastAPI) -> int:
    """Run until shut down; the process's exit status."""
    server = HaloServer(app, settings)
    server.run()
    return server.exit_code
