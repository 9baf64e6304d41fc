"""The pipeline as one `engine.api.Engine`: the server's runtime talks to it exactly as to the
single-process Wan engine.

`ParallelEngine` owns the group (`engine.parallel.group`) and is the pipeline's scheduler: it
decides, the ranks compute. A `ParallelSession` (an `engine.api.PipelinedSession` and
`TieredSession`) keeps, in the server process, what is decided per session: the audio buffer
(wav2vec2 windows are cut here and go to rank 0 with the block's plan), the block plans
(`engine.session_plan`, the same rule as the single-process generator's) and the blocks in flight.
`submit_block` sends the block's plan to every rank at once and returns; the frames come back
from the VAE's rank and complete the block's `PipelineBlock`.

Blocks of all sessions go through the stages in one global order (the order they are
submitted), so several sessions share the pipeline, interleaved: each block costs the pipeline
one stage time (its busiest rank's), which is the `busy` the runtime's admission adds up.

Control that does not wait for a block goes to the ranks at once, over their sockets: a session
opens on every rank in parallel (the VAE's rank encodes the avatar, then every DiT rank prefills
its sink); a size change's new conditioning is encoded as soon as its plan is sent; the sink
refresh's latent goes from the last DiT rank through here to every DiT rank as soon as it exists.
A `cut_audio` changes only the audio buffer here: nothing on the ranks holds audio.

A failed group (a rank that died, hung or failed) fails every block in flight and every session
with a clear error at once, reports `restarting` through `health()` (so /readyz says not ready)
and starts a new group; sessions opened after that run on the new group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
import uuid
from typing import Any

import numpy as np

from engine.api import (
    FRAMES_PER_BLOCK,
    AudioChunk,
    BlockCost,
    BlockTimings,
    EngineHealth,
    FrameBlock,
    SessionParams,
)
from engine.audio_features import AudioFeatureConfig, StreamingAudioFeatures
from engine.avatar_cache import AvatarKey
from engine.config import EngineConfig
from engine.errors import EngineError, InputError
from engine.generator import StreamConfig
from engine.image import check_image
from engine.parallel import messages as msg
from engine.parallel.channel import KEY_ENV, listen
from engine.parallel.group import Acceptor, RankGroup, default_threads
from engine.parallel.layout import DEFAULT_SESSIONS, Layout
from engine.preview import draw_default_face
from engine.progress import ProgressFn
from engine.session_plan import SessionSchedule, Tier
from engine.sizing import generation_size, parse_area, parse_size
from engine.wan_engine import check_size

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 300.0  # a session's set-up on every rank (the first one may compile)
STRAGGLER_S = 0.2  # how long finished frames wait for a rank's late stage report
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)


class GroupFailed(EngineError):
    """The GPU group failed under a session; the server restarts the group."""

    retryable = True


def group_failed(reason: str) -> GroupFailed:
    """The one error every session of a failed group gets, whoever noticed first."""
    return GroupFailed(f"the GPU group failed ({reason or 'cause unknown'}); the server is "
                       "restarting it")


# 1. A block in flight ---------------------------------------------------------------------------


class PipelineBlock:
    """A block submitted to the pipeline (an `engine.api.PendingBlock`)."""

    def __init__(self, sid: str, index: int, first_frame: int, silent: int, expected: int,
                 timeout_s: float, tier: Tier | None = None):
        self.sid = sid
        self.tier = tier
        self.timeout_s = timeout_s
        self.index = index
        self.first_frame = first_frame
        self.silent = silent
        self.expected = expected  # stage reports to wait for (the DiT ranks')
        self.started = time.perf_counter()
        self.stages: dict[int, msg.StageDone] = {}
        self.features = 0.0  # wav2vec2 seconds on the features rank, when it is not rank 0
        self.features_rank = 0
        self.frames: msg.Frames | None = None
        self.frames_at = 0.0
        self._event = threading.Event()
        self._block: FrameBlock | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self) -> FrameBlock:
        # (a dead or hung group fails its blocks within seconds; this bound is a last resort)
        if not self._event.wait(self.timeout_s):
            self.fail(EngineError(f"block {self.index}'s frames did not come back within "
                                  f"{self.timeout_s:.0f} s"))
        if self._error is not None:
            raise self._error
        assert self._block is not None
        return self._block

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    def complete(self, force: bool = False) -> bool:
        """Finish the block when its frames and every stage report are in (or, with `force`,
        its frames alone)."""
        f = self.frames
        if self._event.is_set() or f is None or (len(self.stages) < self.expected and not force):
            return self._event.is_set()
        stages = [self.stages[r] for r in sorted(self.stages)]
        steps = tuple(t for s in stages for t in s.steps)
        busy = {s.rank: s.busy for s in stages}
        if f.critical:  # the decode held up its rank: the VAE rank's whole stage, or added
            busy[f.rank] = busy.get(f.rank, 0.0) + f.decode + f.postprocess
        if self.features:  # that rank's GPU computed the features too
            busy[self.features_rank] = busy.get(self.features_rank, 0.0) + self.features
        features = self.features + (stages[0].features if stages and stages[0].rank == 0
                                    else 0.0)
        timings = BlockTimings(features=features, denoise=sum(steps), decode=f.decode,
                               total=time.perf_counter() - self.started, steps=steps,
                               postprocess=f.postprocess, busy=max(busy.values(), default=0.0))
        self._block = FrameBlock(self.index, self.first_frame, f.frames, timings, self.silent,
                                 tier=None if self.tier is None else (self.tier.size,
                                                                      self.tier.steps))
        self._event.set()
        return True


@dataclasses.dataclass
class _Opening:
    """A session being set up: the encoder's answer, then every DiT rank's."""

    sid: str
    ranks: int
    encoded: msg.Encoded | None = None
    opened: set[int] = dataclasses.field(default_factory=set)
    error: BaseException | None = None
    event: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait(self, what: str) -> None:
        if not self.event.wait(OPEN_TIMEOUT_S):
            raise EngineError(f"session set-up timed out waiting for {what} "
                              f"({OPEN_TIMEOUT_S:.0f} s)")
        self.event.clear()
        if self.error is not None:
            raise self.error


# 2. A session -----------------------------------------------------------------------------------


class ParallelSession:
    """One session of the pipeline, as the runtime sees it (see the module docstring)."""

    def __init__(self, engine: ParallelEngine, group: RankGroup, sid: str,
                 params: SessionParams, tier: Tier, size: tuple[int, int]):
        self.engine = engine
        self.group = group
        self.sid = sid
        self.params = params
        self.width, self.height = size
        self.schedule = SessionSchedule(tier, engine.stream_config.sink_refresh_block)
        self.audio = StreamingAudioFeatures(None, engine.stream_config.audio)
        self.failed: BaseException | None = None
        self.closed = False
        self.info: dict[str, Any] = {"layout": str(engine.layout)}

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def push_audio(self, chunk: AudioChunk) -> None:
        self.audio.push(np.asarray(chunk.samples, dtype=np.float32), chunk.start)

    def ready(self) -> bool:
        return self.audio.ready(self.schedule.next_block * FRAMES_PER_BLOCK + FRAMES_PER_BLOCK - 1)

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        return self.submit_block(pad_silence).result()

    def submit_block(self, pad_silence: bool = False) -> PipelineBlock:
        if self.failed is not None:
            raise self.failed
        first = self.schedule.next_block * FRAMES_PER_BLOCK
        last = first + FRAMES_PER_BLOCK - 1
        silent = 0
        if not self.audio.ready(last):
            if not pad_silence:
                raise RuntimeError(f"audio for frames {first}..{last} has not arrived; pass "
                                   "pad_silence=True once the block's deadline has passed")
            silent = self.audio.pad_silence(last)
        plan = self.schedule.plan()
        if plan.resize:
            self._encode(plan.generation, plan.tier)
        window = self.audio.window(first, FRAMES_PER_BLOCK)
        pending = PipelineBlock(self.sid, plan.index, first, silent, self.engine.layout.dit_ranks,
                                self.engine.block_timeout_s, plan.tier)
        self.engine.track(pending)
        if self.group.down:  # it failed between our check and now: nobody else will say so
            pending.fail(self.failed or group_failed(self.group.reason))
            return pending
        features = self.engine.layout.features_rank
        for rank in range(self.engine.layout.world):
            self.group.send(rank, msg.Plan(self.sid, plan, window if rank == features else None))
        return pending

    def _encode(self, generation: int, tier: Tier) -> None:
        image = self.params.image
        assert image is not None
        h, w = generation_size(image.shape[0], image.shape[1], parse_area(tier.size))
        self.width, self.height = w, h
        key = AvatarKey.of(image, h, w, self.params.prompt)
        self.group.send(self.engine.layout.decoder_rank,
                        msg.Encode(self.sid, generation, image, h, w, self.params.prompt, key))

    def seek(self, block: int) -> None:
        self.schedule.seek(block)

    def set_tier(self, size: str | None = None, steps: int | None = None) -> None:
        self.engine.check_tier(size or self.schedule.tier.size,
                               steps or self.schedule.tier.steps)
        self.schedule.set_tier(size, steps)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.group.down:
                self.group.send_all(msg.Close(self.sid))
            self.engine.forget(self.sid)


# 3. The engine ----------------------------------------------------------------------------------


class ParallelEngine:
    """The Wan engine on a group of ranks (`[engine] layout`), behind `engine.api.Engine`."""

    name = "wan"

    def __init__(self, config: EngineConfig, threads: int | None = None):
        self.config = config
        self.layout = Layout.parse(config.layout)
        steps = config.sampling.steps
        self.layout.check_steps(steps, "engine.sampling.steps")
        if steps % self.layout.dit_ranks:
            log.warning("%d steps over %d DiT ranks: the shares differ, the busiest ranks run %d "
                        "steps a block and the pipeline goes at their pace (%d steps would be "
                        "even)", steps, self.layout.dit_ranks, self.layout.max_share(steps),
                        self.layout.max_share(steps) * self.layout.dit_ranks)
        self.stream_config = StreamConfig(audio=AudioFeatureConfig(
            left_context_s=config.audio_left_context_s, lookahead_s=config.audio_lookahead_s))
        self.random_weights = config.random_weights
        self.lookahead_s = config.audio_lookahead_s + 0.005
        self.max_sessions = config.max_sessions or DEFAULT_SESSIONS
        self.max_size = config.max_size
        self.max_in_flight = self.layout.stages + 1  # one per stage, and one being delivered
        self.block_timeout_s = config.receive_timeout_s * self.layout.stages + 60.0
        self.threads = threads if threads is not None else default_threads(self.layout,
                                                                           config.device)
        self.torchrun = config.group_launch == "torchrun"
        if self.torchrun:
            hexkey = os.environ.get(KEY_ENV, "")
            if not hexkey:
                raise EngineError(f"engine.group_launch = \"torchrun\" needs the group's key in "
                                  f"the {KEY_ENV} environment variable (hex, the same for the "
                                  "server and every rank), e.g. "
                                  f"{KEY_ENV}=$(python -c 'import secrets; "
                                  "print(secrets.token_hex(32))')")
            self.key = bytes.fromhex(hexkey)
        else:
            self.key = secrets.token_bytes(32)
        host, _, port = config.group_listen.rpartition(":")
        self.acceptor = Acceptor(listen(host, int(port), self.key))
        what = "RANDOM WEIGHTS: " if config.random_weights else ""
        self.description = (f"{what}Wan2.2-S2V-14B + Live-Avatar on a pipeline of "
                            f"{self.layout.world} ranks (layout {self.layout}, "
                            f"{'torchrun' if self.torchrun else 'spawned'})")
        self._lock = threading.Lock()
        self._group: RankGroup | None = None
        self._status, self._detail = "starting", "the GPU group is starting"
        self._sessions: dict[str, ParallelSession] = {}
        self._pending: dict[tuple[str, int], PipelineBlock] = {}
        self._opening: dict[str, _Opening] = {}
        self._closing = False
        self._reports: dict[int, dict[str, Any]] = {}
        self._report_event = threading.Event()
        self.restarts = 0
        self._block_cost: BlockCost | None = None  # measured by the first warm-up

    @classmethod
    def load(cls, config: EngineConfig, progress: ProgressFn | None = None,
             threads: int | None = None) -> ParallelEngine:
        engine = cls(config, threads)
        try:
            engine.start(progress)
        except BaseException:
            engine.close()
            raise
        return engine

    # 1. the group -----------------------------------------------------------------------------

    def start(self, progress: ProgressFn | None = None) -> None:
        """Bring a group up (blocking)."""
        group = RankGroup(self.config, self.layout, self.stream_config, self.acceptor, self.key,
                          on_message=lambda rank, m: self._on_message(group, rank, m),
                          on_down=lambda reason: self._on_down(group, reason),
                          spawn=not self.torchrun, threads=self.threads)
        with self._lock:
            self._group = group
        log.info("starting %s", self.description)
        try:
            group.start(self.config.group_start_timeout_s, progress)
        except BaseException:
            group.kill()
            raise
        fit = min(r.sessions for r in group.ready.values())
        if fit and fit < self.max_sessions:
            log.info("the group's memory holds %d session(s) at max_size %s", fit,
                     self.config.max_size)
            self.max_sessions = fit
        on_gpu = all(r.device.startswith("cuda") for r in group.ready.values())
        # (a CPU group, as in tests, is never real time: calibrating it only delays start-up)
        if self.config.compile or self.config.vae_compile or (
                self.config.calibrate and on_gpu and self._block_cost is None):
            self.warm_up(group)
        with self._lock:
            if group is self._group and not group.down:
                self._status, self._detail = "ready", ""
        log.info("GPU group ready: %s", "; ".join(
            self.layout.role(r).describe(self.layout, self.config.sampling.steps) +
            f" on {group.hosts[r]} {group.ready[r].device} (loaded in {group.ready[r].load_s:.1f}"
            f" s, {group.ready[r].memory})" for r in range(self.layout.world)))

    def health(self) -> EngineHealth:
        with self._lock:
            return EngineHealth(self._status == "ready", self._status, self._detail)

    def _on_down(self, group: RankGroup, reason: str) -> None:
        with self._lock:
            if group is not self._group or self._closing:
                return
            self._status = "restarting"
            self._detail = f"{reason}; restarting the GPU group"
            error = group_failed(reason)
            pending, self._pending = list(self._pending.values()), {}
            sessions, opening = list(self._sessions.values()), list(self._opening.values())
        for s in sessions:
            s.failed = error
        for p in pending:
            p.fail(error)
        for o in opening:
            o.error = error
            o.event.set()
        threading.Thread(target=self._restart, args=(group,), name="group-restart",
                         daemon=True).start()

    def _restart(self, old: RankGroup) -> None:
        old.kill()
        attempt = 0
        while not self._closing:
            try:
                self.start()
                self.restarts += 1
                return
            except Exception as exc:
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                attempt += 1
                log.error("restarting the GPU group failed (%s); again in %.0f s", exc, wait)
                with self._lock:
                    self._detail = f"restart failed: {exc}; retrying"
                time.sleep(wait)

    def _on_message(self, group: RankGroup, rank: int, m: Any) -> None:
        """A rank's message (on the group's monitor thread)."""
        if group is not self._group:
            return
        if isinstance(m, msg.StageDone):
            with self._lock:
                p = self._pending.get((m.sid, m.block))
            if p is not None:
                p.stages[m.rank] = m
                self._try_complete(p)
        elif isinstance(m, msg.Frames):
            with self._lock:
                p = self._pending.get((m.sid, m.block))
            if p is not None:
                p.frames, p.frames_at = m, time.monotonic()
                self._try_complete(p)
        elif isinstance(m, msg.Features):  # from the features rank, for rank 0
            group.send(0, m)
            with self._lock:
                p = self._pending.get((m.sid, m.block))
            if p is not None:
                p.features, p.features_rank = m.seconds, m.rank
        elif isinstance(m, msg.FirstLatent):
            group.send_all(msg.RefreshLatent(m.sid, m.block, m.latent),
                           range(self.layout.dit_ranks))
        elif isinstance(m, msg.Encoded):
            if m.generation == 0:
                with self._lock:
                    o = self._opening.get(m.sid)
                if o is not None:
                    o.encoded = m
                    o.event.set()
            else:
                group.send_all(msg.Condition(m.sid, m.generation, m.inputs),
                               range(self.layout.dit_ranks))
        elif isinstance(m, msg.Opened):
            with self._lock:
                o = self._opening.get(m.sid)
            if o is not None:
                o.opened.add(m.rank)
                if len(o.opened) == o.ranks:
                    o.event.set()
        elif isinstance(m, msg.Failed):
            with self._lock:
                o = self._opening.get(m.sid or "")
            if o is not None:
                o.error = InputError(m.message) if m.input_error else EngineError(m.message)
                o.event.set()
            else:  # a running session's set-up (a resize) failed: the pipeline cannot go on
                group.fail(m.message)
        elif isinstance(m, msg.Report):
            self._reports[m.rank] = m.stats
            self._report_event.set()
        self._sweep()

    def _try_complete(self, p: PipelineBlock) -> None:
        if p.complete():
            with self._lock:
                self._pending.pop((p.sid, p.index), None)

    def _sweep(self) -> None:
        """Finish blocks whose frames are in but a stage report is late."""
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pending.values()
                    if p.frames is not None and now - p.frames_at > STRAGGLER_S]
        for p in late:
            p.complete(force=True)
            with self._lock:
                self._pending.pop((p.sid, p.index), None)

    def track(self, p: PipelineBlock) -> None:
        with self._lock:
            self._pending[(p.sid, p.index)] = p

    def forget(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    # 2. sessions ------------------------------------------------------------------------------

    def check_tier(self, size: str, steps: int) -> None:
        check_size(size, self.config.max_size)
        if not 1 <= steps <= 50:
            raise InputError(f"steps={steps}: accepted 1..50")
        self.layout.check_steps(steps)

    def warm_up(self, group: RankGroup) -> float:
        """One throw-away session at max_size, timed: its last block's critical path (the
        busiest rank's) is the engine's `block_cost`. With compile it runs until its rings are
        full and one block more, so that every graph torch.compile needs exists on every rank
        before the first real session (minutes on a cold cache), and then the same at each of
        `warm_up_sizes`; without, two blocks (a short calibration, as
        `engine.wan_engine.WanEngine.warm_up`). Returns the seconds it took."""
        start = time.monotonic()
        busy = self._warm_up_session(group, self.config.max_size)
        self._block_cost = BlockCost(self.config.max_size, self.config.sampling.steps, busy)
        log.info("group warm-up at %s done in %.1f s: a block takes %.3f s of the busiest "
                 "rank (real time: 0.48 s)", self.config.max_size, time.monotonic() - start,
                 busy)
        if self.config.compile or self.config.vae_compile:
            for size in self.config.extra_warm_up_sizes():
                self._warm_up_session(group, size)
        took = time.monotonic() - start
        log.info("group warm-up done in %.1f s", took)
        return took

    def _warm_up_session(self, group: RankGroup, size: str) -> float:
        """One throw-away session at `size`; its last block's critical path (seconds)."""
        cfg = self.stream_config
        blocks = cfg.ring_frames // cfg.block_frames + 2 if self.config.compile else 2
        w, h = parse_size(size)
        log.info("warming up the group at %dx%d%s: %d blocks", w, h,
                 " (compiling)" if self.config.compile else "", blocks)
        session = self._open(group, SessionParams(image=draw_default_face(w, h), size=size))
        try:
            pending = [session.submit_block(pad_silence=True) for _ in range(blocks)]
            busy = [p.result().timings.busy for p in pending]
        finally:
            session.close()
        return busy[-1]

    def block_cost(self) -> BlockCost | None:
        """What a block costs the pipeline at max_size, from the first warm-up (or None)."""
        return self._block_cost

    def open_session(self, params: SessionParams) -> ParallelSession:
        with self._lock:
            group, status, detail = self._group, self._status, self._detail
        if group is None or status != "ready":
            raise GroupFailed(f"the GPU group is not ready ({status}): {detail}")
        return self._open(group, params)

    def _open(self, group: RankGroup, params: SessionParams) -> ParallelSession:
        if params.image is None:  # no upload and no configured avatar: the drawn face
            params = dataclasses.replace(params, image=draw_default_face(704, 384))
        assert params.image is not None
        image = check_image(params.image)
        tier = Tier(params.size, params.steps or self.config.sampling.steps)
        self.check_tier(tier.size, tier.steps)
        h, w = generation_size(image.shape[0], image.shape[1], parse_area(tier.size))
        params = dataclasses.replace(params, image=image)
        sid = uuid.uuid4().hex[:12]
        opening = _Opening(sid, self.layout.dit_ranks)
        with self._lock:
            self._opening[sid] = opening
        try:
            key = AvatarKey.of(image, h, w, params.prompt)
            group.send(self.layout.decoder_rank,
                       msg.Encode(sid, 0, image, h, w, params.prompt, key))
            opening.wait("the avatar's encoding")
            assert opening.encoded is not None
            group.send_all(msg.Open(sid, dataclasses.replace(params, image=None), tier,
                                    opening.encoded.inputs), range(self.layout.dit_ranks))
            opening.wait("the DiT ranks' set-up")
        except BaseException:
            if not group.down:
                group.send_all(msg.Close(sid))  # what did open anywhere is freed
            raise
        finally:
            with self._lock:
                self._opening.pop(sid, None)
        session = ParallelSession(self, group, sid, params, tier, (w, h))
        session.info["avatar_cache_hit"] = opening.encoded.cache_hit
        with self._lock:
            self._sessions[sid] = session
        return session

    # 3. figures and shutdown ------------------------------------------------------------------

    def query(self, reset: bool = False, timeout: float = 30.0) -> dict[int, dict[str, Any]]:
        """Every rank's report (role, memory peaks, stage times) for the bench."""
        group = self._group
        if group is None:
            return {}
        self._reports = {}
        self._report_event.clear()
        group.send_all(msg.Query(reset))
        end = time.monotonic() + timeout
        while len(self._reports) < self.layout.world and time.monotonic() < end:
            self._report_event.wait(0.1)
            self._report_event.clear()
        return dict(self._reports)

    @property
    def processes(self) -> dict[int, Any]:
        """The spawned rank processes of the current group (rank -> process)."""
        group = self._group
        return dict(group.processes) if group is not None else {}

    def close(self) -> None:
        with self._lock:
            self._closing = True
            group = self._group
        if group is not None:
            group.stop()
        self.acceptor.close()
