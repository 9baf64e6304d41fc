"""stream.ts as OBS, ffmpeg and VLC read it: 25 fps with 40 ms per frame, audio without a gap
even when the server's event loop stalls, and a reader that stops reading is cut, not buffered
for without bound."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import av
import numpy as np
import pytest

from stream.config import MediaConfig, SessionsConfig
from tests.media import png_base64, textured_face
from tests.stream.conftest import Running, make_config, start_server
from tests.stream.rtc_client import wait_for

READ_S = 10.0


async def run(*cmd: str) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode(), err.decode()


async def test_ffprobe_and_ffmpeg_see_25_fps_for_10_seconds(running: Running) -> None:
    s = await running.create()
    url = s["urls"]["stream_ts"]
    probe = run("ffprobe", "-v", "error", "-read_intervals", f"%+{READ_S:g}",
                "-show_entries", "stream=index,codec_type,codec_name,r_frame_rate,sample_rate:"
                "packet=stream_index,pts_time", "-of", "json", url)
    decode = run("ffmpeg", "-hide_banner", "-nostats", "-i", url, "-map", "0:v", "-map", "0:a",
                 "-t", f"{READ_S:g}", "-f", "null", "-")
    (out, _), (_, log) = await asyncio.gather(probe, decode)
    info = json.loads(out)
    video = next(st for st in info["streams"] if st["codec_type"] == "video")
    audio = next(st for st in info["streams"] if st["codec_type"] == "audio")
    assert (video["codec_name"], audio["codec_name"]) == ("h264", "aac")
    assert video["r_frame_rate"] == "25/1" and audio["sample_rate"] == "48000"
    pts = np.array([float(p["pts_time"]) for p in info["packets"]
                    if p["stream_index"] == video["index"]])
    steps = np.round(np.diff(pts) * 1000).astype(int)
    counts = dict(zip(*np.unique(steps, return_counts=True), strict=True))
    print(f"\nffprobe: {len(pts)} video packets in {READ_S:g} s, PTS steps (ms) "
          f"{ {int(k): int(v) for k, v in counts.items()} }")
    assert len(pts) >= 240
    assert (steps == 40).mean() >= 0.98, steps
    frames = int(log.rsplit("frame=", 1)[1].split()[0])  # ffmpeg's decoded-frame count
    assert frames >= 240, log[-500:]


async def test_audio_has_no_gap_when_the_loop_stalls(running: Running) -> None:
    """Block the server's loop for 300 ms at random moments while a player reads the TS."""
    s = await running.create()
    stop = asyncio.Event()
    stalls = 0

    async def stall() -> None:
        nonlocal stalls
        rng = random.Random(7)
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop stops for 300 ms
            stalls += 1

    def read_audio() -> tuple[list[tuple[int, int]], int]:
        """(pts, samples) of every decoded audio frame over about 8 s, and the video count."""
        frames: list[tuple[int, int]] = []
        videos = 0
        with av.open(s["urls"]["stream_ts"], "r", timeout=20) as c:
            start = time.monotonic()
            for packet in c.demux():
                for frame in packet.decode():
                    if isinstance(frame, av.AudioFrame):
                        frames.append((frame.pts, frame.samples))
                    else:
                        videos += 1
                if time.monotonic() - start > 8.0:
                    break
        return frames, videos

    staller = asyncio.create_task(stall())
    try:
        frames, videos = await asyncio.wait_for(asyncio.to_thread(read_audio), 60)
    finally:
        stop.set()
        await staller
    rate = 48000
    pts = np.array([p for p, _ in frames])  # in 1/90000 s (MPEG-TS)
    samples = np.array([n for _, n in frames])
    duration = (pts[-1] - pts[0]) / 90000 + samples[-1] / rate
    decoded = samples.sum() / rate
    gaps = np.flatnonzero(np.diff(pts) - samples[:-1] * 90000 // rate > 90)  # > 1 ms
    print(f"\n{stalls} stalls of 300 ms: {decoded:.3f} s of audio decoded over {duration:.3f} s "
          f"of audio PTS; {videos} video frames")
    assert stalls >= 4
    assert abs(decoded - duration) <= 0.020 and not len(gaps), gaps
    assert duration > 6.0


async def test_a_reader_that_stops_reading_is_cut(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    runner, base = await start_server(make_config(
        media=MediaConfig(ts_max_lag_s=1.0), sessions=SessionsConfig(default_size="704*384")))
    try:
        from aiohttp import ClientSession

        async with ClientSession() as http:
            running = Running(runner.app, base, http)
            # a grainy picture keeps the stream near its 1.5 Mbit/s, so buffers fill quickly
            s = await running.create(image=png_base64(textured_face(704, 384), tmp_path))
            session = running.manager.get(s["session_id"])
            got = 0

            async def read() -> None:
                nonlocal got
                async with http.get(s["urls"]["stream_ts"]) as r:
                    async for chunk in r.content.iter_any():
                        got += len(chunk)

            reader = asyncio.create_task(read())
            url = urlsplit(s["urls"]["stream_ts"])
            stuck = socket.socket()
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.connect((url.hostname, url.port))
            stuck.sendall(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                assert await wait_for(lambda: len(session.ts_readers) == 2, 10)
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                assert text.count('avatar_ts_reader_lag_seconds{reader="ts-') == 2
                with caplog.at_level(logging.WARNING, logger="stream.media.ts_feed"):
                    assert await wait_for(lambda: len(session.ts_readers) == 1, 20)
                assert "fell" in caplog.text and "media.ts_max_lag_s" in caplog.text
                before = got
                await asyncio.sleep(1.0)
                assert got - before > 50_000  # the other reader went on at full rate
            finally:
                stuck.close()
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    finally:
        await runner.cleanup()
