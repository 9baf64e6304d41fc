"""A TTS bot on the avatar-stream WebSocket API: espeak-ng speaks each line, the audio goes to the
avatar in 20-100 ms chunks faster than real time, and the latency of every utterance is printed.

    python client/python/examples/tts_bot.py --server http://127.0.0.1:8080 \
        "Hello, I am the avatar." "Ask me anything."

Needs espeak-ng (apt-get install espeak-ng) and a running `avatar serve`. Open the printed viewer
link to watch and hear the avatar while the bot talks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from avatar_client import (
    AvatarSocket,
    MediaFrame,
    UtteranceStarted,
    create_session,
    delete_session,
    read_pcm,
)

RATE = 16000
LINES = ("Hello! I am a talking avatar, driven by a chatbot over a WebSocket.",
         "Every sentence is synthesised, streamed faster than real time, and played in sync.",
         "Thank you for listening.")


def speak(text: str, folder: Path, index: int) -> bytes:
    """espeak-ng -> WAV -> 16 kHz mono PCM s16le."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng is not installed: apt-get install espeak-ng")
    wav = folder / f"line{index}.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "165", "-w", str(wav), text], check=True,
                   capture_output=True, timeout=60)
    return read_pcm(wav, RATE)


async def paced(pcm: bytes, speed: float, chunk_ms: float | None,
                rng: random.Random) -> AsyncIterator[bytes]:
    """The PCM in 20-100 ms chunks (or `chunk_ms`), at `speed` times real time, as a TTS
    service streams it."""
    start, sent = time.monotonic(), 0.0
    offset = 0
    while offset < len(pcm):
        size = int(RATE * (chunk_ms or rng.uniform(20, 100)) / 1000) * 2
        chunk = pcm[offset:offset + size]
        offset += len(chunk)
        yield chunk
        sent += len(chunk) / 2 / RATE
        ahead = start + sent / speed - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def run(args: argparse.Namespace) -> int:
    session = await create_session(args.server, args.api_key)
    print(f"session {session.session_id} ({session.engine.get('description', '')})")
    print(f"watch and listen: {session.urls['viewer']}", flush=True)
    rng = random.Random(0)
    frames = 0
    try:
        async with await AvatarSocket.connect(session) as bot:
            await bot.update(sample_rate=RATE, video=args.video,
                             audio=args.video != "none", stats_interval_ms=0)

            async def count_frames() -> None:
                nonlocal frames
                async for item in bot.events():
                    if isinstance(item, MediaFrame) and not item.is_audio:
                        frames += 1

            counter = asyncio.create_task(count_frames(), name="count-frames")
            with tempfile.TemporaryDirectory() as tmp:
                lines = args.lines or list(LINES)
                for i, text in enumerate(lines):
                    pcm = speak(text, Path(tmp), i)
                    seconds = len(pcm) / 2 / RATE
                    sent_at = time.monotonic()
                    if args.interrupt_after is not None and i == len(lines) - 1:
                        await interrupt_midway(bot, pcm, args, rng, seconds)
                        continue
                    watch = asyncio.create_task(first_frame(bot))
                    spoken = await bot.say(paced(pcm, args.speed, args.chunk_ms, rng))
                    started, seen_at = await watch
                    print(f"utterance {spoken.ended.utterance_id}: {seconds:.2f} s of speech, "
                          f"first frame {started.t_first_frame_ms} ms after its audio reached "
                          f"the server ({(seen_at - sent_at) * 1000:.0f} ms after the bot sent "
                          f"it), played {spoken.ended.played_ms} ms"
                          + (" (interrupted)" if spoken.ended.interrupted else ""), flush=True)
            counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter
        print(f"video frames received on the socket: {frames}")
    finally:
        if not args.keep:
            await delete_session(session)
    return 0


async def first_frame(bot: AvatarSocket) -> tuple[UtteranceStarted, float]:
    """The next utterance.started, and when it arrived."""
    started = await bot.wait_for(UtteranceStarted, 60)
    return started, time.monotonic()


async def interrupt_midway(bot: AvatarSocket, pcm: bytes, args: argparse.Namespace,
                           rng: random.Random, seconds: float) -> None:
    talking = asyncio.create_task(bot.stream(paced(pcm, args.speed, args.chunk_ms, rng)))
    started = await bot.wait_for(UtteranceStarted, 60)
    await asyncio.sleep(args.interrupt_after)
    cleared = await bot.interrupt()
    await talking
    print(f"utterance {started.utterance_id}: {seconds:.2f} s of speech, first frame "
          f"{started.t_first_frame_ms} ms after its audio reached the server, interrupted "
          f"after {cleared.played_ms} ms played", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lines", nargs="*", help="what to say, one utterance each")
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=None, help="if the server has [server] api_keys")
    parser.add_argument("--speed", type=float, default=5.0,
                        help="how much faster than real time the TTS audio is sent")
    parser.add_argument("--chunk-ms", type=float, default=None,
                        help="fixed chunk length (default: random 20-100 ms)")
    parser.add_argument("--video", choices=("none", "jpeg", "h264"), default="jpeg",
                        help="media on the socket (a headless bot's own copy of the avatar)")
    parser.add_argument("--interrupt-after", type=float, default=None, metavar="S",
                        help="interrupt the last line S seconds after it starts playing")
    parser.add_argument("--keep", action="store_true", help="do not end the session at exit")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
