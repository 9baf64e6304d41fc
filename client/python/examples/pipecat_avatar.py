"""A Pipecat pipeline with the avatar: TTS -> AvatarStreamVideoService -> a recorder, headless.

    python client/python/examples/pipecat_avatar.py --server http://127.0.0.1:8080 \
        --out avatar.mp4 "Hello, I am an avatar in a Pipecat pipeline." "Bye!"

espeak-ng stands in for the TTS service (it speaks at 22.05 kHz, which the service resamples),
and an MP4 writer stands in for the output transport: it records exactly what a transport would
be given (the avatar's pictures and its audio, in sync). In a real bot the pipeline is

    Pipeline([transport.input(), stt, user_aggregator, llm, tts,
              AvatarStreamVideoService(server=...), transport.output(), assistant_aggregator])

with `TransportParams(video_out_enabled=True, video_out_is_live=True, video_out_width=...,
video_out_height=..., video_out_framerate=25)`. Needs `pip install 'avatar-stream[pipecat]'`,
espeak-ng (apt-get install espeak-ng) and a running `avatar serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from avatar_client import UtteranceEnded, UtteranceStarted
from avatar_client.integrations.pipecat import AvatarStreamVideoService
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


class EspeakTTS(FrameProcessor):
    """TTSSpeakFrame -> espeak-ng -> TTSStartedFrame, 20 ms TTSAudioRawFrames (streamed at
    `speed` x real time, as a TTS service does), TTSStoppedFrame."""

    def __init__(self, speed: float = 5.0):
        super().__init__()
        self.speed = speed
        self.exe = shutil.which("espeak-ng")
        if self.exe is None:
            sys.exit("espeak-ng is not installed: apt-get install espeak-ng")

    def synthesize(self, text: str) -> tuple[bytes, int]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "line.wav"
            subprocess.run([str(self.exe), "-v", "en-us", "-s", "165", "-w", str(path), text],
                           check=True, capture_output=True, timeout=60)
            with wave.open(str(path)) as wav:
                return wav.readframes(wav.getnframes()), wav.getframerate()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, TTSSpeakFrame):
            await self.push_frame(frame, direction)
            return
        pcm, rate = await asyncio.to_thread(self.synthesize, frame.text)
        step = rate // 50 * 2
        await self.push_frame(TTSStartedFrame())
        for i in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(pcm[i:i + step], rate, 1))
            await asyncio.sleep(0.02 / self.speed)
        await self.push_frame(TTSStoppedFrame())


class Mp4Writer(FrameProcessor):
    """Records the avatar's pictures (H.264) and audio (AAC) at their session media times, so
    the file is in sync exactly as the stream was. Encoding runs on one worker thread."""

    def __init__(self, path: Path, fps: int = 25):
        super().__init__()
        self.path, self.fps = path, fps
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mp4")
        self.container: Any = None
        self.video: Any = None
        self.audio: Any = None
        self.origin: int | None = None  # media time (ms) of the first picture
        self.frames = 0
        self.samples = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        loop = asyncio.get_running_loop()
        if isinstance(frame, OutputImageRawFrame):
            await loop.run_in_executor(self.pool, self.write_picture, frame)
        elif isinstance(frame, SpeechOutputAudioRawFrame):
            await loop.run_in_executor(self.pool, self.write_audio, frame)
        elif isinstance(frame, EndFrame):
            await loop.run_in_executor(self.pool, self.close)
        await self.push_frame(frame, direction)

    def write_picture(self, frame: OutputImageRawFrame) -> None:
        pts = int(frame.metadata["avatar_pts_ms"])
        if self.container is None:
            self.origin = pts
            self.container = av.open(str(self.path), "w")
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.width, self.video.height = frame.size
            self.video.pix_fmt = "yuv420p"
            self.video.time_base = Fraction(1, 1000)
            self.audio = self.container.add_stream("aac", rate=48000, layout="mono")
        width, height = frame.size
        rgb = np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)
        picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        picture.pts, picture.time_base = pts - (self.origin or 0), Fraction(1, 1000)
        self.container.mux(self.video.encode(picture))
        self.frames += 1

    def write_audio(self, frame: SpeechOutputAudioRawFrame) -> None:
        if self.container is None:
            return  # before the first picture (the service starts both together anyway)
        samples = np.frombuffer(frame.audio, "<i2").reshape(1, -1)
        piece = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        piece.sample_rate = frame.sample_rate
        piece.pts = self.samples
        self.samples += samples.shape[1]
        self.container.mux(self.audio.encode(piece))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.video.encode(None))
            self.container.mux(self.audio.encode(None))
            self.container.close()
            self.container = None


async def run(args: argparse.Namespace) -> int:
    avatar = AvatarStreamVideoService(server=args.server, api_key=args.api_key,
                                      session_fields={"prompt": "a Pipecat bot"})
    writer = Mp4Writer(args.out)

    @avatar.event_handler("on_session_ready")
    async def ready(service: AvatarStreamVideoService, event: Any) -> None:
        print(f"session {event.session_id} ({event.engine.get('name')}); "
              f"watch: {service.session.urls['viewer'] if service.session else '-'}",
              flush=True)

    @avatar.event_handler("on_utterance_started")
    async def started(_: AvatarStreamVideoService, event: UtteranceStarted) -> None:
        print(f"{event.utterance_id}: the avatar speaks, first frame {event.t_first_frame_ms} "
              "ms after its audio reached the server", flush=True)

    @avatar.event_handler("on_utterance_ended")
    async def ended(_: AvatarStreamVideoService, event: UtteranceEnded) -> None:
        print(f"{event.utterance_id}: played {event.played_ms} ms", flush=True)

    worker = PipelineWorker(Pipeline([EspeakTTS(args.speed), avatar, writer]),
                            cancel_on_idle_timeout=False)
    for line in args.lines or ["Hello! I am a talking avatar in a Pipecat pipeline.",
                               "The TTS audio goes in; my video and my voice come out."]:
        await worker.queue_frame(TTSSpeakFrame(line))
    await worker.queue_frame(EndFrame())  # the service holds it until the avatar is done
    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(worker)
    await runner.run()
    print(f"wrote {args.out}: {writer.frames} video frames ({writer.frames / 25:.2f} s), "
          f"{writer.samples / 48000:.2f} s of audio")
    return 0 if writer.frames else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lines", nargs="*", help="what the bot says, one TTS reply each")
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=None, help="if the server has [server] api_keys")
    parser.add_argument("--out", type=Path, default=Path("avatar.mp4"))
    parser.add_argument("--speed", type=float, default=5.0,
                        help="how much faster than real time the TTS streams its audio")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
