"""One rank of the pipeline: its process, its threads and its block loop.

A rank connects to the server's control socket, gets its `Setup`, joins the torch.distributed
group, loads only its models (`engine.parallel.layout.RankRole.parts`) and says `Ready`. Then:

- the **reader** thread reads the control socket: plans and closes go to the plan queue in the
  order the server sent them; encodes and opens to the set-up queue; the inputs of a resize and
  the sink refresh's latents to the mailbox. The server going away ends the process at once.
- the **features** thread (`Layout.features_rank` when it is not rank 0) computes each block's
  wav2vec2 features as soon as its plan arrives, ahead of its other work, for rank 0 (through
  the server, 1.2 MB a block);
- the **set-up** thread opens sessions (a DiT rank prefills its sink; the VAE's rank encodes
  the avatar and primes a decoder) beside the block loop, as the single-process runtime's
  opener thread does, so a new session does not stop the others' blocks.
- the **main** thread runs the plans one after another, the same global sequence on every rank:
  receive the block from the previous rank (rank 0: audio features and noise), apply the plan's
  state changes, run the owned steps, hand the block on (or decode it and send the frames).
- a **heartbeat** every `BEAT_S`, from which the server tells a live rank from a hung one.

Every wait has a timeout (the data plane's, the mailbox's). An error in the block loop leaves the
neighbours' sends and receives out of step, so it is fatal: the rank reports it and exits, and
the server replaces the group. An error while opening a session fails that session only.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import queue
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.api import SessionParams
from engine.audio_features import window_features
from engine.avatar_cache import MB
from engine.checkpoint.loader import load_parts, resolve_device, resolve_text_device
from engine.config import EngineConfig
from engine.decode import PendingDecode, frames_to_numpy
from engine.denoise import block_noise, step_seconds
from engine.errors import ConfigError, EngineError, InputError
from engine.generator import StreamConfig
from engine.memory import cuda_capacity, fit_engine
from engine.parallel import messages as msg
from engine.parallel.channel import Channel, ChannelClosed, connect
from engine.parallel.entry import RankSpec
from engine.parallel.hops import Hops
from engine.parallel.layout import DEFAULT_SESSIONS, Layout
from engine.parallel.roles import (
    DecoderSession,
    DiTSession,
    RankModels,
    encode_avatar,
    keep_what_the_role_runs,
    memory_stats,
)
from engine.speed.prepare import SpeedState, prepare_parts
from engine.timing import StageClock
from engine.transfer import to_device

log = logging.getLogger(__name__)

BEAT_S = 0.5
JOIN_TIMEOUT_S = 600.0  # from joining to the server's Setup (the others may still be loading)
_STOP = object()


class Mailbox:
    """Values that one thread delivers and another takes by key (kind, session, ...), waiting
    with a timeout. Only sessions that are open here take deliveries: one that arrives after
    its session closed (a refresh latent still on its way) is dropped, not kept forever."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}
        self._live: set[str] = set()
        self._cond = threading.Condition()

    def open(self, sid: str) -> None:
        with self._cond:
            self._live.add(sid)

    def put(self, key: tuple, value: Any) -> None:
        with self._cond:
            if key[1] in self._live:
                self._items[key] = value
                self._cond.notify_all()

    def take(self, key: tuple, timeout: float) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._items, timeout):
                raise TimeoutError(f"nothing arrived for {key} within {timeout:.0f} s")
            return self._items.pop(key)

    def close(self, sid: str) -> None:
        with self._cond:
            self._live.discard(sid)
            for key in [k for k in self._items if k[1] == sid]:
                del self._items[key]


class RankWorker:
    """The threads and the block loop of one rank (see the module docstring)."""

    def __init__(self, channel: Channel, setup: msg.Setup, models: RankModels,
                 speed: SpeedState):
        self.channel = channel
        self.setup = setup
        self.layout = Layout.parse(setup.layout)
        self.role = self.layout.role(setup.rank)
        self.rank = setup.rank
        self.cfg: StreamConfig = setup.stream
        self.models = models
        self.speed = speed
        self.device = models.device
        self.timeout = setup.timeout_s
        self.hops = Hops(models.device, setup.timeout_s)
        self.plans: queue.Queue[Any] = queue.Queue()
        self.features: queue.Queue[msg.Plan] = queue.Queue()
        self.setups: queue.Queue[Any] = queue.Queue()
        self.mail = Mailbox()
        self.dit: dict[str, DiTSession] = {}
        self.dec: dict[str, DecoderSession] = {}
        self.busy: deque[float] = deque(maxlen=256)  # this rank's stage seconds per block
        self.feature_busy: deque[float] = deque(maxlen=256)  # (the features thread's)
        self.stopped = threading.Event()

    # 1. threads -------------------------------------------------------------------------------

    def start(self) -> None:
        threads = [(self._read, "read"), (self._set_up, "setup"), (self._beat, "beat")]
        if self.role.features and not self.role.tokens:
            threads.append((self._features, "features"))
        for target, name in threads:
            threading.Thread(target=target, name=f"rank{self.rank}-{name}", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                m = self.channel.recv()
            except ChannelClosed:
                # the server is gone: a rank must never outlive it (nor hold its GPU)
                log.error("rank %d: the server closed the control socket; exiting", self.rank)
                os._exit(3)
            if isinstance(m, (msg.Plan, msg.Close)):
                self.plans.put(m)
                if isinstance(m, msg.Plan) and m.window is not None and not self.role.tokens:
                    self.features.put(m)
            elif isinstance(m, msg.Features):
                self.mail.put(("features", m.sid, m.block), m.feats)
            elif isinstance(m, (msg.Encode, msg.Open)):
                self.setups.put(m)
            elif isinstance(m, msg.Condition):
                self.mail.put(("condition", m.sid, m.generation), m.inputs)
            elif isinstance(m, msg.RefreshLatent):
                self.mail.put(("refresh", m.sid, m.block), m.latent)
            elif isinstance(m, msg.Query):
                self.channel.send(self.report())
                if m.reset:
                    self.busy.clear()
                    self.feature_busy.clear()
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
            elif isinstance(m, msg.Stop):
                self.plans.put(_STOP)
                return

    def _beat(self) -> None:
        while not self.stopped.wait(BEAT_S):
            self.channel.send(msg.Beat(self.rank))

    def _features(self) -> None:
        wav2vec = self.models.wav2vec
        assert wav2vec is not None
        while True:
            m = self.features.get()
            assert m.window is not None
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    host, event = _to_host(window_features(wav2vec, m.window, self.device))
            except Exception as exc:  # rank 0 would wait for these in vain: fatal
                self.channel.send(self.failure(exc))
                return

            def make(m: msg.Plan = m, host: torch.Tensor = host,
                     event: torch.cuda.Event | None = event, start: float = start
                     ) -> msg.Features:
                if event is not None:
                    event.synchronize()
                took = time.perf_counter() - start
                self.feature_busy.append(took)
                return msg.Features(m.sid, m.plan.index, msg.Wire.of(host), took, self.rank)

            self.channel.send_when(make)

    def _set_up(self) -> None:
        while True:
            m = self.setups.get()
            try:
                if isinstance(m, msg.Encode):
                    self._encode(m)
                else:
                    self._open(m)
            except Exception as exc:  # the session fails, the rank goes on
                log.exception("rank %d: setting up session %s failed", self.rank, m.sid)
                self.channel.send(msg.Failed(self.rank, m.sid, f"rank {self.rank}: {exc}",
                                             input_error=isinstance(exc, InputError)))

    def _encode(self, m: msg.Encode) -> None:
        inputs, decoder, seconds, hit = encode_avatar(
            self.models, self.speed, m.image, m.height, m.width, m.prompt, m.key,
            self.cfg.warmup_latents)
        self._sync()
        hh, ww = inputs.ref_latent.data.shape[-2:]
        session = DecoderSession(decoder, (int(hh), int(ww)))
        if m.generation == 0:
            self.mail.open(m.sid)
            self.dec[m.sid] = session
        else:
            self.mail.put(("decoder", m.sid, m.generation), session)
        self.channel.send(msg.Encoded(m.sid, m.generation, inputs, seconds, hit))

    def _open(self, m: msg.Open) -> None:
        start = time.perf_counter()
        layout, rank = self.layout, self.rank
        s = DiTSession(self.models, self.speed, m.params, self.cfg.ring_frames,
                       self.setup.config.sampling.shift,
                       owned=lambda steps: layout.steps_of(rank, steps))
        s.set_up(m.inputs, m.tier)
        self._sync()
        self.mail.open(m.sid)
        self.dit[m.sid] = s
        self.channel.send(msg.Opened(m.sid, self.rank, time.perf_counter() - start, s.cache_hit))

    def _sync(self) -> None:
        if self.device.type == "cuda":  # set-up work is complete before a block uses it
            torch.cuda.current_stream(self.device).synchronize()

    # 2. the block loop ----------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            m = self.plans.get()
            if m is _STOP:
                break
            try:
                if isinstance(m, msg.Close):
                    self._close(m.sid)
                elif self.role.dit:
                    self._dit_block(m)
                else:
                    self._decoder_block(m)
            except Exception as exc:
                log.exception("rank %d failed", self.rank)
                self.fail(exc)
                return 1
        self.stopped.set()
        self.hops.drain()
        self.channel.flush()
        return 0

    def failure(self, exc: BaseException) -> msg.Failed:
        what = self.role.describe(self.layout, self.setup.config.sampling.steps)
        return msg.Failed(self.rank, None, f"{what} failed: {type(exc).__name__}: {exc}")

    def fail(self, exc: BaseException) -> None:
        """Report a fatal error of this rank to the server (then the process ends)."""
        self.channel.send(self.failure(exc))
        self.channel.flush()

    def _close(self, sid: str) -> None:
        s = self.dit.pop(sid, None)
        if s is not None:
            s.close()
        self.dec.pop(sid, None)
        self.mail.close(sid)

    def _dit_block(self, m: msg.Plan) -> None:
        s, plan, mod, role = self.dit[m.sid], m.plan, self.models, self.role
        dit = mod.dit
        assert dit is not None
        b, frames = plan.index, self.cfg.block_frames
        with torch.inference_mode(), self.speed.attention.active():
            s.apply(plan, lambda: self.mail.take(("condition", m.sid, plan.generation),
                                                 self.timeout))
            clock = StageClock(self.device)
            if role.tokens:
                if role.features:
                    assert mod.wav2vec is not None and m.window is not None
                    clock.mark("start")
                    feats = window_features(mod.wav2vec, m.window, self.device)
                else:  # computed on the VAE rank
                    wire = self.mail.take(("features", m.sid, b), self.timeout)
                    clock.mark("start")
                    feats = wire.tensor(self.device)
                audio = dit.encode_audio(feats)
                x = None
            else:
                x, tokens = self.hops.recv_block(mod.dit_cfg, frames, s.latent_hw, mod.dtype,
                                                 self.rank - 1, with_audio=True)
                assert tokens is not None
                audio = tokens
                clock.mark("start")
            clock.mark("features")
            if plan.refresh_from is not None:
                latent = self.mail.take(("refresh", m.sid, plan.refresh_from), self.timeout)
                s.denoiser.refresh(latent.tensor(self.device))
            block = s.denoiser.block_input(b, audio, s.params.seed, s.params.ref_ahead, frames)
            if x is None:
                x = to_device(block_noise(s.params.seed, b, (1, 16, frames, *s.latent_hw)),
                              self.device)
            clock.mark("inputs")
            x = s.denoiser.run(x, block, clock)
            decoding: PendingDecode | None = None
            if role.last_dit:
                if plan.capture:
                    self._send_latent(m.sid, b, x[:, :, :1])
                if role.decoder:
                    d = self.dec[m.sid]
                    d.apply(plan, self._new_decoder(m.sid, plan.generation))
                    decoding = d.submit(x.to(mod.dtype))
                else:
                    self.hops.send_block(x, None, self.layout.decoder_rank)
            else:
                self.hops.send_block(x, audio, self.rank + 1)
        steps = s.denoiser.steps
        overlapped = self.speed.decoder.overlapped
        sid, rank = m.sid, self.rank

        def done() -> msg.StageDone:
            per_step = step_seconds(clock, steps)
            features = clock.between("start", "features")
            busy = features + sum(per_step)
            self.busy.append(busy)
            return msg.StageDone(sid, b, rank, busy, per_step, features)

        self.channel.send_when(done)
        if decoding is not None:
            self._send_frames(sid, b, decoding, critical=not overlapped)

    def _decoder_block(self, m: msg.Plan) -> None:
        d, plan, mod = self.dec[m.sid], m.plan, self.models
        with torch.inference_mode():
            d.apply(plan, self._new_decoder(m.sid, plan.generation))
            x, _ = self.hops.recv_block(mod.dit_cfg, self.cfg.block_frames, d.latent_hw,
                                        mod.dtype, self.layout.last_dit_rank, with_audio=False)
            decoding = d.submit(x.to(mod.dtype))
        self._send_frames(m.sid, plan.index, decoding, critical=True)

    def _new_decoder(self, sid: str, generation: int) -> Callable[[], DecoderSession]:
        return lambda: self.mail.take(("decoder", sid, generation), self.timeout)

    def _send_latent(self, sid: str, block: int, latent: torch.Tensor) -> None:
        host, event = _to_host(latent)

        def make() -> msg.FirstLatent:
            if event is not None:
                event.synchronize()
            return msg.FirstLatent(sid, block, msg.Wire.of(host))

        self.channel.send_when(make)

    def _send_frames(self, sid: str, block: int, decoding: PendingDecode, critical: bool
                     ) -> None:
        rank = self.rank

        def make() -> msg.Frames:
            decoded = decoding.result()
            c = decoded.clock
            decode, post = c.between("decode_start", "decode"), c.between("decode", "postprocess")
            if critical:  # the decode held this rank up: it is (part of) its stage
                if self.role.dit:
                    self.busy[-1] += decode + post  # this block's entry (same writer thread)
                else:
                    self.busy.append(decode + post)
            return msg.Frames(sid, block, frames_to_numpy(decoded.frames), decode, post,
                              rank, critical)

        self.channel.send_when(make)

    def report(self) -> msg.Report:
        busy, feats = list(self.busy), list(self.feature_busy)
        if feats and len(feats) == len(busy):  # the features share this rank's GPU
            busy = [a + b for a, b in zip(busy, feats, strict=True)]
        rings = sum(s.denoiser.nbytes for s in list(self.dit.values()))
        return msg.Report(self.rank, {
            "role": self.role.describe(self.layout, self.setup.config.sampling.steps),
            "parts": list(self.role.parts), "device": str(self.device),
            "weights_gb": {k: round(v / 1e9, 3)
                           for k, v in self.models.parameter_bytes().items()},
            "sessions": len(self.dit) or len(self.dec), "rings_gb": round(rings / 1e9, 3),
            "stage_ms_median": round(statistics.median(busy) * 1000, 2) if busy else 0.0,
            "stage_ms_max": round(max(busy) * 1000, 2) if busy else 0.0, "blocks": len(busy),
            **memory_stats(self.device)})


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of `t` made without waiting (pinned memory, an event to wait on before it
    is read) on a GPU; a plain copy on the CPU."""
    if not t.is_cuda:
        return t.clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# 3. The process ---------------------------------------------------------------------------------


def fit_rank(config: EngineConfig, layout: Layout, rank: int, device: torch.device,
             dtype: torch.dtype) -> tuple[EngineConfig, torch.device, int]:
    """This rank's GPU memory plan, checked before loading: the config with the avatar cache
    budget it leaves, umT5's device (the GPU when it fits beside the rest) and how many
    sessions fit (at most `max_sessions`, or `DEFAULT_SESSIONS`). Raises the ConfigError of
    `engine.memory.check_fits`, naming the rank, when not even one session fits."""
    from engine.wan_engine import architecture

    shapes = architecture(config, device)
    cap = config.max_sessions or DEFAULT_SESSIONS
    text_device = resolve_text_device(config.text_device, device)
    if shapes is None:  # unreadable: loading says why
        return config, text_device, cap
    dit, vae, t5 = shapes
    role = layout.role(rank)
    capacity, name = cuda_capacity(device)
    where = f"rank {rank} of layout {layout} ({role.describe(layout, config.sampling.steps)})" \
            f" on {name}"
    fits = None
    for sessions in range(cap, 0, -1):
        try:
            fits = fit_engine(dit, vae, t5, size=config.max_size,
                              steps=len(layout.steps_of(rank, config.sampling.steps)),
                              dtype=dtype, fp8=config.fp8, sessions=sessions,
                              text_device=config.text_device,
                              avatar_cache_bytes=config.avatar_cache_mb * MB, capacity=capacity,
                              device=where, parts=role.parts, audio_encoder=role.tokens,
                              wav2vec_dtype=getattr(torch, config.audio_dtype))
        except ConfigError:
            if sessions == 1:
                raise
            continue
        break
    assert fits is not None
    log.info("GPU memory plan of %s, %d session(s):\n%s", where, sessions, fits.plan.format())
    if role.decoder and not fits.text_on_device:
        log.info("umT5 runs on this rank's CPU: its GPU has no room for it beside the plan")
    text_device = device if fits.text_on_device else torch.device("cpu")
    return (dataclasses.replace(config, avatar_cache_mb=fits.avatar_cache_bytes // MB),
            text_device, sessions)


def load_rank_models(config: EngineConfig, parts: tuple[str, ...], device: torch.device,
                     dtype: torch.dtype, text_device: torch.device) -> RankModels:
    """This rank's models only, from the checkpoint or as random weights at real shapes; with
    [engine] fp8 the DiT is quantised as it loads (a rank's peak is then its FP8 weights)."""
    fp8 = config.fp8_scaling if config.fp8 else None
    audio_dtype = getattr(torch, config.audio_dtype)
    if config.random_weights:
        from engine.random_weights import build_random_parts, model_shapes

        shapes = model_shapes(config.random_shapes, device)
        got = build_random_parts(shapes, parts, device, dtype, text_device=text_device,
                                 fp8_scaling=fp8, audio_dtype=audio_dtype)
        return RankModels(shapes.dit, device, dtype, random_weights=True, **got)
    from engine.checkpoint import inspect
    from engine.checkpoint.layout import CheckpointLayout

    got = load_parts(config.checkpoint, parts, device, dtype, lora=config.lora or None,
                     lora_alpha=config.lora_alpha, text_device=text_device, fp8_scaling=fp8,
                     audio_dtype=audio_dtype)
    dit_cfg = got["dit"].cfg if got["dit"] is not None else \
        inspect.inspect_dit(CheckpointLayout.at(config.checkpoint)).config
    if dit_cfg is None:
        raise EngineError(f"cannot read the DiT's config in {config.checkpoint}")
    return RankModels(dit_cfg, device, dtype, **got)


def main(spec: RankSpec) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s rank %(process)d %(name)s: %(message)s")
    rank = spec.rank if spec.rank is not None else int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "0"))
    channel = _connect(spec, rank)
    channel.send(msg.Join(rank, world, socket.gethostname(), os.getpid()))
    try:
        setup = channel.recv(timeout=JOIN_TIMEOUT_S)
    except ChannelClosed:
        return 3
    if not isinstance(setup, msg.Setup):
        return 3  # the server said no (e.g. a rank beyond the layout): nothing to do
    try:
        worker = _start(channel, setup, spec)
    except Exception as exc:
        log.exception("rank %d could not start", rank)
        channel.send(msg.Failed(rank, None, f"rank {rank} could not start: "
                                f"{type(exc).__name__}: {exc}"))
        channel.flush()
        return 1
    code = worker.run()
    if dist.is_initialized():
        dist.destroy_process_group()
    channel.close()
    return code


def _connect(spec: RankSpec, rank: int) -> Channel:
    """The server's control socket; torchrun may start a rank before the server listens, so a
    refused connection is retried for up to JOIN_TIMEOUT_S."""
    end = time.monotonic() + JOIN_TIMEOUT_S
    wait = 0.2
    while True:
        try:
            return connect(spec.server, spec.key, f"rank{rank}")
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            log.info("rank %d: the server at %s:%d is not listening yet", rank, *spec.server)
            time.sleep(wait)
            wait = min(2.0 * wait, 5.0)


def _start(channel: Channel, setup: msg.Setup, spec: RankSpec) -> RankWorker:
    start = time.perf_counter()
    config = setup.config
    device, dtype = resolve_device(config.device, config.dtype)
    if device.type == "cuda":
        local = spec.local_rank if spec.local_rank is not None else setup.rank
        if torch.cuda.device_count() <= local:
            raise EngineError(f"layout {setup.layout} puts rank {setup.rank} on cuda:{local}, "
                              f"but this host has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    timeout = datetime.timedelta(seconds=setup.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if setup.store is not None:
        host, port = setup.store
        store = dist.TCPStore(host, port, setup.world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=setup.rank, world_size=setup.world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, rank=setup.rank, world_size=setup.world,
                                timeout=timeout)
    layout = Layout.parse(setup.layout)
    role = layout.role(setup.rank)
    sessions = config.max_sessions or DEFAULT_SESSIONS
    text_device = resolve_text_device(config.text_device, device)
    if device.type == "cuda":  # before a single weight is read
        config, text_device, sessions = fit_rank(config, layout, setup.rank, device, dtype)
    models = load_rank_models(config, role.parts, device, dtype, text_device)
    keep_what_the_role_runs(models, role.tokens)
    speed = prepare_parts(models.dit, models.vae, device, dtype, config,
                          setup.stream.ring_frames, setup.stream.block_frames)
    worker = RankWorker(channel, setup, models, speed)

    def fatal(exc: BaseException) -> None:  # (on the writer thread) a frames message failed
        try:
            channel.conn.send(worker.failure(exc))
        finally:
            os._exit(1)

    channel.on_error = fatal
    channel.send(msg.Ready(setup.rank, str(device), role.parts, time.perf_counter() - start,
                           memory_stats(device), sessions))
    log.info("%s ready on %s in %.1f s", role.describe(Layout.parse(setup.layout),
                                                     config.sampling.steps), device,
             time.perf_counter() - start)
    return worker


__all__ = ["RankWorker", "SessionParams", "main"]
