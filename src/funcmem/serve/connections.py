"""Connections that cannot hold the server: a deadline to send a whole request, and a cap on open
connections that drops the laziest first (uvicorn's h11 protocol, extended).

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a fresh connection
that sends nothing, or sends a header byte every few seconds, or a body at a trickle, is kept
forever; enough of them exhaust file handles and nobody else gets in ("slowloris"). Here:

- **read deadline**: from the moment a connection owes a request (it opened, or its previous
  response went out) the whole request, headers and body, must arrive within ``read_timeout``
  seconds, or the connection is closed. Time spent computing the answer does not count.
- **connection cap**: when a new connection would make more than ``max_connections``, the
  connection that has owed its request the longest is closed to make room (a slow or silent
  client, never one whose request is being answered); if every connection is busy being
  answered, the new one is closed at once. File handles stay bounded, and a real client, which
  sends its request at once, gets in.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(read_timeout: float = 20.0, max_connections: int = 256) -> type[H11Protocol]:
    """An ``H11Protocol`` class with the read deadline and connection cap (for ``uvicorn.Config(http=...)``)."""
    if read_timeout <= 0 or max_connections < 1:
        raise ValueError(f"need read_timeout > 0 and max_connections >= 1, got {read_timeout}, {max_connections}")
    owing: dict[H11Protocol, None] = {}  # connections that owe a request, oldest first (one event loop)

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            if len(self.connections) > max_connections:
                victim = next(iter(owing), None)
                if victim is None:  # every other connection is being answered: no room
                    self._drop()
                    return
                victim._drop()
            self._owe()

        def _owe(self) -> None:
            """A request is owed from now: start its deadline."""
            owing.pop(self, None)
            owing[self] = None
            self._cancel()
            self._deadline = self.loop.call_later(read_timeout, self._drop)
            self._awaited = self.cycle  # the cycle before the owed request's

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _drop(self) -> None:
            owing.pop(self, None)
            self._cancel()
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if self in owing and cycle is not None and cycle is not self._awaited and not cycle.more_body:
                owing.pop(self, None)  # the whole request is in
                self._cancel()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._owe()  # before super(): it may process a pipelined request at once
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            owing.pop(self, None)
            self._cancel()
            super().connection_lost(exc)

    GuardedH11Protocol.owing = owing  # for tests
    return GuardedH11Protocol
