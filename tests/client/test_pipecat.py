"""The Pipecat adapter in a real Pipecat pipeline, in-process, against the real server with the
preview engine: a synthetic TTS source -> AvatarStreamVideoService -> a sink that collects what a
Pipecat transport would be given."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the Pipecat extra is not installed: "
                    "pip install -e '.[pipecat]' (.ci/install does)")

from avatar_client import (  # noqa: E402
    InputAudioCleared,
    UtteranceEnded,
    UtteranceStarted,
    delete_session,
)
from avatar_client.integrations.pipecat import AvatarStreamVideoService  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from tests import media  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.stream.conftest import Running  # noqa: E402

EXAMPLE = REPO / "client" / "python" / "examples" / "pipecat_avatar.py"
TTS_RATE = 24000  # what most TTS services produce
FRAME_MS = 40  # one video frame at 25 fps; one audio slice


@dataclass
class Say(DataFrame):
    """Ask the synthetic TTS for `seconds` of speech."""

    seconds: float = 1.0


class SyntheticTTS(FrameProcessor):
    """A TTS service stand-in: `Say` -> TTSStartedFrame, speech-like audio in 20 ms
    TTSAudioRawFrames at `speed` times real time, TTSStoppedFrame. An interruption cancels it
    mid-reply, as it would a real TTS."""

    def __init__(self, speed: float = 4.0):
        super().__init__()
        self.speed = speed
        self.upstream: list[Frame] = []  # what came back up (errors)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.UPSTREAM:
            self.upstream.append(frame)
        if not isinstance(frame, Say):
            await self.push_frame(frame, direction)
            return
        voice = media.synthetic_voice(frame.seconds, rate=TTS_RATE)
        pcm = (voice * 32767).astype("<i2").tobytes()
        step = TTS_RATE // 50 * 2  # 20 ms
        await self.push_frame(TTSStartedFrame())
        for i in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(pcm[i:i + step], TTS_RATE, 1))
            await asyncio.sleep(0.02 / self.speed)
        await self.push_frame(TTSStoppedFrame())


class Sink(FrameProcessor):
    """What the output transport would get: every frame, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


@dataclass
class Bot:
    worker: PipelineWorker
    tts: SyntheticTTS
    avatar: AvatarStreamVideoService
    sink: Sink
    events: list[Any] = field(default_factory=list)

    async def next(self, kind: type, within: float = 20.0, after: int = 0) -> Any:
        """The first event of `kind` at index >= `after` in `events`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            found = [e for e in self.events[after:] if isinstance(e, kind)]
            if found:
                return found[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind.__name__} within {within} s: {self.events}")


@contextlib.asynccontextmanager
async def pipecat_bot(running: Running, **options: Any) -> AsyncIterator[Bot]:
    avatar = AvatarStreamVideoService(**{"server": running.base, **options})
    tts, sink = SyntheticTTS(), Sink()
    worker = PipelineWorker(Pipeline([tts, avatar, sink]), cancel_on_idle_timeout=False)
    bot = Bot(worker, tts, avatar, sink)
    for name in ("on_utterance_started", "on_utterance_ended", "on_input_audio_cleared"):
        avatar.add_event_handler(name, lambda _service, event: bot.events.append(event))
    started = asyncio.Event()
    worker.add_event_handler("on_pipeline_started", lambda *_: started.set())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run(), name="pipecat-runner")
    try:
        await asyncio.wait_for(started.wait(), 20)
        yield bot
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(run, 40)
    finally:
        if not run.done():
            await worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(run, 10)


def loudness(frames: list[SpeechOutputAudioRawFrame]) -> float:
    if not frames:
        return 0.0
    pcm = np.frombuffer(b"".join(f.audio for f in frames), "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(pcm ** 2)))


def pts(frame: Frame) -> int:
    return int(frame.metadata["avatar_pts_ms"])


async def test_the_avatar_speaks_tts_audio_in_sync_in_a_pipeline(running: Running) -> None:
    async with pipecat_bot(running, session_fields={"prompt": "a pipecat bot"}) as bot:
        await bot.worker.queue_frame(Say(1.5))
        started = await bot.next(UtteranceStarted)
        ended = await bot.next(UtteranceEnded)
        await asyncio.sleep(0.3)  # a little idle after the reply
        session = bot.avatar.session
    assert session is not None
    assert ended.played_ms == 1500 and not ended.interrupted  # all of it, to the millisecond
    assert started.t_first_frame_ms > 0
    sink = bot.sink
    images = sink.of(OutputImageRawFrame)
    audio = sink.of(SpeechOutputAudioRawFrame)
    assert not sink.of(TTSAudioRawFrame), "the TTS audio must be replaced by the avatar's"
    assert sink.of(TTSStartedFrame) and sink.of(TTSStoppedFrame)  # control frames pass on
    # video: RGB frames of the session's size, every 40 ms of media time
    width, height = session.video["width"], session.video["height"]
    assert len(images) > 25 and all(f.size == (width, height) and f.format == "RGB"
                                    and len(f.image) == width * height * 3 for f in images)
    assert all(pts(b) - pts(a) == FRAME_MS for a, b in zip(images, images[1:], strict=False))
    assert all(f.sync_with_audio for f in images)
    # audio: 48 kHz mono slices, gap-free, starting with the first picture
    assert all(f.sample_rate == 48000 and f.num_channels == 1 for f in audio)
    assert all(pts(b) - pts(a) == FRAME_MS for a, b in zip(audio, audio[1:], strict=False))
    assert pts(audio[0]) == pts(images[0])
    # each picture comes just before the audio of its slot (sync_with_audio shows it with that)
    flow = [f for f in sink.frames
            if isinstance(f, OutputImageRawFrame | SpeechOutputAudioRawFrame)]
    paired = [isinstance(b, SpeechOutputAudioRawFrame) and pts(b) == pts(a)
              for a, b in zip(flow, flow[1:], strict=False) if isinstance(a, OutputImageRawFrame)]
    assert sum(paired) >= 0.9 * len(paired), paired
    audio_ms = sum(f.num_frames for f in audio) / 48
    video_ms = len(images) * FRAME_MS
    assert abs(audio_ms - video_ms) <= FRAME_MS, (audio_ms, video_ms)
    # what a viewer hears: the speech where the server says the utterance was, idle around it
    speech = [f for f in audio if pts(f) + FRAME_MS > started.pts and pts(f) < ended.pts]
    idle = [f for f in audio if pts(f) + FRAME_MS <= started.pts or pts(f) >= ended.pts]
    assert len(speech) == -(-ended.pts // FRAME_MS) - started.pts // FRAME_MS
    assert loudness(speech) > 1000 and idle and loudness(idle) < 10
    # the session the service created ended with the pipeline
    async with running.http.get(session.urls["session"],
                                headers={"Authorization": f"Bearer {session.token}"}) as r:
        assert r.status == 404


async def test_an_interruption_frame_cuts_the_avatar_short(running: Running) -> None:
    async with pipecat_bot(running) as bot:
        await bot.worker.queue_frame(Say(6.0))
        first = await bot.next(UtteranceStarted)
        await asyncio.sleep(0.6)
        await bot.worker.queue_frame(InterruptionFrame())
        cleared = await bot.next(InputAudioCleared, within=5)
        ended = await bot.next(UtteranceEnded)
        assert cleared.utterance_id == first.utterance_id == ended.utterance_id
        assert cleared.client_event_id  # the answer to this service's utterance.interrupt
        assert 500 <= cleared.played_ms < 4000 and ended.interrupted
        assert ended.played_ms == cleared.played_ms
        mark = len(bot.events)
        await asyncio.sleep(0.2)
        # the next reply is a new utterance and plays in full
        await bot.worker.queue_frame(Say(0.5))
        again = await bot.next(UtteranceEnded, after=mark)
        second = await bot.next(UtteranceStarted, after=mark)
        assert again.utterance_id == second.utterance_id != first.utterance_id
        assert again.played_ms == 500 and not again.interrupted
    audio = bot.sink.of(SpeechOutputAudioRawFrame)
    cut = [f for f in audio if ended.pts <= pts(f) and pts(f) + FRAME_MS <= second.pts]
    assert cut and loudness(cut) < 10, "nothing after the cut may be speech"
    images = bot.sink.of(OutputImageRawFrame)
    audio_ms = sum(f.num_frames for f in audio) / 48
    assert abs(audio_ms - len(images) * FRAME_MS) <= FRAME_MS


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_without_the_avatar_the_bot_still_speaks(running: Running) -> None:
    # no server there: the pipeline runs, says why, and the TTS audio passes on
    async with pipecat_bot(running, server="http://127.0.0.1:9") as bot:
        await wait_until(lambda: bot.tts.upstream)
        await bot.worker.queue_frame(Say(0.3))
        await wait_until(lambda: bot.sink.of(TTSStoppedFrame))
    error = next(f for f in bot.tts.upstream if isinstance(f, ErrorFrame))
    assert "no avatar session on http://127.0.0.1:9" in error.error and not bot.avatar.live
    assert sum(f.num_frames for f in bot.sink.of(TTSAudioRawFrame)) == 0.3 * TTS_RATE
    # the session ends under a running pipeline: the same, from then on
    async with pipecat_bot(running) as bot:
        await wait_until(lambda: bot.sink.of(OutputImageRawFrame))
        assert bot.avatar.session is not None and bot.avatar.live
        await delete_session(bot.avatar.session)
        await wait_until(lambda: not bot.avatar.live)
        await bot.worker.queue_frame(Say(0.3))
        await wait_until(lambda: bot.sink.of(TTSStoppedFrame))
    error = next(f for f in bot.tts.upstream if isinstance(f, ErrorFrame))
    assert "the avatar is gone" in error.error
    assert sum(f.num_frames for f in bot.sink.of(TTSAudioRawFrame)) == 0.3 * TTS_RATE


async def test_the_pipecat_example_records_the_avatar_in_sync(running: Running,
                                                              tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None or shutil.which("ffprobe") is None:
        pytest.fail("espeak-ng or ffprobe is not installed; run .ci/install")
    out = tmp_path / "avatar.mp4"
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'client' / 'python'}", "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--server", running.base, "--out", str(out),
        "--speed", "8", "One short line.", "And a second one.",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env)
    text = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert proc.returncode == 0, text
    played = [int(line.split("played ")[1].split()[0]) for line in text.splitlines()
              if " played " in line]
    assert len(played) == 2 and all(ms > 300 for ms in played), text
    probe = json.loads((await asyncio.to_thread(
        subprocess.run, ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(out)],
        capture_output=True, text=True, check=True)).stdout)["streams"]
    video = next(s for s in probe if s["codec_type"] == "video")
    audio = next(s for s in probe if s["codec_type"] == "audio")
    assert (video["width"], video["height"]) == (256, 128)
    assert video["avg_frame_rate"] == "25/1"
    v, a = float(video["duration"]), float(audio["duration"])
    assert abs(v - a) <= 0.05 and v >= sum(played) / 1000, (v, a, played)
