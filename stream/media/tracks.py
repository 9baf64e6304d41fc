"""aiortc tracks of one WebRTC viewer: the avatar's video and audio, pre-encoded by the session.

Neither track paces or encodes anything: each is a `MediaConsumer` of the session's fan-out
(stream/media/fanout.py), whose one pacer releases every frame and audio slice at t0 + delay +
media time for all viewers at once, so every viewer shows the same media time at the same wall
time and audio and video agree. `recv` hands aiortc the next encoded packet (`av.Packet`, which
aiortc only packetizes): H.264 or VP8 from the viewer's output variant (a rung of the session's
ladder, moved by stream/media/feedback.py), and Opus (one 40 ms packet per tick, encoded once per
session). The tracks subscribe on aiortc's first `recv` (once the connection is up), so a viewer
that never connects costs no encoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream.media.consumer import MediaConsumer, MediaPacket
from stream.media.encoder import AUDIO_TIME_BASE, VIDEO_TIME_BASE
from stream.media.fanout import SessionMedia
from stream.media.variant import VariantKey

CODECS = {"H264": "h264", "VP8": "vp8"}  # negotiated name -> variant codec


class _ConsumerTrack(MediaStreamTrack):
    """A track whose packets come from one MediaConsumer of the session's fan-out."""

    def __init__(self, media: SessionMedia, name: str, kind: str):
        super().__init__()
        self.media = media
        self.consumer = MediaConsumer(name, kind=kind)
        self._subscribed = False
        self._subscribing = asyncio.Lock()

    async def _subscribe(self) -> None:
        raise NotImplementedError

    async def _next(self) -> MediaPacket:
        if not self._subscribed:
            async with self._subscribing:
                if not self._subscribed and self.readyState == "live":
                    await self._subscribe()
                    self._subscribed = True
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            packet = self.consumer.get_nowait()
            if packet is not None:
                return packet
            if self.consumer.closed:  # the session's media is gone
                raise MediaStreamError
            await self.consumer.wait()

    def stop(self) -> None:
        super().stop()
        self.consumer.close()  # wake a recv waiting for media

    async def detach(self) -> None:
        """Leave the fan-out (the peer is going away)."""
        self.stop()
        async with self._subscribing:
            self._subscribed = True  # a late first recv must not subscribe again
            await self.media.unsubscribe(self.consumer)


class AvatarVideoTrack(_ConsumerTrack):
    kind = "video"

    def __init__(self, media: SessionMedia, name: str = "video",
                 on_sent: Callable[[MediaPacket], None] | None = None):
        super().__init__(media, name, "webrtc")
        self.on_sent = on_sent
        self.codec = "VP8"  # set to the negotiated codec before the connection starts
        self.rung = 0  # the ladder rung this viewer gets

    @property
    def variant_key(self) -> VariantKey:
        return self.media.rung(CODECS.get(self.codec, "vp8"), self.rung)

    async def _subscribe(self) -> None:
        await self.media.subscribe(self.consumer, self.variant_key, audio=None)

    async def move_to(self, rung: int) -> None:
        """Switch to ladder rung `rung` (from its next keyframe)."""
        self.rung = rung
        async with self._subscribing:
            if self._subscribed and self.readyState == "live":
                await self._subscribe()

    async def recv(self) -> av.Packet:
        packet = await self._next()
        out = av.Packet(packet.data)
        out.pts = packet.out  # RTP timestamps follow the output timeline
        out.time_base = VIDEO_TIME_BASE
        if self.on_sent is not None:
            self.on_sent(packet)
        return out


class AvatarAudioTrack(_ConsumerTrack):
    """The session's input audio, played out at the same media time as the video."""

    kind = "audio"

    def __init__(self, media: SessionMedia, name: str = "audio"):
        super().__init__(media, name, "webrtc-audio")

    async def _subscribe(self) -> None:
        await self.media.subscribe(self.consumer, None, audio="opus")

    async def recv(self) -> av.Packet:
        packet = await self._next()
        out = av.Packet(packet.data)
        out.pts = packet.sample if packet.sample is not None else packet.pts_ms * 48
        out.time_base = AUDIO_TIME_BASE
        return out

