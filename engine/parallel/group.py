"""The server's side of one GPU group: its rank processes, their control sockets, and the watch
for a rank that dies or hangs.

`RankGroup.start` spawns the ranks through `torch.multiprocessing` (spawn; one host, one GPU
each) or waits for ranks that torchrun started on any number of hosts to join the server's
listener (`engine.parallel.entry`); sends each its `Setup` (the group's TCPStore, hosted here,
in spawn mode; torchrun's rendezvous otherwise); and waits until every rank is `Ready`. From then
on one monitor thread reads every rank's messages and watches:

- a rank process that exits (its sentinel, spawn mode) or a control socket that closes: at once;
- a rank that sends nothing, not even its heartbeat, for `rank_timeout_s`: hung;
- a rank that reports a fatal error (`Failed` without a session).

Any of these calls `on_down(reason)` once; the engine then fails what was in flight and replaces
the group (`kill` then a new `RankGroup`). Nothing here blocks on a rank: sends go to each
channel's outbox, receives are polled.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Listener
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from engine.config import EngineConfig
from engine.errors import EngineError
from engine.parallel import messages as msg
from engine.parallel.channel import Channel, ChannelClosed
from engine.parallel.entry import RankSpec, no_multicast, spawned
from engine.parallel.layout import Layout
from engine.progress import ProgressFn

log = logging.getLogger(__name__)

POLL_S = 0.1
KILL_GRACE_S = 2.0


class Acceptor:
    """Accepts ranks' control connections for the engine's whole life (a torchrun group that
    restarts joins again on the same address); each `Join` lands in `joins`."""

    def __init__(self, listener: Listener):
        self.listener = listener
        self.joins: queue.Queue[tuple[msg.Join, Channel]] = queue.Queue()
        self._closed = False
        threading.Thread(target=self._accept, name="group-accept", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.address
        return str(host), int(port)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                log.warning("group listener: a connection failed to authenticate or broke")
                continue
            except Exception as exc:  # AuthenticationError is not an OSError
                log.warning("group listener: refused a connection: %s", exc)
                continue
            channel = Channel(conn, "joining rank")
            try:
                join = channel.recv(timeout=30.0)
            except ChannelClosed:
                continue
            if isinstance(join, msg.Join):
                channel.name = f"rank{join.rank}"
                self.joins.put((join, channel))
            else:
                channel.close()

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.close()
        except OSError:
            pass


class RankGroup:
    """One generation of the group (see the module docstring)."""

    def __init__(self, config: EngineConfig, layout: Layout, stream: Any, acceptor: Acceptor,
                 key: bytes, on_message: Callable[[int, Any], None],
                 on_down: Callable[[str], None], spawn: bool, threads: int):
        self.config = config
        self.layout = layout
        self.stream = stream
        self.acceptor = acceptor
        self.key = key
        self.on_message = on_message
        self.on_down = on_down
        self.spawn = spawn
        self.threads = threads
        self.channels: dict[int, Channel] = {}
        self.processes: dict[int, Any] = {}
        self.hosts: dict[int, str] = {}
        self.ready: dict[int, msg.Ready] = {}
        self.last_seen: dict[int, float] = {}
        self._store: dist.TCPStore | None = None
        self._down = threading.Event()
        self._fail_lock = threading.Lock()
        self.reason = ""  # why the group went down; set before `down` reads true
        self._monitor: threading.Thread | None = None

    # 1. start ---------------------------------------------------------------------------------

    def start(self, timeout_s: float, progress: ProgressFn | None = None) -> None:
        """Bring every rank up (raises EngineError naming the rank that did not)."""
        deadline = time.monotonic() + timeout_s
        world = self.layout.world
        store_addr = None
        if self.spawn:
            self._check_stopped()
            no_multicast()  # inherited by the children too
            self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                        wait_for_workers=False)
            store_addr = ("127.0.0.1", int(self._store.port))
            ctx = tmp.get_context("spawn")
            for rank in range(world):
                spec = RankSpec(self.acceptor.address, self.key, rank=rank, local_rank=rank)
                p = ctx.Process(target=spawned, args=(spec,), name=f"avatar-rank{rank}",
                                daemon=True)
                p.start()
                self.processes[rank] = p
        while len(self.channels) < world:
            self._check_stopped()
            self._check_processes("starting")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(self.channels))
                raise EngineError(f"layout {self.layout}: ranks {missing} did not join the "
                                  f"server at {self.acceptor.address} within {timeout_s:.0f} s"
                                  + ("" if self.spawn else " (is torchrun running them with "
                                     "--server pointing here and the same AVATAR_GROUP_KEY?)"))
            try:
                join, channel = self.acceptor.joins.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if not self.spawn and join.world != world:
                log.error("a torchrun group of %d processes joined, but layout %s needs exactly "
                          "%d: start torchrun with %d processes in all", join.world,
                          self.layout, world, world)
                channel.close()
                continue
            if join.rank in self.channels or not 0 <= join.rank < world:
                channel.close()
                continue
            self.channels[join.rank] = channel
            self.hosts[join.rank] = join.host
            channel.send(msg.Setup(self.config, str(self.layout), join.rank, world, store_addr,
                                   self.stream, self.threads, self.config.receive_timeout_s))
        while len(self.ready) < world:
            self._check_stopped()
            self._check_processes("loading")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(self.ready))
                raise EngineError(f"layout {self.layout}: ranks {missing} were not ready within "
                                  f"{timeout_s:.0f} s (engine.group_start_timeout_s)")
            for conn in mpc.wait([c.conn for c in self.channels.values()], POLL_S):
                rank = self._rank_of(conn)
                try:
                    m = self.channels[rank].recv()
                except ChannelClosed:
                    raise EngineError(f"rank {rank} closed its control socket while starting"
                                      f"{self._exit_code(rank)}") from None
                if isinstance(m, msg.Failed):
                    raise EngineError(m.message)
                if isinstance(m, msg.Ready):
                    self.ready[rank] = m
                    if progress is not None:
                        progress("ranks ready", len(self.ready), world)
        now = time.monotonic()
        self.last_seen = {r: now for r in range(world)}
        self._monitor = threading.Thread(target=self._watch, name="group-monitor", daemon=True)
        self._monitor.start()

    def _rank_of(self, conn: Any) -> int:
        return next(r for r, c in self.channels.items() if c.conn is conn)

    def _exit_code(self, rank: int) -> str:
        p = self.processes.get(rank)
        if p is None:
            return ""
        p.join(0.5)
        return f" (exit code {p.exitcode})" if p.exitcode is not None else ""

    def _check_stopped(self) -> None:
        if self._down.is_set():
            raise EngineError(f"layout {self.layout}: the group was stopped while starting")

    def _check_processes(self, when: str) -> None:
        for rank, p in self.processes.items():
            if not p.is_alive():
                raise EngineError(f"rank {rank} exited while {when} (exit code {p.exitcode}); "
                                  "its log is above")

    # 2. running -------------------------------------------------------------------------------

    def _watch(self) -> None:
        conns: dict[Any, int] = {c.conn: r for r, c in self.channels.items()}
        sentinels: dict[Any, int] = {p.sentinel: r for r, p in self.processes.items()}
        timeout = self.config.rank_timeout_s
        while not self._down.is_set():
            ready = mpc.wait([*conns, *sentinels], POLL_S)
            # upstream ranks first: a block's stage reports before its frames
            for obj in sorted(ready, key=lambda o: conns.get(o, sentinels.get(o, 0))):
                if obj in sentinels:
                    rank = sentinels[obj]
                    self.fail(f"rank {rank} ({self._what(rank)}) died{self._exit_code(rank)}")
                    return
                rank = conns[obj]
                try:
                    m = self.channels[rank].recv()
                except ChannelClosed:
                    code = self._exit_code(rank)  # (waits a moment for a dying process)
                    self.fail(f"rank {rank} ({self._what(rank)}) "
                              + (f"died{code}" if code else "closed its control socket"))
                    return
                self.last_seen[rank] = time.monotonic()
                if isinstance(m, msg.Failed) and m.sid is None:
                    self.fail(m.message)
                    return
                try:  # (heartbeats too: the engine's periodic work rides on them)
                    self.on_message(rank, m)
                except Exception:
                    log.exception("handling %s from rank %d failed", type(m).__name__, rank)
            now = time.monotonic()
            for rank, seen in self.last_seen.items():
                if now - seen > timeout:
                    self.fail(f"rank {rank} ({self._what(rank)}) on {self.hosts.get(rank)} sent "
                              f"nothing for {now - seen:.1f} s (engine.rank_timeout_s = "
                              f"{timeout}): hung")
                    return

    def _what(self, rank: int) -> str:
        return self.layout.role(rank).describe(self.layout, self.config.sampling.steps) \
            .split(": ", 1)[1]

    def fail(self, reason: str) -> None:
        if self._go_down(reason):
            log.error("GPU group failed: %s", reason)
            self.on_down(reason)

    def _go_down(self, reason: str) -> bool:
        """Mark the group down for `reason`; False if it already was. The lock makes "first
        one wins" hold when the monitor and a reader thread see the same death at once; the
        reason is stored before `down` turns true, so whoever sees `down` can say why."""
        with self._fail_lock:
            if self._down.is_set():
                return False
            self.reason = reason
            self._down.set()
            return True

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def send(self, rank: int, m: Any) -> None:
        ch = self.channels.get(rank)
        if ch is not None:
            ch.send(m)

    def send_all(self, m: Any, ranks: range | list[int] | None = None) -> None:
        for rank in (range(self.layout.world) if ranks is None else ranks):
            self.send(rank, m)

    # 3. stop ----------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every rank to finish, wait for them, then kill what is left."""
        self._go_down("the server is stopping it")
        self.send_all(msg.Stop())
        end = time.monotonic() + timeout_s
        for ch in self.channels.values():  # (a writer slowed by a busy host gets the time too)
            ch.flush(max(0.1, end - time.monotonic()))
        for p in self.processes.values():
            p.join(max(0.0, end - time.monotonic()))
        self._await_goodbyes(end)
        self.kill()

    def _await_goodbyes(self, end: float) -> None:
        """Until `end`, wait for the ranks the server did not spawn (torchrun's) to close their
        end of the socket: there is no process to join, and closing ours first raced with ranks
        that had not yet read their Stop (seen once: a rank exiting 3, "the server closed the
        control socket", instead of 0)."""
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(max(0.0, end - time.monotonic()))  # one reader per socket
        waiting: dict[Any, Channel] = {c.conn: c for r, c in self.channels.items()
                                       if r not in self.processes and not c.closed.is_set()}
        while waiting and (left := end - time.monotonic()) > 0:
            for conn in mpc.wait(list(waiting), left):
                try:
                    waiting[conn].recv()  # a last heartbeat or report, not wanted now
                except ChannelClosed:
                    del waiting[conn]

    def kill(self) -> None:
        """End the group now: close every socket (a rank exits when its server goes away) and
        kill the spawned processes still there."""
        self._go_down("the server is stopping it")
        for ch in self.channels.values():
            ch.close()
        for p in self.processes.values():
            p.join(0.0 if not p.is_alive() else KILL_GRACE_S / 4)
        for p in self.processes.values():
            if p.is_alive():
                p.kill()
        for p in self.processes.values():
            p.join(KILL_GRACE_S)
        self._store = None


def default_threads(layout: Layout, device: str) -> int:
    """torch CPU threads per rank: on a CPU, as many as one process would use (the same bits as
    the in-process engine); on GPUs, a share of the host's cores."""
    import os

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // layout.world)
