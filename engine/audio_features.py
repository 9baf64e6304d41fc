"""Streaming wav2vec2 features: audio arrives in chunks of any size, features leave per block.

Timeline: sample s of a session is at s / 16000 s; video frame g at g / 25 s; 50 Hz wav2vec2 frame
i covers samples [320 i, 320 i + 400). The 50 Hz -> 25 fps mapping is the reference's two-stage
one: frame g takes the 30 fps index j = round(1.2 g) (never a tie at 25 fps), and 30 fps index j
is the linear interpolation of the 50 Hz states at position 5 j / 3. (The reference interpolates
with align_corners over the whole file, which stretches positions by up to ~1.3 frames at the end
of a file; a stream has no end, so the exact rate ratio is used.)

For block b (video frames [12 b, 12 b + 12)), wav2vec2 runs over the window
[block start - left context, block end + look-ahead) (clamped at the session start), normalised
with the mean and variance of the recent audio (`norm_s` seconds, with a floor so that long
silence is not amplified into speech-loud noise). Memory is bounded: only the samples later
blocks can still need are kept. The two halves are apart: `StreamingAudioFeatures.window` cuts
and normalises a block's samples (numpy; where the audio arrives), `window_features` runs
wav2vec2 on them (where the model lives), so a pipeline can do them in different processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.api import SAMPLES_PER_FRAME
from engine.audio_buffer import AudioBuffer
from engine.models.audio import HOP, SAMPLE_RATE, Wav2Vec2Features, feature_frames
from engine.transfer import to_device


@dataclass(frozen=True)
class AudioFeatureConfig:
    left_context_s: float = 4.0
    lookahead_s: float = 0.16
    norm_s: float = 10.0
    norm_floor: float = 0.01  # minimum std used for normalisation (about -40 dBFS)

    def __post_init__(self) -> None:
        for name in ("left_context_s", "lookahead_s", "norm_s"):
            if not 0.0 <= getattr(self, name) <= 60.0:
                raise ValueError(f"{name}={getattr(self, name)} out of range 0..60 s")

    @property
    def left_samples(self) -> int:
        return int(round(self.left_context_s * SAMPLE_RATE / HOP)) * HOP  # a whole 50 Hz frame

    @property
    def lookahead_samples(self) -> int:
        return int(round(self.lookahead_s * SAMPLE_RATE))

    @property
    def norm_samples(self) -> int:
        return int(round(self.norm_s * SAMPLE_RATE))


def frame_positions(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Video frames g -> (floor, frac) of their 50 Hz positions 5*round(1.2 g)/3."""
    j = (12 * frames + 5) // 10  # round(1.2 g); 1.2 g never ends in .5
    return (5 * j) // 3, ((5 * j) % 3) / 3.0


def interpolate_frames(states: torch.Tensor, first_state: int, frames: np.ndarray) -> torch.Tensor:
    """50 Hz states [B, L, T, A] whose index 0 is global frame `first_state` -> [B, L, A, G].

    Positions past the last state use the last state (the window always covers the frames it is
    asked for; this only guards the final interpolation neighbour).
    """
    base, frac = frame_positions(frames)
    idx0 = to_device(np.clip(base - first_state, 0, states.shape[2] - 1), states.device)
    idx1 = to_device(np.clip(base + 1 - first_state, 0, states.shape[2] - 1), states.device)
    w = to_device(frac, states.device, states.dtype)[None, None, :, None]
    picked = states[:, :, idx0] * (1 - w) + states[:, :, idx1] * w  # [B, L, G, A]
    return picked.permute(0, 1, 3, 2)


def samples_needed(last_frame: int, cfg: AudioFeatureConfig) -> int:
    """How many session samples must exist before features up to `last_frame` can be computed."""
    base, frac = frame_positions(np.array([last_frame]))
    last_state = int(base[0]) + (1 if frac[0] > 0 else 0)  # the interpolation neighbour
    feature_end = last_state * HOP + 400  # the samples that 50 Hz frame covers
    return max(feature_end, (last_frame + 1) * SAMPLES_PER_FRAME) + cfg.lookahead_samples


@dataclass(frozen=True)
class AudioWindow:
    """A block's wav2vec2 input: normalised samples starting at 50 Hz frame `first_state`,
    and the video frames [first_frame, first_frame + frames) to take features of."""

    samples: np.ndarray  # float32
    first_state: int
    first_frame: int
    frames: int


def window_features(model: Wav2Vec2Features, window: AudioWindow, device: torch.device | str
                    ) -> torch.Tensor:
    """wav2vec2 features of a window's frames -> [1, L, A, frames]."""
    x = to_device(window.samples[None], device)
    states = model(x)  # [1, L, T, A]
    if states.shape[2] < 1 or feature_frames(len(window.samples)) != states.shape[2]:
        raise AssertionError("wav2vec2 frame count does not match the window")
    last = window.first_frame + window.frames - 1
    return interpolate_frames(states, window.first_state, np.arange(window.first_frame, last + 1))


class StreamingAudioFeatures:
    """Per-block wav2vec2 features [1, L, A, frames] from audio pushed in arbitrary chunks."""

    def __init__(self, model: Wav2Vec2Features | None, cfg: AudioFeatureConfig,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.buffer = AudioBuffer()

    def push(self, samples: np.ndarray, at: int | None = None) -> None:
        """Add 16 kHz mono samples starting at session sample `at` (default: contiguous)."""
        self.buffer.write(samples, at)

    def ready(self, last_frame: int) -> bool:
        return self.buffer.end >= samples_needed(last_frame, self.cfg)

    def pad_silence(self, last_frame: int) -> int:
        """Fill missing audio up to what `last_frame` needs with silence; returns samples added."""
        return self.buffer.pad_to(samples_needed(last_frame, self.cfg))

    def features(self, first_frame: int, frames: int) -> torch.Tensor:
        """Features of video frames [first_frame, first_frame + frames) -> [1, L, A, frames]."""
        assert self.model is not None, "no wav2vec2 here: cut windows and compute elsewhere"
        return window_features(self.model, self.window(first_frame, frames), self.device)

    def window(self, first_frame: int, frames: int) -> AudioWindow:
        """The normalised wav2vec2 input for video frames [first_frame, first_frame + frames);
        samples no later block needs are then forgotten."""
        cfg = self.cfg
        last = first_frame + frames - 1
        stop = samples_needed(last, cfg)
        start = max(0, first_frame * SAMPLES_PER_FRAME - cfg.left_samples)
        start -= start % HOP  # window frames align with the session's 50 Hz grid
        wave = self.buffer.read(start, stop)
        norm_start = max(0, stop - cfg.norm_samples)
        stats = self.buffer.read(norm_start, stop).astype(np.float64)
        mean = float(stats.mean())
        std = max(float(stats.std()), cfg.norm_floor)
        out = AudioWindow(((wave - mean) / std).astype(np.float32), start // HOP, first_frame,
                          frames)
        self.buffer.forget_before(min(norm_start, (last + 1) * SAMPLES_PER_FRAME - cfg.left_samples))
        return out


def whole_file_features(model: Wav2Vec2Features, wave: np.ndarray, frames: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Reference: one wav2vec2 pass over a whole file with whole-file normalisation -> [1, L, A, G].

    Frames whose 50 Hz position lies past the end of the audio get zeros, as upstream does.
    """
    w = np.asarray(wave, dtype=np.float64)
    x = ((w - w.mean()) / np.sqrt(w.var() + 1e-7)).astype(np.float32)
    states = model(torch.from_numpy(x)[None].to(device))
    g = np.arange(frames)
    out = interpolate_frames(states, 0, g)
    base, frac = frame_positions(g)
    beyond = (base + (frac > 0)) >= states.shape[2]
    out[..., torch.from_numpy(beyond)] = 0.0
    return out
