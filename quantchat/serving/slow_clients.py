"""Slow clients (slowloris): a connection must send its request headers within ``HEADER_TIMEOUT_S``.

uvicorn closes idle keep-alive connections, but not one that connects and sends nothing, or dribbles a
header a byte at a time: enough of those hold every connection the server has. ``HeaderTimeoutProtocol``
(uvicorn's httptools protocol) starts a timer when a connection opens and when a request begins, stops
it when the headers are complete, and closes the connection when it fires. Slow bodies are
``middleware.BodyLimit``'s (408 after ``timeout_s`` without a body chunk).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def _arm(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        t = getattr(self, "_header_timer", None)
        if t is not None:
            t.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        self.logger.info("closing a connection that sent no complete request header in %.0f s",
                         self.header_timeout_s)
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle keep-alive connections are uvicorn's (timeout_keep_alive)


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class with its own header timeout (uvicorn takes a class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": float(seconds)})
