"""The LiveKit adapter without a LiveKit server: livekit-agents' own avatar I/O (the agent's
`DataStreamAudioOutput` and the worker's `DataStreamAudioReceiver`, or `QueueAudioOutput` in one
process) over an in-memory room built from livekit's public types (tests/client/fake_livekit.py),
against the real avatar server with the preview engine. The tracks are real `rtc` tracks; the
tests read them back with `rtc.AudioStream` / `rtc.VideoStream`, as a frontend would."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web

pytest.importorskip("livekit.agents", reason="the LiveKit extra is not installed: "
                    "pip install -e '.[livekit]' (.ci/install does)")

from avatar_client import (  # noqa: E402
    AvatarSocket,
    InputAudioCleared,
    UtteranceEnded,
    create_session,
    delete_session,
)
from avatar_client.integrations.livekit import AvatarSession, AvatarWorker, serve_room  # noqa: E402
from livekit import api, rtc  # noqa: E402
from livekit.agents import AgentSession, utils  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar import (  # noqa: E402
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    QueueAudioOutput,
)

from tests import media  # noqa: E402
from tests.client.fake_livekit import FakeLink, FakeRoom  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.stream.conftest import Running  # noqa: E402

AGENT, AVATAR = "agent-1", "avatar-stream"
EXAMPLE = REPO / "client" / "python" / "examples" / "livekit_avatar_worker.py"
SECRET = "a-livekit-api-secret-of-32-bytes"
AGENT_KIND = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


def speech_frames(seconds: float, rate: int = 24000, frame_ms: int = 20) -> list[rtc.AudioFrame]:
    """TTS-like audio as the agent's pipeline hands it to its audio output."""
    pcm = (media.synthetic_voice(seconds, rate=rate) * 32767).astype("<i2")
    step = rate * frame_ms // 1000
    return [rtc.AudioFrame(pcm[i:i + step].tobytes(), rate, 1, len(pcm[i:i + step]))
            for i in range(0, len(pcm), step)]


class Viewer:
    """Subscribes to the avatar's published tracks, as a frontend in the room would."""

    def __init__(self, audio: rtc.Track, video: rtc.Track):
        self.audio: list[rtc.AudioFrame] = []
        self.video: list[rtc.VideoFrame] = []
        self._streams = (rtc.AudioStream.from_track(track=audio, sample_rate=48000,
                                                    num_channels=1), rtc.VideoStream(video))
        self._tasks = [asyncio.create_task(self._read(s, out)) for s, out in
                       zip(self._streams, (self.audio, self.video), strict=True)]

    @staticmethod
    async def _read(stream: Any, out: list[Any]) -> None:
        async for event in stream:
            out.append(event.frame)

    def audio_seconds(self) -> float:
        return sum(f.samples_per_channel for f in self.audio) / 48000

    def loudest(self) -> float:
        pcm = np.concatenate([np.frombuffer(f.data, "<i2") for f in self.audio])
        return float(np.abs(pcm.astype(np.int32)).max())

    async def aclose(self) -> None:
        await utils.aio.cancel_and_wait(*self._tasks)
        for stream in self._streams:
            await stream.aclose()


async def published(room: FakeRoom, identity: str) -> tuple[rtc.Track, rtc.Track]:
    audio = await asyncio.wait_for(utils.wait_for_track_publication(
        room, identity=identity, kind=rtc.TrackKind.KIND_AUDIO), 15)
    video = await asyncio.wait_for(utils.wait_for_track_publication(
        room, identity=identity, kind=rtc.TrackKind.KIND_VIDEO), 15)
    return audio.track, video.track


async def speak(out: Any, frames: list[rtc.AudioFrame]) -> None:
    for frame in frames:
        await out.capture_frame(frame)
    out.flush()


def rpcs(room: FakeRoom, method: str) -> list[dict[str, Any]]:
    return [json.loads(p) if p else {} for _, m, p in room.local_participant.rpc_calls
            if m == method]


@contextlib.asynccontextmanager
async def worker_in(room: FakeRoom, running: Running, receiver: Any) -> AsyncIterator[
        tuple[AvatarWorker, list[Any]]]:
    session = await create_session(running.base)
    bot = await AvatarSocket.connect(session)
    await bot.update(video="jpeg", audio=True)
    worker = AvatarWorker(room, audio_recv=receiver, bot=bot)
    events: list[Any] = []
    worker.on("avatar_event", events.append)
    await worker.start()
    try:
        yield worker, events
    finally:
        await worker.aclose()
        await bot.close()
        await delete_session(session)


async def test_the_agent_speaks_through_the_worker_into_the_room(running: Running) -> None:
    link = FakeLink()
    agent_room = link.join(AGENT, kind=AGENT_KIND)
    avatar_room = link.join(AVATAR, kind=AGENT_KIND,
                            attributes={ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT})
    serving = asyncio.create_task(serve_room(avatar_room, server=running.base,
                                             session_fields={"prompt": "a livekit agent"}))
    out = DataStreamAudioOutput(agent_room, destination_identity=AVATAR, sample_rate=24000,
                                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                                wait_playback_start=True)
    started: list[Any] = []
    out.on("playback_started", started.append)
    viewer = Viewer(*await published(agent_room, AVATAR))
    try:
        await asyncio.sleep(1.0)  # idle: the avatar moves and is silent
        idle_frames = len(viewer.video)
        await speak(out, speech_frames(1.2))
        finished = await asyncio.wait_for(out.wait_for_playout(), 20)
        assert not finished.interrupted
        assert abs(finished.playback_position - 1.2) <= 0.002  # the server's played_ms
        assert started, "lk.playback_started never came"
        assert rpcs(avatar_room, "lk.playback_finished") == [
            {"playback_position": finished.playback_position, "interrupted": False,
             "synchronized_transcript": None}]
        await asyncio.sleep(0.5)
    finally:
        await viewer.aclose()
        await avatar_room.disconnect()  # the worker leaves: it ends its session
        await asyncio.wait_for(serving, 15)
    # what the room saw: video all along at the session's size, and the avatar's voice
    assert idle_frames >= 10
    frame = viewer.video[-1]
    assert (frame.width, frame.height) == (256, 128)
    assert viewer.loudest() > 1000
    seconds = viewer.audio_seconds()
    assert len(viewer.video) >= 0.7 * 25 * seconds, (len(viewer.video), seconds)  # ~25 fps
    assert not running.manager.sessions, "serve_room must end the session it created"


async def test_clear_buffer_interrupts_and_reports_what_was_played(running: Running) -> None:
    link = FakeLink()
    agent_room = link.join(AGENT, kind=AGENT_KIND)
    avatar_room = link.join(AVATAR, kind=AGENT_KIND)
    out = DataStreamAudioOutput(agent_room, destination_identity=AVATAR,
                                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                                wait_playback_start=True)
    receiver = DataStreamAudioReceiver(avatar_room, sender_identity=AGENT)
    async with worker_in(avatar_room, running, receiver) as (worker, events):
        playing = asyncio.Event()
        out.on("playback_started", lambda _: playing.set())
        talking = asyncio.create_task(speak(out, speech_frames(6.0)))
        await asyncio.wait_for(playing.wait(), 20)
        await asyncio.sleep(0.6)
        out.clear_buffer()  # what the agent does when the user barges in
        finished = await asyncio.wait_for(out.wait_for_playout(), 5)
        await talking
        cleared = next(e for e in events if isinstance(e, InputAudioCleared))
        assert finished.interrupted
        # the server's exact figure, not the agent's 2 s fallback (which reports all 6 s)
        assert abs(finished.playback_position - cleared.played_ms / 1000) < 1e-9
        assert 0.5 <= finished.playback_position < 4.0
        assert rpcs(avatar_room, "lk.playback_finished")[-1]["interrupted"] is True
        # the agent's next reply is a new segment and plays in full
        await speak(out, speech_frames(0.5))
        again = await asyncio.wait_for(out.wait_for_playout(), 20)
        assert not again.interrupted and abs(again.playback_position - 0.5) <= 0.002
        ended = [e for e in events if isinstance(e, UtteranceEnded)]
        assert ended[0].interrupted and ended[0].played_ms == cleared.played_ms


async def test_queue_audio_output_in_one_process_and_any_sample_rate(running: Running) -> None:
    """bitHuman-style local mode: the agent's audio output is the worker's receiver; 22.05 kHz
    speech (a rate the server does not take) is resampled on the way."""
    room = FakeLink().join(AVATAR, kind=AGENT_KIND)
    queue = QueueAudioOutput(wait_playback_start=True)
    async with worker_in(room, running, queue) as (worker, events):
        finished: list[Any] = []
        worker.on("playback_finished", finished.append)
        await speak(queue, speech_frames(1.0, rate=22050))
        ev = await asyncio.wait_for(queue.wait_for_playout(), 20)
        assert not ev.interrupted and abs(ev.playback_position - 1.0) <= 0.005
        assert finished and finished[0].played_ms == round(ev.playback_position * 1000, 3)
        assert worker.bot.sample_rate == 48000  # 22.05 kHz went out at 48 kHz
        assert worker.video_publication is not None and worker.audio_publication is not None


async def test_the_agent_side_avatar_session_in_one_line(running: Running) -> None:
    link = FakeLink("lobby")
    agent_room = link.join(AGENT, kind=AGENT_KIND)
    launched: list[tuple[str, str]] = []
    served: list[asyncio.Task[None]] = []

    async def launch(url: str, token: str) -> None:  # a dispatcher would start a worker
        launched.append((url, token))
        claims = api.TokenVerifier("key", SECRET).verify(token)
        room = link.join(claims.identity, kind=AGENT_KIND, attributes=claims.attributes)
        served.append(asyncio.create_task(serve_room(room, server=running.base)))

    agent_session = AgentSession()
    avatar = AvatarSession(server=running.base, launch=launch)
    await avatar.start(agent_session, agent_room, livekit_url="wss://lk.example",
                       livekit_api_key="key",
                       livekit_api_secret=SECRET)
    try:
        (url, token), = launched
        claims = api.TokenVerifier("key", SECRET).verify(token)
        assert url == "wss://lk.example" and claims.identity == AVATAR
        assert claims.kind == "agent" and claims.video.room == "lobby" and claims.video.room_join
        assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT}
        out = agent_session.output.audio
        assert isinstance(out, DataStreamAudioOutput)
        await asyncio.wait_for(avatar.wait_for_join(), 15)  # joined and publishing video
        await speak(out, speech_frames(0.8))
        ev = await asyncio.wait_for(out.wait_for_playout(), 20)
        assert not ev.interrupted and abs(ev.playback_position - 0.8) <= 0.002
    finally:
        await avatar.aclose()
        await link.rooms[-1].disconnect()
        await asyncio.wait_for(served[0], 15)
    with pytest.raises(ValueError, match="LIVEKIT_API_SECRET"):
        await AvatarSession(server=running.base).start(agent_session, agent_room,
                                                       livekit_url="wss://x")


async def test_the_example_dispatcher_launches_a_worker_per_room(running: Running) -> None:
    spec = importlib.util.spec_from_file_location("livekit_avatar_worker", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runner = web.AppRunner(example.dispatch_app({"server": running.base}, max_workers=1))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running.http.post(f"{base}/launch", json={"url": "ws://x"}) as r:
            assert r.status == 400 and "token" in (await r.json())["error"]["message"]
        # a LiveKit server that is not there: the worker fails to join, and says so
        await example.dispatcher(base)("ws://127.0.0.1:9", "a.b.c")
        for _ in range(100):
            async with running.http.get(f"{base}/workers") as r:
                states = list((await r.json()).values())
            if states and states[0] != "running":
                break
            await asyncio.sleep(0.1)
        assert len(states) == 1 and states[0].startswith("failed: "), states
        assert not running.manager.sessions  # nothing was opened for a room never joined
    finally:
        await runner.cleanup()


async def test_an_agent_that_never_comes_and_a_server_that_is_not_there(running: Running) -> None:
    lonely = FakeLink().join(AVATAR, kind=AGENT_KIND)
    with pytest.raises(TimeoutError, match="no agent"):
        await serve_room(lonely, server=running.base, agent_timeout_s=0.3)
    assert not running.manager.sessions  # the session it opened is ended again
    # the in-process worker opens its session in start(): a wrong server fails right there
    agent_room = FakeLink().join(AGENT, kind=AGENT_KIND)
    avatar = AvatarSession(server="http://127.0.0.1:9")
    with pytest.raises(OSError):
        await avatar.start(AgentSession(), agent_room, livekit_url="wss://x",
                           livekit_api_key="key", livekit_api_secret=SECRET)
