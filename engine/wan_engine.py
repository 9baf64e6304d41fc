"""The Wan2.2-S2V + Live-Avatar engine: loads the checkpoint once, opens streaming sessions."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from engine.api import AudioChunk, BlockCost, FrameBlock, ProgressFn, SessionParams
from engine.audio_features import AudioFeatureConfig
from engine.avatar_cache import MB
from engine.checkpoint.loader import (
    EngineModels,
    load_models,
    resolve_device,
    resolve_text_device,
)
from engine.config import EngineConfig
from engine.errors import EngineError, InputError
from engine.generator import PendingFrames, StreamConfig, StreamGenerator
from engine.memory import cuda_capacity, fit_engine, t5_params
from engine.models.dit import DiTConfig
from engine.models.text import UMT5Dims
from engine.models.vae import VAEConfig
from engine.preview import draw_default_face
from engine.sizing import parse_area, parse_size
from engine.speed.prepare import prepare_models

log = logging.getLogger(__name__)


class WanSession:
    """An `engine.api.PipelinedSession` (and `TieredSession`) over a `StreamGenerator`."""

    def __init__(self, generator: StreamGenerator, max_size: str):
        self.generator = generator
        self.max_size = max_size

    @property
    def size(self) -> tuple[int, int]:
        return self.generator.width, self.generator.height

    def push_audio(self, chunk: AudioChunk) -> None:
        self.generator.push_audio(np.asarray(chunk.samples, dtype=np.float32), chunk.start)

    def ready(self) -> bool:
        return self.generator.ready()

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        return self.generator.next_block(pad_silence)

    def submit_block(self, pad_silence: bool = False) -> PendingFrames:
        return self.generator.submit_block(pad_silence)

    def seek(self, block: int) -> None:
        self.generator.seek(block)

    def set_tier(self, size: str | None = None, steps: int | None = None) -> None:
        if size is not None:
            check_size(size, self.max_size)
        self.generator.set_tier(size, steps)

    def close(self) -> None:
        self.generator.close()  # drop the rings now, not at garbage collection


class WanEngine:
    name = "wan"

    def __init__(self, models: EngineModels, config: EngineConfig):
        self.models = models
        self.config = config
        self.stream_config = StreamConfig(audio=AudioFeatureConfig(
            left_context_s=config.audio_left_context_s, lookahead_s=config.audio_lookahead_s))
        self.speed = prepare_models(models, config, self.stream_config.ring_frames,
                                    self.stream_config.block_frames)
        self.random_weights = models.random_weights
        where = f"{models.device}, {str(models.dtype).removeprefix('torch.')}"
        if models.random_weights:
            self.description = (f"RANDOM WEIGHTS: Wan2.2-S2V-14B engine at "
                                f"{'14B' if models.dit.cfg.num_layers == 40 else 'tiny'} shapes "
                                f"with random weights (no checkpoint: the video is noise) on "
                                f"{where}")
        else:
            self.description = (f"Wan2.2-S2V-14B + Live-Avatar ({config.checkpoint}) on "
                                f"{where}")
        # the last frame's interpolation neighbour needs up to 5 ms more than the look-ahead
        self.lookahead_s = config.audio_lookahead_s + 0.005
        self.max_sessions = config.max_sessions or 1
        self.max_size = config.max_size
        self._block_cost: BlockCost | None = None  # measured by `warm_up`

    @classmethod
    def load(cls, config: EngineConfig, progress: ProgressFn | None = None) -> WanEngine:
        device, dtype = resolve_device(config.device, config.dtype)
        text_device = resolve_text_device(config.text_device, device)
        if device.type == "cuda":  # before a single weight is read
            config, text_device = fit_on_gpu(config, device, dtype)
        fp8 = config.fp8_scaling if config.fp8 else None  # quantised as it loads
        audio_dtype = getattr(torch, config.audio_dtype)
        if config.random_weights:
            from engine.random_weights import build_random_models, model_shapes

            models = build_random_models(model_shapes(config.random_shapes, device), device,
                                         dtype, text_device=text_device, progress=progress,
                                         fp8_scaling=fp8, audio_dtype=audio_dtype)
        else:
            models = load_models(config.checkpoint, device, dtype, lora=config.lora or None,
                                 lora_alpha=config.lora_alpha, text_device=text_device,
                                 progress=progress, fp8_scaling=fp8, audio_dtype=audio_dtype)
        engine = cls(models, config)
        # a CPU never runs the real model in real time: calibrating there only delays start-up
        # (admission then goes by the measured load of the sessions running)
        if config.compile or config.vae_compile or (config.calibrate and device.type == "cuda"):
            engine.warm_up()
        return engine

    def warm_up(self) -> float:
        """Run one throw-away session at max_size and time it: its last block's critical path
        is the engine's `block_cost`, which admission and /readyz go by. With compile it runs
        until its rings are full and one block more, so that every graph torch.compile needs
        for that size exists before the first real session (minutes on a cold cache), and then
        the same at each of `warm_up_sizes` (the latency governor's other sizes: a session moved
        there does not stall on a compile); without, two blocks at max_size (the first pays
        for lazy set-up): a short calibration whose figure is a little under a full ring's,
        which the sessions' measured load then corrects. Returns the seconds it took."""
        start = time.monotonic()
        compiling = self.config.compile or self.config.vae_compile
        busy = self._warm_up_session(self.config.max_size)
        steps = self.config.sampling.steps
        self._block_cost = BlockCost(self.config.max_size, steps, busy)
        log.info("warm-up at %s done in %.1f s: a block at %d steps takes %.3f s (real time: "
                 "0.48 s)", self.config.max_size, time.monotonic() - start, steps, busy)
        if compiling:
            for size in self.config.extra_warm_up_sizes():
                self._warm_up_session(size)
        took = time.monotonic() - start
        log.info("warm-up done in %.1f s", took)
        return took

    def _warm_up_session(self, size: str) -> float:
        """One throw-away session at `size`; the critical path of its last block (seconds)."""
        cfg = self.stream_config
        blocks = cfg.ring_frames // cfg.block_frames + 2 if self.config.compile else 2
        w, h = parse_size(size)
        compiling = self.config.compile or self.config.vae_compile
        log.info("warming up at %dx%d%s: %d blocks", w, h,
                 " (compiling)" if compiling else "", blocks)
        session = self.open_session(SessionParams(image=draw_default_face(w, h), size=size))
        try:
            busy = [session.next_block(pad_silence=True).timings.busy for _ in range(blocks)]
        finally:
            session.close()
        return busy[-1]

    def block_cost(self) -> BlockCost | None:
        """What a block costs at max_size, from the warm-up (None: no warm-up ran)."""
        return self._block_cost

    def open_session(self, params: SessionParams) -> WanSession:
        check_size(params.size, self.config.max_size)
        if params.image is None:  # no upload and no configured avatar: the drawn face
            params = dataclasses.replace(params, image=draw_default_face(704, 384))
        s = self.config.sampling
        gen = StreamGenerator(self.models, params, self.stream_config, steps=s.steps,
                              shift=s.shift, speed=self.speed)
        return WanSession(gen, self.config.max_size)

    def close(self) -> None:
        self.speed.close()


def check_size(size: str, max_size: str) -> None:
    """Refuse a generation size larger than the one the engine's memory is planned for."""
    if parse_area(size) > parse_area(max_size):
        raise InputError(f"size {size!r} is larger than this engine's max_size {max_size!r} "
                         "(its GPU memory is planned for that); ask for a smaller size or raise "
                         "[engine] max_size")


def architecture(config: EngineConfig, device: torch.device
                 ) -> tuple[DiTConfig, VAEConfig, UMT5Dims] | None:
    """The model configs the engine will load, from headers only (None if the checkpoint is
    unreadable: loading then reports why)."""
    if config.random_weights:
        from engine.random_weights import model_shapes

        shapes = model_shapes(config.random_shapes, device)
        return shapes.dit, shapes.vae, shapes.t5
    from engine.checkpoint import inspect
    from engine.checkpoint.layout import CheckpointLayout

    try:
        layout = CheckpointLayout.at(config.checkpoint)
        dit = inspect.inspect_dit(layout).config
        vae = inspect.inspect_vae(layout)[1]
        t5 = inspect.inspect_t5(layout)[1]
    except EngineError:
        return None
    return (dit, vae, t5) if dit and vae and t5 else None


def fit_on_gpu(config: EngineConfig, device: torch.device, dtype: torch.dtype
               ) -> tuple[EngineConfig, torch.device]:
    """Check the memory plan against the card (raising a ConfigError that says what would fit)
    and return the config with the avatar cache budget it leaves, and umT5's device."""
    shapes = architecture(config, device)
    if shapes is None:
        return config, resolve_text_device(config.text_device, device)
    dit, vae, t5 = shapes
    capacity, name = cuda_capacity(device)
    fit = fit_engine(dit, vae, t5, size=config.max_size, steps=config.sampling.steps,
                     dtype=dtype, fp8=config.fp8, sessions=config.max_sessions or 1,
                     text_device=config.text_device, avatar_cache_bytes=config.avatar_cache_mb * MB,
                     capacity=capacity, device=name,
                     wav2vec_dtype=getattr(torch, config.audio_dtype))
    log.info("GPU memory plan for max_size %s on %s:\n%s", config.max_size, name,
             fit.plan.format())
    text_device = device if fit.text_on_device else torch.device("cpu")
    if config.text_device == "auto" and not fit.text_on_device:
        log.info("umT5 runs on the CPU: the GPU has no room for its %.1f GB beside the plan",
                 t5_params(t5) * 2 / 1e9)
    cache_mb = fit.avatar_cache_bytes // MB
    if cache_mb < config.avatar_cache_mb:
        log.info("avatar cache: %d MB (of avatar_cache_mb=%d) left after the plan", cache_mb,
                 config.avatar_cache_mb)
    return dataclasses.replace(config, avatar_cache_mb=cache_mb), text_device
