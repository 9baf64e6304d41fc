"""A session's media fan-out: one pacer, one encoder per output variant, shared by every consumer.

    FramePacer (one per session, on the clock) --tick--> VideoVariant (codec, size, fps, rate)
        --encoded access unit--> MediaConsumer, MediaConsumer, ...   (each its own bounded queue)
    FramePacer --40 ms of audio--> AudioVariant (Opus, AAC) or as PCM --> consumers that want it

This is the media output of the server: WebRTC video and audio tracks (stream/media/tracks.py),
the MPEG-TS feed (stream/media/ts_feed.py) and WebSocket media (stream/ws/) are all consumers
here, so N viewers of a variant cost one encode, and the pacing is decided in one place. A
variant (and its encoder) exists only while it has consumers; the pacer only while anything does.
Consumers move between variants with `subscribe` (joining the new one at a keyframe).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from engine.api import FPS
from stream.config import MediaConfig
from stream.governor import OutputVariant
from stream.media.consumer import MediaConsumer, MediaPacket
from stream.media.pacer import FramePacer, Tick
from stream.media.timeline import SAMPLES_PER_VIDEO_FRAME, FrameStore, MediaClock, PlayoutAudio
from stream.media.variant import (
    AUDIO_CODECS,
    AudioVariant,
    VariantKey,
    VideoVariant,
    bitrate_for,
    ladder_for,
)

# re-exported: what a consumer of the fan-out needs
__all__ = ["MediaConsumer", "MediaPacket", "SessionMedia", "VariantKey"]


def _audio_codec(audio: bool | str | None) -> str | None:
    if audio is True:
        return "pcm"
    if not audio:
        return None
    if audio not in AUDIO_CODECS:
        raise ValueError(f"audio {audio!r}: accepted {AUDIO_CODECS}, True (pcm) or None")
    return str(audio)


class SessionMedia:
    """The fan-out of one session: a pacer, variants made on demand, audio for who wants it.

    `size` is the session's video size (the ladder follows its aspect)."""

    def __init__(self, clock: MediaClock, frames: FrameStore, playout: PlayoutAudio,
                 media: MediaConfig, executor: Executor, name: str,
                 size: tuple[int, int] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 pause_dbfs: float = -40.0):
        self.media = media
        self.on_failure = on_failure  # an encoder that keeps failing: the session ends
        self.executor = executor
        self.name = name
        self.size = size
        self.ladder: tuple[OutputVariant, ...] = ladder_for(media.variants, size) if size else ()
        self.pacer = FramePacer(clock, frames, playout, name=f"pacer-{name}",
                                pause_dbfs=pause_dbfs)
        self.variants: dict[VariantKey, VideoVariant] = {}
        self.audio: dict[str, AudioVariant] = {}
        self._pcm: set[MediaConsumer] = set()
        self.consumers: set[MediaConsumer] = set()
        self._subscribed = False

    def rung(self, codec: str, index: int) -> VariantKey:
        """The variant of ladder rung `index` in `codec`."""
        return VariantKey.of(codec, self.ladder[index])

    def video_key(self, codec: str, width: int, height: int, fps: float) -> VariantKey:
        """A client's own choice of output: the ladder's rung where it names one (then it
        shares that rung's encoder), else its size's default bitrate (JPEG: none)."""
        if codec == "jpeg":
            return VariantKey(codec, width, height, fps)
        for rung in self.ladder:
            if (rung.width, rung.height, rung.fps) == (width, height, fps):
                return VariantKey.of(codec, rung)
        return VariantKey(codec, width, height, fps, bitrate_for(
            self.media, self.size or (width, height), width, height))

    def _on_tick(self, tick: Tick) -> None:
        for variant in self.variants.values():
            variant.on_tick(tick)
        for encoder in self.audio.values():
            encoder.on_tick(tick)
        # PCM follows media time (a socket's audio is gap-free in media time): a tick of
        # silence the pacer inserts is not media; a media frame it drops still is
        if self._pcm and not tick.inserted:
            packet = MediaPacket("audio", tick.pts_ms, 1000 // FPS, tick.audio.tobytes(),
                                 sample=tick.index * SAMPLES_PER_VIDEO_FRAME)
            for consumer in list(self._pcm):
                consumer.offer_audio(packet)

    async def subscribe(self, consumer: MediaConsumer, video: VariantKey | None,
                        audio: bool | str | None = None) -> None:
        """(Re)subscribe `consumer` to `video` (None: no video) and `audio` ("pcm" or True,
        "opus", "aac"; None or False: none). Unchanged parts stay as they are."""
        codec = _audio_codec(audio)
        old = consumer.variant
        if old is None or old.key != video:
            if video is not None:
                variant = self.variants.get(video)
                if variant is None:
                    variant = self.variants[video] = VideoVariant(
                        video, self.media, self.executor, f"encode-{self.name}-{video.name}",
                        bitrate_for(self.media, self.size or (video.width, video.height),
                                    video.width, video.height), on_failure=self.on_failure)
                variant.consumers.add(consumer)
                consumer.join(variant)
            else:
                consumer.join(None)
            if old is not None:
                await self._leave(old, consumer)
        if consumer.audio_codec != codec:
            await self._leave_audio(consumer)
            consumer.audio_codec = codec
            if codec == "pcm":
                self._pcm.add(consumer)
            elif codec is not None:
                encoder = self.audio.get(codec)
                if encoder is None:
                    encoder = self.audio[codec] = AudioVariant(
                        codec, self.media, self.executor, f"encode-{self.name}-{codec}",
                        on_failure=self.on_failure)
                encoder.consumers.add(consumer)
        self.consumers.add(consumer)
        await self._update_pacer()

    async def unsubscribe(self, consumer: MediaConsumer) -> None:
        old = consumer.variant
        consumer.join(None)
        if old is not None:
            await self._leave(old, consumer)
        await self._leave_audio(consumer)
        consumer.audio_codec = None
        self.consumers.discard(consumer)
        await self._update_pacer()

    async def _leave(self, variant: VideoVariant, consumer: MediaConsumer) -> None:
        variant.consumers.discard(consumer)
        if not variant.consumers and self.variants.get(variant.key) is variant:
            del self.variants[variant.key]  # the last viewer of this variant: its encoder goes
            await variant.aclose()

    async def _leave_audio(self, consumer: MediaConsumer) -> None:
        self._pcm.discard(consumer)
        codec = consumer.audio_codec
        encoder = self.audio.get(codec) if codec else None
        if encoder is not None:
            encoder.consumers.discard(consumer)
            if not encoder.consumers:
                del self.audio[encoder.codec]
                await encoder.aclose()

    async def _update_pacer(self) -> None:
        wanted = bool(self.variants or self.audio or self._pcm)
        if wanted and not self._subscribed:
            self.pacer.subscribe(self._on_tick)
            self._subscribed = True
        elif self._subscribed and not wanted:
            self._subscribed = False
            await self.pacer.unsubscribe(self._on_tick)

    def figures(self) -> dict:
        """Per variant and per consumer: what /metrics and the session info show."""
        pacer = self.pacer
        return {
            "pacer": {"ticks": pacer.ticks, "jumps": pacer.jumps, "skipped": pacer.skipped,
                      "repeated": pacer.repeated, "inserted": pacer.inserted,
                      "dropped": pacer.dropped},
            "variants": [v.figures() for v in self.variants.values()],
            "audio": [a.figures() for a in self.audio.values()],
            "consumers": [{"name": c.name, "kind": c.kind,
                           "variant": c.variant.key.name if c.variant else None,
                           **c.figures()} for c in self.consumers],
        }

    async def aclose(self) -> None:
        for variant in list(self.variants.values()):
            await variant.aclose()
        for encoder in list(self.audio.values()):
            await encoder.aclose()
        for consumer in self.consumers:
            consumer.close()
        self.variants.clear()
        self.audio.clear()
        self._pcm.clear()
        self.consumers.clear()
        self._subscribed = False
        await self.pacer.aclose()
