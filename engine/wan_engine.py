"""The Wan2.2-S2V + Live-Avatar engine: loads the checkpoint once, opens streaming sessions."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from engine.api import AudioChunk, FrameBlock, ProgressFn, SessionParams
from engine.audio_features import AudioFeatureConfig
from engine.checkpoint.loader import (
    EngineModels,
    load_models,
    resolve_device,
    resolve_text_device,
)
from engine.config import EngineConfig
from engine.generator import PendingFrames, StreamConfig, StreamGenerator
from engine.preview import draw_default_face
from engine.speed.prepare import prepare_models

log = logging.getLogger(__name__)


class WanSession:
    """An `engine.api.PipelinedSession` over a `StreamGenerator`."""

    def __init__(self, generator: StreamGenerator):
        self.generator = generator

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

    def close(self) -> None:
        self.generator.stages.clear()  # drop the rings now, not at garbage collection


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

    @classmethod
    def load(cls, config: EngineConfig, progress: ProgressFn | None = None) -> WanEngine:
        device, dtype = resolve_device(config.device, config.dtype)
        text_device = resolve_text_device(config.text_device, device)
        if config.random_weights:
            from engine.random_weights import build_random_models, model_shapes

            models = build_random_models(model_shapes(config.random_shapes, device), device,
                                         dtype, text_device=text_device, progress=progress)
        else:
            models = load_models(config.checkpoint, device, dtype, lora=config.lora or None,
                                 lora_alpha=config.lora_alpha, text_device=text_device,
                                 progress=progress)
        return cls(models, config)

    def open_session(self, params: SessionParams) -> WanSession:
        if params.image is None:  # no upload and no configured avatar: the drawn face
            params = dataclasses.replace(params, image=draw_default_face(704, 384))
        s = self.config.sampling
        gen = StreamGenerator(self.models, params, self.stream_config, steps=s.steps,
                              shift=s.shift, speed=self.speed)
        return WanSession(gen)

    def close(self) -> None:
        self.speed.close()
