"""LiveKit Agents: the avatar as a participant of the room, in the shape of LiveKit's avatar
plug-ins (`pip install 'avatar-stream[livekit]'`).

Agent side, one line before `session.start(...)`, as with livekit-plugins-bey, -tavus, -simli:

    avatar = AvatarSession(server="http://avatar-host:8080")
    await avatar.start(session, room=ctx.room)

It mints a LiveKit token for the avatar participant (kind agent, `lk.publish_on_behalf` = the
agent, so frontends show its tracks as the agent's), starts the avatar worker with it (in this
process by default; `launch=` hands the URL and token to a worker elsewhere instead, e.g. a
dispatcher running `examples/livekit_avatar_worker.py`), and routes the agent's speech to it:
`DataStreamAudioOutput`, raw PCM byte streams on `lk.audio_stream`, one per segment.

Worker side (`run_worker(url, token, server=...)` joins the room; `serve_room` runs in a room
already joined): it opens a session on the avatar server and runs `AvatarWorker`:

- the agent's audio (any `AudioReceiver`: `DataStreamAudioReceiver` across the room, or
  `QueueAudioOutput` within one process) goes into the session, faster than real time; the end
  of a segment is `utterance.end`; `lk.clear_buffer` (interrupt) is `utterance.interrupt`;
- the avatar's video and audio, in sync by construction on the server, are published as the
  participant's `avatar_video` (camera) and `avatar_audio` (microphone) tracks through an
  `rtc.AVSynchronizer`, idle included: the avatar keeps moving while nobody speaks;
- `lk.playback_started` and `lk.playback_finished {playback_position, interrupted}` go back to
  the agent when the avatar really starts / has really played each segment, from the server's
  `utterance.started`, `utterance.ended` and `input_audio.cleared` (avatar_client.playback): the
  position is the server's `played_ms`, exact to the millisecond, and an interrupt is answered as
  soon as the server has placed the cut (the agent gives up waiting after 2 s).

Tested with livekit-agents 1.8 (livekit 1.1.21).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

try:
    from livekit import api, rtc
    from livekit.agents import NOT_GIVEN, AgentSession, NotGivenOr, get_job_context, utils
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.voice.avatar import (
        AudioReceiver,
        AudioSegmentEnd,
        AvatarOptions,
        DataStreamAudioOutput,
        DataStreamAudioReceiver,
    )
    from livekit.agents.voice.avatar import AvatarSession as _AvatarSession
except ImportError as exc:  # the extra is not installed
    from avatar_client.integrations import missing_extra

    raise missing_extra("livekit", "livekit-agents", "livekit-agents 1.8", exc) from exc

from avatar_client.audio import SAMPLE_RATES
from avatar_client.client import AvatarSocket
from avatar_client.events import Event
from avatar_client.media import AUDIO_RATE, AvatarMedia, VideoImage
from avatar_client.playback import Change, PlaybackStarted, PlaybackTracker
from avatar_client.rest import SessionInfo, create_session, delete_session

log = logging.getLogger(__name__)

INTERRUPT_TIMEOUT_S = 5.0
WorkerEvent = Literal["avatar_event", "playback_started", "playback_finished"]


# 1. the worker: agent audio in, avatar media out ------------------------------------------------

class AvatarWorker(rtc.EventEmitter[WorkerEvent]):
    """Drives one avatar session from an `AudioReceiver` and publishes it into `room` (the
    role of LiveKit's `AvatarRunner`, with playback reported from the server's events).

    Events: "avatar_event" (every SDK event: `UtteranceStarted`, `InputAudioCleared`, ...),
    "playback_started" (`PlaybackStarted`), "playback_finished" (`PlaybackFinished`)."""

    def __init__(self, room: rtc.Room, *, audio_recv: AudioReceiver, bot: AvatarSocket,
                 queue_size_ms: int = 100):
        super().__init__()
        self._room = room
        self._audio_recv = audio_recv
        self.bot = bot
        out = bot.output
        if out.get("video", "none") == "none" or not out.get("audio"):
            raise ValueError(f"the socket's output is {out}: call bot.update(video='jpeg' or "
                             "'h264', audio=True) first, the worker publishes both")
        self.options = AvatarOptions(
            video_width=int(out.get("width") or bot.ready.video["width"]),
            video_height=int(out.get("height") or bot.ready.video["height"]),
            video_fps=float(out.get("fps", 25)), audio_sample_rate=AUDIO_RATE,
            audio_channels=1)
        self._tracker = PlaybackTracker()
        self._media = AvatarMedia(bot, self._on_event, align=True)
        self._audio_source = rtc.AudioSource(AUDIO_RATE, 1, queue_size_ms=queue_size_ms)
        self._video_source = rtc.VideoSource(self.options.video_width,
                                             self.options.video_height)
        self._av_sync = rtc.AVSynchronizer(
            audio_source=self._audio_source, video_source=self._video_source,
            video_fps=self.options.video_fps, video_queue_size_ms=queue_size_ms)
        self._main: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_task: asyncio.Task[None] | None = None
        self.audio_publication: rtc.LocalTrackPublication | None = None
        self.video_publication: rtc.LocalTrackPublication | None = None

    async def start(self) -> None:
        await self._audio_recv.start()
        self._audio_recv.on("clear_buffer", self._on_clear_buffer)
        self._main = [asyncio.create_task(self._forward_audio(), name="avatar-audio-in"),
                      asyncio.create_task(self._forward_media(), name="avatar-media-out")]

    async def wait_for_complete(self) -> None:
        """Until the agent's audio ends or the avatar's media does (the session closed)."""
        if not self._main:
            raise RuntimeError("AvatarWorker not started")
        await asyncio.wait(self._main, return_when=asyncio.FIRST_COMPLETED)

    async def aclose(self) -> None:
        self._audio_recv.off("clear_buffer", self._on_clear_buffer)
        await self._audio_recv.aclose()
        await utils.aio.cancel_and_wait(*self._main, *self._tasks,
                                        *([self._publish_task] if self._publish_task else []))
        await self._media.aclose()
        await self._av_sync.aclose()
        await self._audio_source.aclose()
        await self._video_source.aclose()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # agent -> avatar

    @utils.log_exceptions(logger=log)
    async def _forward_audio(self) -> None:
        resampler: rtc.AudioResampler | None = None
        async for frame in self._audio_recv:
            if isinstance(frame, AudioSegmentEnd):
                for piece in resampler.flush() if resampler else []:
                    await self._send(piece)
                resampler = None
                await self.bot.end_utterance()
                self._report(self._tracker.end())
                continue
            if frame.num_channels not in (1, 2):
                log.error("agent audio with %d channels: accepted 1 or 2; frame dropped",
                          frame.num_channels)
                continue
            if frame.sample_rate in SAMPLE_RATES:
                await self._send(frame)
                continue
            if resampler is None:  # a rate the server does not take: 48 kHz it is
                resampler = rtc.AudioResampler(frame.sample_rate, AUDIO_RATE,
                                               num_channels=frame.num_channels)
            for piece in resampler.push(frame):
                await self._send(piece)

    async def _send(self, frame: rtc.AudioFrame) -> None:
        bot = self.bot
        if (bot.sample_rate, int(bot.audio_in.get("channels", 1))) != (frame.sample_rate,
                                                                       frame.num_channels):
            await bot.update(sample_rate=frame.sample_rate, channels=frame.num_channels)
        if await bot.send_audio(bytes(frame.data)):
            self._tracker.sent(frame.duration * 1000)

    def _on_clear_buffer(self) -> None:
        self._tracker.interrupted()
        self._spawn(self._interrupt(), "avatar-interrupt")

    async def _interrupt(self) -> None:
        try:
            await self.bot.interrupt(INTERRUPT_TIMEOUT_S)  # cleared arrives via _on_event
        except (TimeoutError, ConnectionError) as exc:
            log.warning("no answer to utterance.interrupt (%s): playback marked finished", exc)
            self._report(self._tracker.finish_cut())

    # avatar -> room

    @utils.log_exceptions(logger=log)
    async def _forward_media(self) -> None:
        async for item in self._media:
            if self._publish_task is None:  # lazily, as AvatarRunner: tracks with frames in
                self._publish_task = asyncio.create_task(self._publish(), name="avatar-publish")
            if isinstance(item, VideoImage):
                await self._av_sync.push(rtc.VideoFrame(
                    item.width, item.height, rtc.VideoBufferType.RGB24, item.rgb))
            else:
                await self._av_sync.push(rtc.AudioFrame(
                    item.pcm, item.sample_rate, 1, len(item.pcm) // 2))

    @utils.log_exceptions(logger=log)
    async def _publish(self) -> None:
        # the sources play in real time whether or not they are published yet, so the media
        # loop never waits for this (a stalled socket would be closed by the server)
        local = self._room.local_participant
        audio = rtc.LocalAudioTrack.create_audio_track("avatar_audio", self._audio_source)
        self.audio_publication = await local.publish_track(
            audio, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        video = rtc.LocalVideoTrack.create_video_track("avatar_video", self._video_source)
        self.video_publication = await local.publish_track(
            video, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))

    def _on_event(self, event: Event) -> None:
        self._report(self._tracker.on_event(event))
        self.emit("avatar_event", event)

    def _report(self, changes: list[Change]) -> None:
        for change in changes:
            if isinstance(change, PlaybackStarted):
                result = self._audio_recv.notify_playback_started()
                self.emit("playback_started", change)
            else:
                result = self._audio_recv.notify_playback_finished(
                    playback_position=change.played_ms / 1000, interrupted=change.interrupted)
                self.emit("playback_finished", change)
            if asyncio.iscoroutine(result):
                self._spawn(result, "avatar-notify")


# 2. running a worker in a room ------------------------------------------------------------------

async def serve_room(room: rtc.Room, *, server: str = "http://127.0.0.1:8080",
                     api_key: str | None = None, session: SessionInfo | None = None,
                     session_fields: Mapping[str, Any] | None = None,
                     sender_identity: str | None = None, video: str = "jpeg",
                     fps: float = 25.0, width: int | None = None, height: int | None = None,
                     agent_timeout_s: float = 60.0) -> None:
    """Be the avatar in `room` (joined already) until the room disconnects, the agent leaves or
    the avatar session ends. `sender_identity`: the agent whose audio to play (default: the
    first agent participant to join, within `agent_timeout_s`). Creates a session on `server`
    unless one is given, and ends the one it created."""
    _check_output(video, fps)
    owned = session is None
    if session is None:
        session = await create_session(server, api_key, **dict(session_fields or {}))
    bot: AvatarSocket | None = None
    worker: AvatarWorker | None = None
    gone = asyncio.Event()
    sender: str | None = None

    def on_disconnected(*_: Any) -> None:
        gone.set()

    def on_left(participant: rtc.RemoteParticipant) -> None:
        if participant.identity == sender:
            gone.set()

    room.on("disconnected", on_disconnected)
    room.on("participant_disconnected", on_left)
    try:
        bot = await AvatarSocket.connect(session)
        try:
            agent = await asyncio.wait_for(utils.wait_for_participant(
                room=room, identity=sender_identity,
                kind=None if sender_identity else rtc.ParticipantKind.PARTICIPANT_KIND_AGENT),
                agent_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no agent {sender_identity or '(any)'} in room {room.name} "
                               f"within agent_timeout_s={agent_timeout_s:g} s") from None
        sender = agent.identity
        # media is asked for only now: nothing piles up while the agent is not there yet
        await bot.update(video=video, audio=True, fps=fps,
                         **({"width": width} if width else {}),
                         **({"height": height} if height else {}))
        worker = AvatarWorker(room, audio_recv=DataStreamAudioReceiver(
            room, sender_identity=sender), bot=bot)
        await worker.start()
        log.info("avatar session %s in room %s, speaking for %s", session.session_id,
                 room.name, sender)
        ending = asyncio.create_task(gone.wait(), name="avatar-room-gone")
        complete = asyncio.create_task(worker.wait_for_complete(), name="avatar-complete")
        await asyncio.wait({ending, complete}, return_when=asyncio.FIRST_COMPLETED)
        await utils.aio.cancel_and_wait(ending, complete)
    finally:
        room.off("disconnected", on_disconnected)
        room.off("participant_disconnected", on_left)
        if worker is not None:
            await worker.aclose()
        if bot is not None:
            await bot.close()
        if owned:
            with contextlib.suppress(Exception):
                await delete_session(session)


def _check_output(video: str, fps: float) -> None:
    if video not in ("jpeg", "h264"):
        raise ValueError(f"video={video!r}: accepted 'jpeg' or 'h264'")
    if not 0 < fps <= 25:
        raise ValueError(f"fps={fps}: accepted 0 < fps <= 25")


async def run_worker(livekit_url: str, livekit_token: str, **options: Any) -> None:
    """Join the room with `livekit_token` and be the avatar there (`serve_room`'s options)."""
    room = rtc.Room()
    await room.connect(livekit_url, livekit_token)
    try:
        await serve_room(room, **options)
    finally:
        await room.disconnect()


# 3. the agent side ------------------------------------------------------------------------------

Launch = Callable[[str, str], Awaitable[None]]  # (livekit url, avatar token)


class AvatarSession(_AvatarSession[Any]):
    """The avatar-stream avatar for a LiveKit agent (see the module)."""

    def __init__(self, *, server: str | None = None, api_key: str | None = None,
                 session_fields: Mapping[str, Any] | None = None,
                 avatar_participant_identity: str = "avatar-stream",
                 avatar_participant_name: str = "avatar", video: str = "jpeg",
                 fps: float = 25.0, sample_rate: int = 24000, launch: Launch | None = None):
        """
        Args:
            server: the avatar server (default: $AVATAR_STREAM_URL or http://127.0.0.1:8080).
            api_key: its API key, if it has `[server] api_keys` ($AVATAR_STREAM_API_KEY).
            session_fields: fields of `POST /v1/sessions` (`avatar`, `image` as base64,
                `prompt`, `size`, `seed`).
            avatar_participant_identity, avatar_participant_name: the avatar's participant.
            video: what the worker asks the server for: "jpeg" or "h264".
            fps: the published video's frame rate (0 < fps <= 25).
            sample_rate: the rate the agent's speech is sent at (8000, 16000, 24000, 48000).
            launch: called with (livekit_url, token) to start the worker elsewhere (whose own
                server and session options then apply); default: `run_worker` as a task of
                this process.
        """
        super().__init__()
        _check_output(video, fps)
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate={sample_rate}: accepted {SAMPLE_RATES}")
        self._server = server or os.getenv("AVATAR_STREAM_URL") or "http://127.0.0.1:8080"
        self._api_key = api_key or os.getenv("AVATAR_STREAM_API_KEY") or None
        self._fields = dict(session_fields or {})
        self._identity = avatar_participant_identity
        self._name = avatar_participant_name
        self._video, self._fps, self._sample_rate = video, fps, sample_rate
        self._launch = launch
        self._session: SessionInfo | None = None  # the in-process worker's
        self._worker_task: asyncio.Task[None] | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatar-stream"

    async def start(self, agent_session: AgentSession, room: rtc.Room, *,
                    livekit_url: NotGivenOr[str] = NOT_GIVEN,
                    livekit_api_key: NotGivenOr[str] = NOT_GIVEN,
                    livekit_api_secret: NotGivenOr[str] = NOT_GIVEN) -> None:
        url = livekit_url or os.getenv("LIVEKIT_URL")
        key = livekit_api_key or os.getenv("LIVEKIT_API_KEY")
        secret = livekit_api_secret or os.getenv("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ValueError("the avatar needs its own LiveKit token: pass livekit_url, "
                             "livekit_api_key and livekit_api_secret, or set LIVEKIT_URL, "
                             "LIVEKIT_API_KEY and LIVEKIT_API_SECRET")
        job = get_job_context(required=False)
        # in a job, the identity its token gives; outside one, the room's own participant
        agent_identity = (job.local_participant_identity if job is not None
                          else room.local_participant.identity)
        token = (api.AccessToken(api_key=key, api_secret=secret)
                 .with_kind("agent").with_identity(self._identity).with_name(self._name)
                 .with_grants(api.VideoGrants(room_join=True, room=room.name))
                 .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
                 .to_jwt())
        if self._launch is not None:
            await self._launch(url, token)
        else:
            # the session first, awaited: an avatar server that cannot be reached fails here,
            # at start-up, not silently in the worker's task
            self._session = await create_session(self._server, self._api_key, **self._fields)
            self._worker_task = asyncio.create_task(run_worker(
                url, token, session=self._session, sender_identity=agent_identity,
                video=self._video, fps=self._fps), name=f"avatar-worker-{room.name}")
            self._worker_task.add_done_callback(_log_end)
        await super().start(agent_session, room)
        agent_session.output.audio = DataStreamAudioOutput(
            room, destination_identity=self._identity, sample_rate=self._sample_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)

    async def aclose(self) -> None:
        if self._worker_task is not None:
            await utils.aio.cancel_and_wait(self._worker_task)
            self._worker_task = None
        if self._session is not None:
            with contextlib.suppress(Exception):
                await delete_session(self._session)
            self._session = None
        await super().aclose()


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the avatar worker failed: %s; the agent's speech has no avatar now",
                  task.exception(), exc_info=task.exception())
