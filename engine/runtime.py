"""The engine loop: one OS thread drives every session's blocks; the event loop talks to it by queue.

Design note (the invariant): for every session, block b (media [0.48 b, 0.48 b + 0.48) s) is
generated as soon as its audio is in, or when its deadline t0 + 0.48 (b + 1) + look-ahead + grace
passes, whichever is first (missing audio is then silence); among sessions, the earliest deadline
goes first. The grace is how long late audio is waited for: the server re-anchors input audio
that is later than that (stream/media/audio_in.py), one setting for both, so audio is either
used by its block or played later as its own, never played over a block made without it.

Skip-ahead. The server tells the runtime each session's playout delay (`set_playout_delay`:
media time t is shown at t0 + delay + t). A block that, started now and taking as long as the
session's recent blocks took, would be done only after its last frame's presentation time is
never shown: the session skips ahead to the first block that can still be shown (in part),
among those whose audio is due, and the skipped blocks are counted. Without a delay (the
runtime on its own, as in its tests) a session skips when more than `max_lag_blocks` behind.
No block starts more than `max_ahead_s` before its media time, so audio sent faster than real
time cannot flood the viewers' frame stores.

An interrupted source cuts its audio (`cut_audio`): the runtime replaces the session's audio from
the first sample no started block has read with silence, and says where that cut fell, so the
server silences exactly the same span of the played audio: no frame made from speech is ever shown
without its sound, and nothing after the cut is speech.

Pipelined sessions (`engine.api.PipelinedSession`, the Wan engine) split a block in two: the
engine thread submits block b (its steps are queued on the GPU, its decode after them on a
second stream) and goes on to block b+1 when its audio is in, while a delivery thread waits for
block b's own frames and hands them to the event loop the moment they exist, so overlapping the
decode with the next block's steps costs no latency. At most `max_in_flight` blocks of a session
are submitted and not yet delivered.

A generation-tier change (`set_tier`, for sessions that support it: `engine.api.TieredSession`)
is a command like any other, so it lands between two blocks: the next block submitted after it
is the first at the new tier. While the engine reports itself not ready (`engine.api.
engine_health`: a multi-GPU group restarting after a failed rank), admission refuses new
sessions with a retryable CapacityExhausted. Admission counts the measured load of the sessions
running plus what the new one is expected to cost (`admit(expected_load)`: the server predicts
it from the engine's warm-up measurement, so the first session is refused too when even the
cheapest tier cannot run in real time).

Torch-free: the engine decides what it imports. Results reach the event loop only through
`loop.call_soon_threadsafe`; commands reach the thread only through a queue (audio is never
dropped: the loop drains the queue every iteration).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.api import (
    BLOCK_SECONDS,
    SAMPLES_PER_BLOCK,
    AudioChunk,
    Engine,
    EngineSession,
    FrameBlock,
    PendingBlock,
    PipelinedSession,
    SessionParams,
    TieredSession,
    engine_health,
    session_info,
)
from engine.errors import CapacityExhausted

log = logging.getLogger(__name__)


@dataclass
class RuntimeStats:
    blocks: int = 0
    silent_blocks: int = 0
    skipped_blocks: int = 0
    failed_sessions: int = 0
    # seconds from each block's start to its frames (what the playout delay must cover; for a
    # pipelined session more than the engine time it costs, which admission counts instead)
    block_seconds_total: float = 0.0


@dataclass(frozen=True)
class OpenedSession:
    """What `open_session` returns: the frame size, media time 0, and the session's info."""

    size: tuple[int, int]  # (width, height)
    t0: float  # monotonic time of media time 0
    info: dict[str, Any] = field(default_factory=dict)  # `engine.api.session_info`


@dataclass
class _Slot:
    sid: str
    session: EngineSession
    t0: float
    on_block: Callable[[FrameBlock], None]
    on_error: Callable[[BaseException], None]
    block: int = 0
    in_flight: int = 0  # submitted, not yet delivered
    compute: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    took: deque[float] = field(default_factory=lambda: deque(maxlen=3))  # start -> frames
    delay: float | None = None  # the server's playout delay for it (None: not told)

    def load(self) -> float:
        """Measured share of real time this session costs (compute per block / 0.48 s)."""
        return (sum(self.compute) / len(self.compute) / BLOCK_SECONDS) if self.compute else 0.0

    def expected_s(self) -> float:
        """How long its next block will take from start to frames (its recent blocks)."""
        return sorted(self.took)[len(self.took) // 2] if self.took else 0.0


class EngineRuntime:
    """Runs `engine` on its own thread for up to `max_sessions` sessions."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, max_sessions: int,
                 lookahead_s: float = 0.0, grace_s: float = 0.05, max_lag_blocks: int = 2,
                 max_ahead_s: float = 1.0, max_load: float = 0.85, max_in_flight: int = 2):
        self.engine = engine
        self.loop = loop
        self.max_sessions = max_sessions
        self.lookahead_s = lookahead_s
        self.grace_s = grace_s
        self.max_lag_blocks = max_lag_blocks
        self.max_ahead_s = max_ahead_s
        self.max_load = max_load
        self.max_in_flight = max_in_flight
        self.stats = RuntimeStats()
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._slots: dict[str, _Slot] = {}
        self._reserved = 0  # sessions being opened (counted against capacity)
        self._lock = threading.Lock()
        self._stopping = False
        self._progress_at = time.monotonic()  # the last block done (or session opened)
        self._abandoned: set[str] = set()  # closed before their open finished
        # sessions are set up on their own thread: seconds of VAE/T5/prefill work for the real
        # model must not stall the blocks of the sessions already running
        self._opener = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-open")
        # blocks submitted by pipelined sessions, in submission order; None stops the thread
        self._deliveries: queue.Queue[tuple[_Slot, PendingBlock] | None] = queue.Queue()
        self._deliverer = threading.Thread(target=self._deliver, name="engine-deliver",
                                           daemon=True)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._deliverer.start()
        self._thread.start()

    # 1. the event-loop side ---------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._slots)

    def stalled_for(self) -> float:
        """Seconds since the last block was done while sessions are running (0 when idle).
        Every running session makes a block at least every 0.48 s (silence when no audio
        comes), so a large value means the engine is stuck: a watchdog reads this."""
        if not self._slots:
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    def load(self) -> float:
        with self._lock:
            return sum(s.load() for s in self._slots.values())

    def admit(self, expected_load: float | None = None) -> None:
        """Reserve room for one more session or raise CapacityExhausted. `expected_load`: the
        share of real time the new session will cost (None: as much as the average session
        running now, and the first one is let in)."""
        health = engine_health(self.engine)
        if not health.ready:
            raise CapacityExhausted(f"the engine is not ready ({health.status}): {health.detail}",
                                    retry_after=10.0)
        with self._lock:
            count = len(self._slots) + self._reserved
            load = sum(s.load() for s in self._slots.values())
            if count >= self.max_sessions:
                raise CapacityExhausted(f"all {self.max_sessions} session slots are in use")
            if expected_load is not None and expected_load > self.max_load:
                raise CapacityExhausted(
                    f"one session needs {expected_load:.0%} of this engine's real time even at "
                    f"its cheapest tier (admission stops at {self.max_load:.0%}): the engine is "
                    "too slow for a real-time session; use a faster GPU, a layout over more "
                    "GPUs, or a cheaper [latency] generation_ladder", retry_after=60.0)
            need = expected_load if expected_load is not None else (
                load / len(self._slots) if self._slots else 0.0)
            if self._slots and load + need > self.max_load:
                raise CapacityExhausted(f"the engine is at {load:.0%} of real time; another "
                                        f"session (about {need:.0%}) would not keep up")
            self._reserved += 1

    def release(self) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    async def open_session(self, sid: str, params: SessionParams,
                           on_block: Callable[[FrameBlock], None],
                           on_error: Callable[[BaseException], None]) -> OpenedSession:
        """Open a session in the engine thread (after `admit`).

        Media time 0 (`t0`) is the moment the session became ready, so a slow set-up (seconds
        for the real model) does not start it late.
        """
        future: concurrent.futures.Future[OpenedSession] = concurrent.futures.Future()
        self._opener.submit(self._open, sid, params, on_block, on_error, future)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.close_session(sid)  # the caller left: never keep a session nobody owns
            raise
        finally:
            self.release()

    def push_audio(self, sid: str, chunk: AudioChunk) -> None:
        self._commands.put(("audio", (sid, chunk)))

    def cut_audio(self, sid: str, start: int, end: int, on_cut: Callable[[int], None]) -> None:
        """Silence session `sid`'s audio [cut, end) (16 kHz samples), where cut is `start` or,
        if later, the first sample of the first block not yet started; `on_cut(cut)` then runs
        on the event loop. Ordered with `push_audio`: audio pushed before applies first."""
        self._commands.put(("cut", (sid, start, end, on_cut)))

    def set_tier(self, sid: str, size: str | None = None, steps: int | None = None,
                 on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Generate session `sid`'s next blocks at this size budget and step count (None:
        unchanged), from the next block submitted; `on_done(error or None)` then runs on the
        event loop. A refused tier (an InputError) leaves the session as it was."""
        self._commands.put(("tier", (sid, size, steps, on_done)))

    def set_playout_delay(self, sid: str, seconds: float) -> None:
        """Session `sid`'s frames of media time t are shown at t0 + `seconds` + t: blocks that
        would be done only after their frames' time are skipped (see the module docstring)."""
        self._commands.put(("delay", (sid, seconds)))

    def close_session(self, sid: str) -> None:
        self._commands.put(("close", sid))

    async def aclose(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join, 30.0)
        self._deliveries.put(None)  # after the engine thread: nothing is submitted any more
        await loop.run_in_executor(None, self._deliverer.join, 30.0)
        self._opener.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # 2. the opener thread ---------------------------------------------------------------------

    def _open(self, sid: str, params: SessionParams, on_block: Callable[[FrameBlock], None],
              on_error: Callable[[BaseException], None],
              future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up before we started
        try:
            session = self.engine.open_session(params)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            future.set_exception(exc)
            self._commands.put(("forget", sid))
            return
        self._commands.put(("opened", (sid, session, on_block, on_error, future)))

    # 3. the engine thread -------------------------------------------------------------------

    def _deadline(self, slot: _Slot) -> float:
        return slot.t0 + (slot.block + 1) * BLOCK_SECONDS + self.lookahead_s + self.grace_s

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:  # the loop must outlive any one bug: log, then carry on
                log.exception("engine loop iteration failed")
                time.sleep(0.01)
        for slot in list(self._slots.values()):
            self._close(slot.sid)

    def _iterate(self) -> None:
        timeout = 0.05
        now = time.monotonic()
        if self._slots:
            nearest = min(self._deadline(s) for s in self._slots.values())
            timeout = min(timeout, max(0.0, nearest - now))
        self._drain(timeout)
        if self._stopping:
            return
        slot = self._pick(time.monotonic())
        if slot is not None:
            self._step(slot)

    def _drain(self, timeout: float) -> None:
        try:
            kind, arg = self._commands.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._apply(kind, arg)
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, arg: Any) -> None:
        if kind == "audio":
            sid, chunk = arg
            slot = self._slots.get(sid)
            if slot is not None:
                try:
                    slot.session.push_audio(chunk)
                except Exception as exc:
                    self._fail(slot, exc)
        elif kind == "cut":
            sid, start, end, on_cut = arg
            slot = self._slots.get(sid)
            cut = start
            if slot is not None:
                # blocks before slot.block have read their audio; later ones have not
                cut = max(start, slot.block * SAMPLES_PER_BLOCK)
                if end > cut:
                    try:  # overlapping audio replaces what is there (EngineSession.push_audio)
                        slot.session.push_audio(AudioChunk(np.zeros(end - cut, np.float32), cut))
                    except Exception as exc:
                        self._fail(slot, exc)
            self.loop.call_soon_threadsafe(on_cut, cut)
        elif kind == "tier":
            sid, size, steps, on_done = arg
            slot = self._slots.get(sid)
            error: BaseException | None = None
            if slot is None:
                error = KeyError(f"no engine session {sid!r}")
            elif not isinstance(slot.session, TieredSession):
                error = NotImplementedError(f"the {self.engine.name} engine cannot change a "
                                            "session's tier")
            else:
                try:
                    slot.session.set_tier(size, steps)
                    slot.compute.clear()  # measured afresh at the new tier
                    slot.took.clear()
                except Exception as exc:  # a bad tier is the caller's error, not the session's
                    error = exc
            if on_done is not None:
                self.loop.call_soon_threadsafe(on_done, error)
        elif kind == "opened":
            sid, session, on_block, on_error, future = arg
            t0 = time.monotonic()
            with self._lock:
                self._slots[sid] = _Slot(sid, session, t0, on_block, on_error)
                self._progress_at = max(self._progress_at, t0)
            if sid in self._abandoned:
                self._abandoned.discard(sid)
                self._close(sid)
            future.set_result(OpenedSession(session.size, t0, session_info(session)))
        elif kind == "delay":
            sid, seconds = arg
            slot = self._slots.get(sid)
            if slot is not None:
                slot.delay = seconds
        elif kind == "close":
            if arg in self._slots:
                self._close(arg)
            else:
                self._abandoned.add(arg)  # its open may still be under way
        elif kind == "forget":
            self._abandoned.discard(arg)
        elif kind == "delivered":
            sid, block = arg
            slot = self._slots.get(sid)
            if slot is not None:
                slot.in_flight -= 1
                slot.compute.append(block.timings.busy)
                slot.took.append(block.timings.total or block.timings.busy)
                self._count(block, block.timings.total or block.timings.busy)
        elif kind == "failed":
            sid, error = arg
            slot = self._slots.get(sid)
            if slot is not None:
                self._fail(slot, error)
        elif kind == "stop":
            self._stopping = True

    def _close(self, sid: str) -> None:
        with self._lock:
            slot = self._slots.pop(sid, None)
        if slot is not None:
            try:
                slot.session.close()
            except Exception:
                log.exception("closing engine session %s failed", sid)

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        log.error("session %s failed at block %d: %s", slot.sid, slot.block, exc,
                  exc_info=exc)
        self.stats.failed_sessions += 1
        self._close(slot.sid)
        self.loop.call_soon_threadsafe(slot.on_error, exc)

    def _pick(self, now: float) -> _Slot | None:
        """The due session with the earliest deadline, if any."""
        due = []
        for slot in self._slots.values():
            if slot.in_flight >= self.max_in_flight:
                continue  # wait for its oldest block's frames
            earliest = slot.t0 + slot.block * BLOCK_SECONDS - self.max_ahead_s
            if now < earliest:
                continue
            if now >= self._deadline(slot) or slot.session.ready():
                due.append(slot)
        return min(due, key=self._deadline) if due else None

    def _skip_to(self, slot: _Slot, now: float) -> int | None:
        """The block `slot` should skip ahead to now, if any (see the module docstring)."""
        due = math.floor((now - slot.t0 - self.lookahead_s - self.grace_s) / BLOCK_SECONDS) - 1
        if slot.delay is None:
            late = now - self._deadline(slot)
            return due + 1 if late > self.max_lag_blocks * BLOCK_SECONDS else None
        done = now + slot.expected_s()
        shown_until = slot.t0 + slot.delay + (slot.block + 1) * BLOCK_SECONDS
        if done <= shown_until:
            return None
        # the block being presented when this one would be done: its tail can still be shown
        wanted = math.floor((done - slot.t0 - slot.delay) / BLOCK_SECONDS)
        target = min(wanted, due)  # never before its audio is due: that would be silence
        return target if target > slot.block else None

    def _step(self, slot: _Slot) -> None:
        now = time.monotonic()
        started = time.monotonic()
        try:
            target = self._skip_to(slot, now)
            if target is not None:
                log.warning("session %s is %.2f s behind its presentation: skipping blocks "
                            "%d..%d", slot.sid, now - self._deadline(slot), slot.block,
                            target - 1)
                self.stats.skipped_blocks += target - slot.block
                slot.session.seek(target)
                slot.block = target
            pad = not slot.session.ready()
            if isinstance(slot.session, PipelinedSession):
                pending = slot.session.submit_block(pad_silence=pad)
                slot.block = pending.index + 1
                slot.in_flight += 1
                self._deliveries.put((slot, pending))
                return
            block = slot.session.next_block(pad_silence=pad)
        except Exception as exc:
            self._fail(slot, exc)
            return
        spent = time.monotonic() - started
        slot.compute.append(spent)
        slot.took.append(spent)
        slot.block = block.index + 1
        self._count(block, spent)
        self.loop.call_soon_threadsafe(slot.on_block, block)

    def _count(self, block: FrameBlock, spent: float) -> None:
        self._progress_at = time.monotonic()
        self.stats.blocks += 1
        self.stats.silent_blocks += int(block.silent_samples > 0)
        self.stats.block_seconds_total += spent

    # 4. the delivery thread -----------------------------------------------------------------

    def _deliver(self) -> None:
        """Hand each submitted block to the event loop the moment its frames exist, in order."""
        while True:
            item = self._deliveries.get()
            if item is None:
                return
            slot, pending = item
            try:
                block = pending.result()  # waits (without the GIL) for this block alone
            except Exception as exc:
                self._commands.put(("failed", (slot.sid, exc)))
                continue
            with self._lock:
                alive = self._slots.get(slot.sid) is slot
            if alive:  # a closed session's last blocks are dropped, not delivered
                self.loop.call_soon_threadsafe(slot.on_block, block)
            self._commands.put(("delivered", (slot.sid, block)))
