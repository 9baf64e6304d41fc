"""aiortc plumbing: ICE configuration, offer/answer with codec preferences, negotiated codec.

No public STUN server is ever used implicitly: aiortc's default (Google's STUN) is replaced by
the configured list, empty by default. `restrict_host_addresses` limits the host candidates aioice
gathers (multi-homed hosts, containers, and tests that must stay on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable

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


class PeerConnection(RTCPeerConnection):
    """aiortc's peer connection, made safe against hostile offers.

    aiortc 1.x can accept an offer that it applies only in part (an offer without one of the
    sections its BUNDLE group names, say): transceivers are left without a transport. Then
    its fire-and-forget connect task fails with an unretrieved exception, and `close()` fails
    half-way and leaves its "closed" future pending, so every later `close()` waits forever.
    Here the connect task's failure is caught and reported to `on_failure` (the session drops
    the peer), and `close()` finishes what aiortc's could not. tests/stream/test_fuzz.py feeds
    such offers, and checks that the private names used here still exist in aiortc.
    """

    def __init__(self, configuration: RTCConfiguration | None = None,
                 on_failure: Callable[[], object] | None = None):
        super().__init__(configuration)
        self._on_failure = on_failure

    async def _RTCPeerConnection__connect(self) -> None:  # the name aiortc's calls resolve to
        try:
            await super()._RTCPeerConnection__connect()  # type: ignore[misc]
        except Exception as exc:
            log.info("a peer connection could not start: %s: %s", type(exc).__name__, exc)
            await self.close()
            if self._on_failure is not None:
                self._on_failure()

    async def close(self) -> None:
        try:
            await super().close()
        except Exception as exc:
            log.info("closing a half set-up peer connection: %s: %s", type(exc).__name__, exc)
            for transceiver in self.getTransceivers():
                dtls = transceiver.receiver.transport
                for transport in (dtls, getattr(dtls, "transport", None)):
                    if transport is not None:
                        with contextlib.suppress(Exception):
                            await transport.stop()
            closed = getattr(self, "_RTCPeerConnection__isClosed", None)
            if isinstance(closed, asyncio.Future) and not closed.done():
                closed.set_result(True)
            self.remove_all_listeners()


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
    for number, line in enumerate(text.split("\n"), 1):
        if line.startswith("a=candidate:"):
            problem = candidate_problem(line[len("a=candidate:"):])
            if problem:
                raise ApiError(400, "malformed_sdp", f"line {number} ({line[:80]!r}): {problem}")
    return sdp


CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


def candidate_problem(value: str) -> str | None:
    """What is wrong with an ICE candidate ('foundation component transport priority address
    port typ type ...'), or None. Checked before aioice sees it: an address it cannot send to
    (a port past 65535, a name that is not a hostname) fails inside its socket's sendto, which
    asyncio reports as a fatal error of the whole transport, not as a bad candidate."""
    fields = value.split()
    if len(fields) < 8 or fields[6] != "typ":
        return "a candidate needs 'foundation component transport priority address port typ type'"
    component, transport, priority, address, port, kind = (fields[1], fields[2], fields[3],
                                                           fields[4], fields[5], fields[7])
    if not (component.isdigit() and priority.isdigit() and port.isdigit()):
        return "component, priority and port must be whole numbers"
    if not 0 <= int(port) <= 65535:
        return f"port {port} is out of 0..65535"
    if transport.lower() not in ("udp", "tcp"):
        return f"transport {transport!r} is not udp or tcp"
    if kind not in CANDIDATE_TYPES:
        return f"candidate type {kind!r} is not one of {', '.join(CANDIDATE_TYPES)}"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        # browsers hide host addresses behind mDNS names (RFC 8445 / draft-ietf-mmusic-mdns)
        if not re.fullmatch(r"[A-Za-z0-9-]{1,63}\.local", address):
            return f"address {address[:64]!r} is neither an IP address nor an mDNS .local name"
    return None


def offered_kinds(sdp: str) -> set[str]:
    """The media kinds ("audio", "video") the offer has a section for. Only those get a
    track: aiortc leaves a transceiver the offer does not cover without a transport, and its
    connect task then fails (a video-only WHEP player would never connect)."""
    return set(re.findall(r"(?m)^m=(audio|video) ", sdp.replace("\r\n", "\n")))


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
    (with candidates: aiortc gathers before it returns, so no trickle is needed). Any offer it
    cannot answer is a 400 that says why."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except (OperationError, InvalidAccessError, InvalidStateError) as exc:
        raise ApiError(400, "unsupported_offer", f"the offer cannot be answered: {exc} (the "
                       "server sends H.264 or VP8 video and Opus audio)") from None
    except Exception as exc:
        # aiortc's SDP handling is not hardened: hostile offers raise ValueError, KeyError,
        # IndexError, AssertionError, TypeError, even StopIteration (as RuntimeError)
        log.info("SDP offer rejected by aiortc: %s: %s", type(exc).__name__, exc)
        raise ApiError(400, "malformed_sdp", "the SDP offer was rejected: "
                       f"{exc or type(exc).__name__}") from None
    return pc.localDescription.sdp
