"""A WebRTC viewer's RTCP feedback, acted on: PLI/FIR -> a keyframe of the variant it watches;
REMB and receiver reports -> its `OutputGovernor`, which moves it along the session's ladder.

aiortc 1.16 handles RTCP inside `RTCRtpSender._handle_rtcp_packet`: a PLI or FIR sets a flag
that only its own encoder reads (a pre-encoded source never sees it) and a REMB only sets that
encoder's target bitrate. `tap_rtcp` wraps that one method on one sender instance (no class is
patched): aiortc's handler still runs first (RTT, NACK retransmission, stats), then ours. It
fails loudly if aiortc no longer has that method, and tests/stream/test_rtcp.py fails if aiortc
stops routing a viewer's PLI through it. aiortc implements no transport-wide congestion control
feedback (TWCC); REMB (`goog-remb`, which Chrome sends when TWCC is not negotiated) is the
bandwidth estimate.

What the governor is told, per video receiver report (about one a second):

- loss: the report's fraction lost;
- queue: frames waiting in the viewer's send queue;
- estimate: the REMB, but only as a limit when it says the path carries well under what the
  variant sends. A receiver that is not congested estimates from what it receives (at most
  1.5x the incoming rate, rising by about 8% a second), and an avatar's encoder often sends well
  under its nominal bitrate and jumps when the avatar starts talking, so an unconstrained
  estimate can sit far below the nominal bitrate of a variant that flows without trouble, and
  lag behind its actual one. A receiver that detects over-use reports 0.85x its incoming rate,
  which a busy host (a browser on a loaded laptop) does on clean paths too. So the estimate
  (the highest of the last `REMB_WINDOW_S`: a dip must last) counts only when it is under
  `REMB_LIMIT_RATIO` of what the variant sent over its last 5 s (at most its nominal rate);
  milder congestion shows as loss. It is then scaled by the variant's nominal/actual bitrate
  into the ladder's nominal units the governor compares against.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from aiortc import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from stream.governor import OutputGovernor, TierChange, ViewerReport
from stream.media.tracks import AvatarVideoTrack

log = logging.getLogger(__name__)

REMB_LIMIT_RATIO = 0.5
REMB_WINDOW_S = 2.0

RtcpHandler = Callable[[AnyRtcpPacket], Awaitable[None]]


def tap_rtcp(sender: RTCRtpSender, handler: RtcpHandler) -> None:
    """Also hand every RTCP packet routed to `sender` to `handler` (after aiortc's own)."""
    original = getattr(sender, "_handle_rtcp_packet", None)
    if original is None or not asyncio.iscoroutinefunction(original) or not hasattr(
            sender, "_ssrc"):
        raise RuntimeError(
            "this aiortc's RTCRtpSender has no async _handle_rtcp_packet / _ssrc (aiortc 1.16 "
            "has both): RTCP feedback cannot reach the pre-encoded video; adapt "
            "stream/media/feedback.py to the installed aiortc")

    async def handle(packet: AnyRtcpPacket) -> None:
        await original(packet)
        try:
            await handler(packet)
        except Exception:  # our bug must not break aiortc's RTCP handling
            log.exception("RTCP feedback handler failed on %s", type(packet).__name__)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


class ViewerFeedback:
    """Feedback of one viewer's video sender. `governor` None: keyframes only, no moves."""

    def __init__(self, track: AvatarVideoTrack, sender: RTCRtpSender,
                 governor: OutputGovernor | None, name: str,
                 on_change: Callable[[TierChange], None] | None = None):
        self.track = track
        self.sender = sender
        self.governor = governor
        self.name = name
        self.on_change = on_change
        self.remb_kbps: float | None = None  # the latest
        self._rembs: deque[tuple[float, float]] = deque()  # (when, kbit/s) of the last ones
        self.loss = 0.0
        self.reports = 0
        self.rembs = 0
        self.keyframe_requests = {"pli": 0, "fir": 0}
        self.moves = 0
        tap_rtcp(sender, self._on_rtcp)

    async def _on_rtcp(self, packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket):
            if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                cause = "pli" if packet.fmt == RTCP_PSFB_PLI else "fir"
                self.keyframe_requests[cause] += 1
                variant = self.track.consumer.variant
                if variant is not None:
                    variant.request_keyframe(cause)
            elif packet.fmt == RTCP_PSFB_APP:
                try:
                    bitrate, _ = unpack_remb_fci(packet.fci)
                except ValueError:
                    return  # an application-layer feedback that is not REMB
                self.rembs += 1
                self.remb_kbps = bitrate / 1000
                now = time.monotonic()
                self._rembs.append((now, self.remb_kbps))
                while self._rembs[0][0] < now - REMB_WINDOW_S:
                    self._rembs.popleft()
        elif isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            ssrc = self.sender._ssrc
            for report in packet.reports:
                if report.ssrc == ssrc:
                    await self._on_report(report.fraction_lost / 256)

    def estimate(self) -> float | None:
        """The REMB as a limit in the ladder's nominal kbit/s, or None (see the module doc)."""
        variant = self.track.consumer.variant
        now = time.monotonic()
        recent = [kbps for at, kbps in self._rembs if at >= now - REMB_WINDOW_S]
        if not recent or variant is None:
            return None
        remb = max(recent)
        sent = min(variant.sent_kbps() or 0.0, variant.bitrate_kbps)
        if not sent or remb >= REMB_LIMIT_RATIO * sent:
            return None
        return remb * variant.bitrate_kbps / sent

    async def _on_report(self, loss: float) -> None:
        self.reports += 1
        self.loss = loss
        if self.governor is None:
            return
        report = ViewerReport(estimate_kbps=self.estimate(), loss=loss,
                              queue_frames=self.track.consumer.pending_video())
        change = self.governor.observe(report)
        if change is None:
            return
        self.moves += 1
        log.info("viewer %s moves to rung %d: %s", self.name, change.new, change.reason)
        await self.track.move_to(change.new)
        if self.on_change is not None:
            self.on_change(change)

    def figures(self) -> dict:
        return {"rung": self.track.rung, "moves": self.moves, "loss": round(self.loss, 3),
                "remb_kbps": None if self.remb_kbps is None else round(self.remb_kbps),
                "reports": self.reports, "keyframe_requests": dict(self.keyframe_requests)}
