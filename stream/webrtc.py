"""aiortc plumbing: ICE configuration, offer/answer with codec preferences, negotiated codec.

No public STUN server is ever used implicitly: aiortc's default (Google's STUN) is replaced by
the configured list, empty by default. `restrict_host_addresses` limits the host candidates aioice
gathers (multi-homed hosts, containers, and tests that must stay on loopback).
"""

from __future__ import annotations

import logging
import re

import aioice.ice
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError

from stream.config import WebRTCConfig
from stream.errors import ApiError

log = logging.getLogger(__name__)

_original_host_addresses = aioice.ice.get_host_addresses


def restrict_host_addresses(addresses: tuple[str, ...]) -> None:
    """Process-wide: gather ICE host candidates only on `addresses` (empty: every interface)."""
    if not addresses:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    wanted = list(addresses)

    def only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in wanted if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = only


def rtc_configuration(cfg: WebRTCConfig) -> RTCConfiguration:
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in cfg.ice_servers]
    return RTCConfiguration(iceServers=servers)


def ice_servers_json(cfg: WebRTCConfig) -> list[dict]:
    """The ICE servers in the form browsers take (RTCConfiguration.iceServers)."""
    return [dict(s) for s in cfg.ice_servers]


def check_offer_sdp(sdp: object) -> str:
    """A plausible SDP offer, or a 400 that says what is wrong."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise ApiError(400, "malformed_sdp", "the offer has no SDP text")
    if len(sdp) > 64_000:
        raise ApiError(400, "malformed_sdp", "the SDP offer is larger than 64 kB")
    text = sdp.replace("\r\n", "\n")
    if not text.startswith("v=0") or "\nm=" not in text:
        raise ApiError(400, "malformed_sdp", "not an SDP offer: it must start with 'v=0' and "
                       "contain media sections ('m=' lines)")
    if not re.search(r"\nm=(audio|video) ", text):
        raise ApiError(400, "malformed_sdp", "the offer has neither an audio nor a video section")
    return sdp


def prefer_codecs(pc: RTCPeerConnection, kind: str, order: tuple[str, ...]) -> None:
    """Set codec preferences on every transceiver of `kind` (before setRemoteDescription)."""
    caps = RTCRtpSender.getCapabilities(kind).codecs
    ranked = []
    for name in order:
        ranked += [c for c in caps if c.mimeType.lower() == f"{kind}/{name}".lower()]
    ranked += [c for c in caps if c.mimeType.lower() == f"{kind}/rtx"]
    for t in pc.getTransceivers():
        if t.kind == kind:
            t.setCodecPreferences(ranked)


def negotiated_video_codec(sdp: str) -> str | None:
    """The first codec of the answer's video section ("H264", "VP8", ...), if it has one."""
    section = re.split(r"\r?\nm=", sdp)
    for part in section:
        if part.startswith("video "):
            fields = part.split("\n", 1)[0].split()
            if len(fields) < 4:
                return None
            pt = fields[3]
            m = re.search(rf"a=rtpmap:{pt} ([A-Za-z0-9]+)/", part)
            return m.group(1).upper() if m else None
    return None


async def answer_offer(pc: RTCPeerConnection, offer_sdp: str) -> str:
    """setRemoteDescription(offer) + createAnswer + setLocalDescription; returns the answer SDP
    (with candidates: aiortc gathers before it returns, so no trickle is needed)."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    except (ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ApiError(400, "malformed_sdp", f"the SDP offer was rejected: {exc}") from None
    except (OperationError, InvalidAccessError, InvalidStateError) as exc:
        raise ApiError(400, "unsupported_offer", f"the offer cannot be answered: {exc} (the "
                       "server sends H.264 or VP8 video and Opus audio)") from None
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except (OperationError, InvalidAccessError, InvalidStateError) as exc:
        raise ApiError(400, "unsupported_offer", f"the offer cannot be answered: {exc} (the "
                       "server sends H.264 or VP8 video and Opus audio)") from None
    return pc.localDescription.sdp
