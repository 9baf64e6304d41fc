"""The Python SDK (client/python/avatar_client) against the real server with the preview engine,
its packaging, and the TTS bot example."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from avatar_client import (
    ApiError,
    AvatarSocket,
    MediaFrame,
    UtteranceEnded,
    UtteranceStarted,
    create_session,
    delete_session,
)

from tests import media
from tests.conftest import REPO
from tests.stream.conftest import Running

EXAMPLE = REPO / "client" / "python" / "examples" / "tts_bot.py"


def tone(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


async def test_say_reports_latency_and_played_audio_and_media_arrives(running: Running) -> None:
    session = await create_session(running.base, prompt="a bot")
    async with await AvatarSocket.connect(session) as bot:
        assert bot.ready.session_id == session.session_id and bot.ready.engine["preview"]
        updated = await bot.update(video="jpeg", audio=True, fps=12.5)
        assert updated.output["fps"] == 12.5 and updated.output["video"] == "jpeg"
        frames: list[MediaFrame] = []

        async def collect() -> None:
            async for item in bot.events():
                if isinstance(item, MediaFrame):
                    frames.append(item)

        collector = asyncio.create_task(collect())
        spoken = await bot.say(tone(1.5))
        assert spoken.started is not None and spoken.started.t_first_frame_ms > 0
        assert spoken.ended.played_ms == 1500 and not spoken.ended.interrupted
        assert spoken.started.utterance_id == spoken.ended.utterance_id
    await collector
    video = [f for f in frames if not f.is_audio]
    audio = [f for f in frames if f.is_audio]
    assert video and video[0].codec == "jpeg" and video[0].data[:2] == b"\xff\xd8"
    assert all(b.pts - a.pts == 80 for a, b in zip(video, video[1:], strict=False))
    assert audio and all(len(f.data) == 3840 for f in audio)
    await delete_session(session)
    with pytest.raises(ApiError) as err:
        await create_session(running.base, colour="red")
    assert err.value.status == 400 and err.value.code == "unknown_field"


async def test_interrupt_stops_the_stream_and_reports_what_was_played(running: Running) -> None:
    session = await create_session(running.base)
    async with await AvatarSocket.connect(session) as bot:

        async def tts() -> object:  # an endless TTS stream, 40 ms chunks, 4x real time
            chunk = tone(0.04)
            while True:
                yield chunk
                await asyncio.sleep(0.01)

        talking = asyncio.create_task(bot.stream(tts()))
        started = await bot.wait_for(UtteranceStarted, within=10)
        await asyncio.sleep(0.5)
        cleared = await bot.interrupt()
        assert await asyncio.wait_for(talking, 5) is False  # the stream stopped sending
        assert cleared.utterance_id == started.utterance_id and cleared.played_ms > 400
        # the next utterance is a new one and plays in full
        spoken = await bot.say(tone(0.5))
        assert spoken.ended.utterance_id != started.utterance_id
        assert spoken.ended.played_ms == 500
    await delete_session(session)


async def test_stream_file_resamples_any_wav(running: Running, tmp_path: Path) -> None:
    wav = media.write_wav(tmp_path / "voice.wav", media.synthetic_voice(1.2, rate=22050), 22050)
    session = await create_session(running.base)
    async with await AvatarSocket.connect(session) as bot:
        mark = bot.ready.seq
        assert await bot.stream_file(wav, chunk_ms=60)
        ended = await bot.wait_for(UtteranceEnded, within=10)
        assert abs(ended.played_ms - 1200) <= 2 and mark == 1
    await delete_session(session)


async def test_the_tts_bot_example_prints_latency_per_utterance(running: Running) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run .ci/install")
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'client' / 'python'}", "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--server", running.base, "--speed", "8",
        "--interrupt-after", "0.3", "One short line.", "And a longer second line to cut.",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode()
    assert proc.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("utterance ")]
    assert len(lines) == 2 and all("first frame" in line for line in lines), text
    assert "played" in lines[0] and "interrupted after" in lines[1]
    assert "video frames received on the socket" in text


def test_the_sdk_installs_as_avatar_client(tmp_path: Path) -> None:
    """A wheel of the repository carries `avatar_client` (and the protocol's schemas)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True,
                   timeout=300)
    wheel = next((tmp_path / "dist").glob("avatar_stream-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "avatar_client/__init__.py" in names and "stream/ws/protocol.schema.json" in names
    assert not any(n.startswith("client/python/") for n in names)
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import avatar_client, stream.ws.protocol "
            "as p; assert avatar_client.__file__.startswith(sys.argv[1]), avatar_client.__file__; "
            "assert p.schema()['version'] == 1; print(avatar_client.AvatarSocket.__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "AvatarSocket", out.stderr


async def test_a_frame_overtaken_by_an_interrupt_is_not_sent(running: Running) -> None:
    session = await create_session(running.base)
    bot = await AvatarSocket.connect(session)
    second = tone(1.0)
    burst = int(bot.ready.limits["max_queued_audio_ms"] * 0.8 / 1000)  # what the pacer allows
    for _ in range(burst):
        assert await bot.send_audio(second)  # all at once: within the pacer's burst
    waiting = asyncio.create_task(bot.send_audio(second))  # waits for the pacer's refill
    await asyncio.sleep(0.2)
    assert not waiting.done()
    cleared = await bot.interrupt()
    assert await asyncio.wait_for(waiting, 5) is False  # it belonged to the speech just cut
    assert cleared.dropped_ms >= (burst - 2) * 1000
    await bot.close()
    with pytest.raises(ConnectionError, match="closed"):
        await bot.send_audio(second)
    await delete_session(session)
