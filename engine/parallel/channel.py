"""One rank's control socket: ordered, authenticated messages both ways (multiprocessing's
`Connection` over TCP, HMAC-challenged with the group's key), so it works across hosts.

Sends never block their caller: an outbox thread writes them in order, after an optional
`ready()` wait (a CUDA event, for frames copied to the host asynchronously). The outbox is
unbounded by design: a rank that stops reading is declared hung by the server's heartbeat check
within `rank_timeout_s` and the whole group is replaced, which bounds what can pile up. Receives
take a timeout. A closed peer reads as `ChannelClosed`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

log = logging.getLogger(__name__)

KEY_ENV = "AVATAR_GROUP_KEY"  # hex; the group's shared secret when torchrun starts the ranks
_MARK = object()  # an outbox entry that is not sent (flush)


class ChannelClosed(ConnectionError):
    """The other end went away (its process died, or it closed the socket)."""


class Channel:
    """A `Connection` with an outbox thread for sends and timeouts on receives.

    `send_when(make)` queues a message that is made on the writer thread, in order with the
    others: `make` may wait (for a decode, a CUDA event) without holding up its caller. An
    exception from `make` goes to `on_error` (a rank then reports it and exits).
    """

    def __init__(self, conn: Connection, name: str,
                 on_error: Callable[[BaseException], None] | None = None):
        self.conn = conn
        self.name = name
        self.on_error = on_error
        self._outbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write, name=f"{name}-send", daemon=True)
        self._writer.start()
        self.closed = threading.Event()

    def send(self, message: Any) -> None:
        self.send_when(lambda: message)

    def send_when(self, make: Callable[[], Any]) -> None:
        if not self.closed.is_set():
            self._outbox.put(make)

    def _write(self) -> None:
        while True:
            make = self._outbox.get()
            if make is None:
                return
            try:
                message = make()
            except Exception as exc:
                log.exception("%s: making a message failed", self.name)
                if self.on_error is not None:
                    self.on_error(exc)
                continue
            if message is _MARK:
                continue
            try:
                self.conn.send(message)
            except (OSError, EOFError, ValueError) as exc:
                log.debug("%s: send failed: %s", self.name, exc)
                self.closed.set()
                return

    def recv(self, timeout: float | None = None) -> Any | None:
        """The next message, or None when none came within `timeout` seconds."""
        try:
            if timeout is not None and not self.conn.poll(timeout):
                return None
            return self.conn.recv()
        except (OSError, EOFError) as exc:
            self.closed.set()
            raise ChannelClosed(f"{self.name}: the other end closed ({exc or 'EOF'})") from None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written (or the writer gave up)."""
        done = threading.Event()

        def mark() -> object:
            done.set()
            return _MARK

        self.send_when(mark)
        done.wait(timeout)

    def close(self) -> None:
        self.closed.set()
        self._outbox.put(None)
        try:
            self.conn.close()
        except OSError:
            pass


def connect(address: tuple[str, int], key: bytes, name: str) -> Channel:
    return Channel(Client(address, family="AF_INET", authkey=key), name)


def listen(host: str, port: int, key: bytes) -> Listener:
    """The server's listener for its ranks' control sockets (port 0: any free port)."""
    return Listener((host, port), family="AF_INET", authkey=key, backlog=64)
