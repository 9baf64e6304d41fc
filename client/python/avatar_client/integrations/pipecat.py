"""Pipecat: the avatar as a video service after TTS (`pip install 'avatar-stream[pipecat]'`).

    avatar = AvatarStreamVideoService(server="http://127.0.0.1:8080")
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar,
                         transport.output(), assistant_aggregator])

with a transport that shows video (`TransportParams(video_out_enabled=True,
video_out_is_live=True, video_out_width=..., video_out_height=..., video_out_framerate=25)`).
It follows Pipecat's convention for avatar services (Simli, HeyGen, Tavus): TTS audio goes to
the avatar, and the avatar's video and its own audio, in sync, come back down the pipeline for
the transport to play instead of the TTS audio.

Frames in:
- `TTSAudioRawFrame`: sent to the avatar session (8, 16, 24 or 48 kHz as they are, any other
  rate resampled to 24 kHz); not passed on when `sync_audio` (the default);
- `TTSStoppedFrame`: `utterance.end` (the reply is complete);
- `InterruptionFrame`: `utterance.interrupt`, answered by `input_audio.cleared`: the avatar falls
  silent at the cut, within about the server's playout delay;
- `EndFrame`: held until everything sent has been played (at most `end_timeout_s`), so the
  goodbye is heard and seen; then the session ends (if this service created it).

Frames out: `OutputImageRawFrame` (RGB) for every video frame, a copy of the previous picture
for one the server dropped, and, with `sync_audio`, `SpeechOutputAudioRawFrame` (48 kHz mono,
40 ms each, silence included: the transport tells speech from silence, which gives it
`BotStartedSpeakingFrame`/`BotStoppedSpeakingFrame` when the avatar actually speaks). Pictures
are marked `sync_with_audio` and come just before the audio of their slot, so the transport
shows picture t as audio t starts playing.

Event handlers (`@avatar.event_handler("on_utterance_started")`, called with the service and
the SDK's event): `on_session_ready` (`SessionReady`), `on_utterance_started`,
`on_utterance_ended`, `on_input_audio_cleared`, `on_avatar_error` (`Error`).

Tested with pipecat-ai 1.14.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from typing import Any

try:
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        SpeechOutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.utils.errors import ErrorCategory
except ImportError as exc:  # the extra is not installed
    from avatar_client.integrations import missing_extra

    raise missing_extra("pipecat", "pipecat-ai", "pipecat-ai 1.14", exc) from exc

from avatar_client.audio import SAMPLE_RATES
from avatar_client.client import AvatarSocket
from avatar_client.events import (
    Error,
    Event,
    InputAudioCleared,
    UtteranceEnded,
    UtteranceStarted,
)
from avatar_client.media import AvatarMedia, VideoImage
from avatar_client.playback import Change, PlaybackStarted, PlaybackTracker
from avatar_client.rest import SessionInfo, create_session, delete_session

log = logging.getLogger(__name__)

RESAMPLE_RATE = 24000  # TTS audio at a rate the server does not take is resampled to this
INTERRUPT_TIMEOUT_S = 5.0
_EVENTS = {UtteranceStarted: "on_utterance_started", UtteranceEnded: "on_utterance_ended",
           InputAudioCleared: "on_input_audio_cleared", Error: "on_avatar_error"}


class AvatarStreamVideoService(FrameProcessor):
    """An avatar-stream session in a Pipecat pipeline (see the module)."""

    def __init__(self, *, server: str = "http://127.0.0.1:8080", api_key: str | None = None,
                 session: SessionInfo | None = None,
                 session_fields: Mapping[str, Any] | None = None, video: str = "jpeg",
                 fps: float = 25.0, width: int | None = None, height: int | None = None,
                 sync_audio: bool = True, end_timeout_s: float = 30.0,
                 connect_timeout_s: float = 15.0, **kwargs: Any):
        """
        Args:
            server: the avatar server's base URL (used to create a session).
            api_key: the server's API key, if it has `[server] api_keys`.
            session: an existing session to drive instead of creating one (it is not ended
                at the end of the pipeline).
            session_fields: fields of `POST /v1/sessions` for a new session (`avatar`,
                `image` as base64, `prompt`, `size`, `seed`).
            video: "jpeg" (default: every frame decodes alone) or "h264" (less bandwidth).
            fps: video frames per second, 0 < fps <= 25 (taken evenly from 25).
            width, height: scale the video down (at most the session's size).
            sync_audio: push the avatar's audio, in sync with its video, instead of the TTS
                audio (Pipecat's convention); False passes the TTS audio on unchanged.
            end_timeout_s: how long an `EndFrame` waits for the avatar to finish speaking.
            connect_timeout_s: how long creating the session and connecting may take.
        """
        super().__init__(**kwargs)
        if video not in ("jpeg", "h264"):
            raise ValueError(f"video={video!r}: accepted 'jpeg' or 'h264'")
        if not 0 < fps <= 25:
            raise ValueError(f"fps={fps}: accepted 0 < fps <= 25")
        if end_timeout_s < 0 or connect_timeout_s <= 0:
            raise ValueError(f"end_timeout_s={end_timeout_s}, connect_timeout_s="
                             f"{connect_timeout_s}: accepted >= 0 and > 0")
        self._server = server
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None
        self._fields = dict(session_fields or {})
        self._output: dict[str, Any] = {"video": video, "audio": sync_audio, "fps": fps,
                                         **({"width": width} if width else {}),
                                         **({"height": height} if height else {})}
        self._sync_audio = sync_audio
        self._end_timeout_s = end_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._bot: AvatarSocket | None = None
        self._connect_error: Exception | None = None
        self._media: AvatarMedia | None = None
        self._media_task: asyncio.Task[None] | None = None
        self._interrupts: set[asyncio.Task[None]] = set()
        self._tracker = PlaybackTracker()
        self._progress = asyncio.Event()  # the tracker reported a change
        self._resampler = create_stream_resampler()
        self._closed = False
        self._lost: str | None = None  # why the avatar went away mid-pipeline
        for name in ("on_session_ready", *_EVENTS.values()):
            self._register_event_handler(name)

    @property
    def live(self) -> bool:
        """Is the avatar there? (If not, TTS audio passes on: the bot still speaks.)"""
        return self._bot is not None and not self._closed and self._lost is None

    @property
    def socket(self) -> AvatarSocket | None:
        """The SDK's connection to the session (None before setup or after the end)."""
        return self._bot

    @property
    def session(self) -> SessionInfo | None:
        return self._session

    def can_generate_metrics(self) -> bool:
        return True  # TTFB: from the first TTS audio to the avatar speaking it

    # 1. lifecycle ---------------------------------------------------------------------------

    async def setup(self, setup: Any) -> None:
        await super().setup(setup)
        try:  # connecting is slow start-up work: it belongs here, beside the other processors'
            await asyncio.wait_for(self._connect(), self._connect_timeout_s)
        except Exception as exc:
            self._connect_error = exc  # reported once the pipeline runs (at the StartFrame)
            log.error("avatar-stream: could not start a session on %s: %s", self._server, exc)

    async def _connect(self) -> None:
        if self._session is None:
            self._session = await create_session(self._server, self._api_key, **self._fields)
        self._bot = await AvatarSocket.connect(self._session)
        await self._bot.update(**self._output)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _start(self) -> None:
        if self._bot is None:
            await self.push_error(
                f"avatar-stream: no avatar session on {self._server} ({self._connect_error}); "
                "is `avatar serve` running there, and is the API key right?",
                exception=self._connect_error, category=ErrorCategory.CONNECTIVITY,
                force_treat_as_permanent=True)
            return
        await self._call_event_handler("on_session_ready", self._bot.ready)
        self._media = AvatarMedia(self._bot, self._on_event, fill_dropped=True)
        self._media_task = self.create_task(self._play(), "avatar-media")

    async def _close(self) -> None:
        """Idempotent: stop the media, close the socket, end a session this service made."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._interrupts):
            await self.cancel_task(task)
        if self._media_task is not None:
            await self.cancel_task(self._media_task)
        if self._media is not None:
            await self._media.aclose()
        if self._bot is not None:
            await self._bot.close()
        if self._owns_session and self._session is not None:
            with contextlib.suppress(Exception):  # gone already is fine at the end
                await delete_session(self._session)

    # 2. frames in ---------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if self.live:
                await self._guard(self._send_audio(frame))
            if not (self.live and self._sync_audio):
                await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStartedFrame):
            await self.start_ttfb_metrics()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            if self.live:
                await self._guard(self._end_utterance())
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._drain()
            await self._close()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._close()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _guard(self, work: Awaitable[None]) -> None:
        """Run a send; a connection that dropped meanwhile is reported once, not per frame."""
        try:
            await work
        except ConnectionError as exc:
            await self._gone(str(exc))

    async def _end_utterance(self) -> None:
        assert self._bot is not None
        await self._bot.end_utterance()
        await self._report(self._tracker.end())

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        bot = self._bot
        assert bot is not None
        audio, rate, channels = frame.audio, frame.sample_rate, frame.num_channels
        if channels not in (1, 2):
            await self.push_error(f"avatar-stream: TTS audio with {channels} channels; "
                                  "accepted 1 or 2", category=ErrorCategory.INVALID_REQUEST)
            return
        if rate not in SAMPLE_RATES:
            if channels == 2:  # the resampler takes mono: average the two channels
                import numpy as np

                pcm = np.frombuffer(audio, "<i2").reshape(-1, 2).mean(axis=1)
                audio, channels = pcm.astype("<i2").tobytes(), 1
            audio = await self._resampler.resample(audio, rate, RESAMPLE_RATE)
            rate = RESAMPLE_RATE
        if (bot.sample_rate, int(bot.audio_in.get("channels", 1))) != (rate, channels):
            await bot.update(sample_rate=rate, channels=channels)
        if audio and await bot.send_audio(audio):
            self._tracker.sent(len(audio) / 2 / channels / rate * 1000)

    def _interrupt(self) -> None:
        bot = self._bot
        if bot is None or not self.live:
            return
        self._tracker.interrupted()

        async def interrupt() -> None:
            try:
                await bot.interrupt(INTERRUPT_TIMEOUT_S)  # the cleared event comes via _on_event
            except (TimeoutError, ConnectionError) as exc:
                log.warning("avatar-stream: no answer to utterance.interrupt (%s)", exc)
                await self._report(self._tracker.finish_cut())

        # the ack takes up to a block's compute time: the interruption itself must not wait
        task = self.create_task(interrupt(), "avatar-interrupt")
        self._interrupts.add(task)
        task.add_done_callback(self._interrupts.discard)

    async def _drain(self) -> None:
        """Wait until the avatar has played everything sent (or `end_timeout_s` passed)."""
        if not self.live:
            return
        await self._guard(self._end_utterance())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._end_timeout_s
        while self.live and self._tracker.pending and (left := deadline - loop.time()) > 0:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        if self.live and self._tracker.pending:
            log.warning("avatar-stream: the avatar had not finished speaking after "
                        "end_timeout_s=%g s; ending anyway", self._end_timeout_s)

    # 3. media and events out ----------------------------------------------------------------

    async def _play(self) -> None:
        assert self._media is not None and self._bot is not None
        async for item in self._media:
            out: Frame
            if isinstance(item, VideoImage):
                image = OutputImageRawFrame(image=item.rgb, size=(item.width, item.height),
                                            format="RGB")
                image.sync_with_audio = self._sync_audio
                out = image
            elif self._sync_audio:
                out = SpeechOutputAudioRawFrame(audio=item.pcm, sample_rate=item.sample_rate,
                                                num_channels=1)
            else:
                continue
            out.metadata["avatar_pts_ms"] = item.pts  # session media time
            await self.push_frame(out)
        await self._gone(f"the connection closed ({self._bot.closed_reason})")

    async def _gone(self, why: str) -> None:
        if self._closed or self._lost is not None:
            return
        self._lost = why
        self._progress.set()  # a waiting EndFrame goes on
        await self.push_error(
            f"avatar-stream: the avatar is gone: {why}; the bot's TTS audio passes on "
            "without it", category=ErrorCategory.CONNECTIVITY, force_treat_as_permanent=True)

    async def _on_event(self, event: Event) -> None:
        await self._report(self._tracker.on_event(event))
        name = _EVENTS.get(type(event))
        if name is not None:
            await self._call_event_handler(name, event)
        if isinstance(event, Error) and not event.retryable:
            await self.push_error(f"avatar-stream: {event.code}: {event.message}",
                                  category=ErrorCategory.INVALID_REQUEST)

    async def _report(self, changes: list[Change]) -> None:
        if not changes:
            return
        self._progress.set()
        if any(isinstance(c, PlaybackStarted) for c in changes):
            await self.stop_ttfb_metrics()
