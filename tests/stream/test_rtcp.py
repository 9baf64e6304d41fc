"""RTCP feedback reaches the shared encoders: a viewer's PLI or FIR gets it a keyframe at once
(rate-limited per variant), and a viewer whose path cannot carry its variant is moved to a
smaller one while the others stay on the best."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiortc.rtp import RTCP_PSFB_FIR, RtcpPsfbPacket

from stream.config import MediaConfig, SessionsConfig
from stream.media.feedback import tap_rtcp
from tests.media import png_base64, textured_face
from tests.stream.conftest import Running, make_config, start_server
from tests.stream.rtc_client import Bottleneck, Client, wait_for, watch_keyframes, whep


@pytest.fixture
async def quiet_gop() -> AsyncIterator[Running]:
    """Periodic keyframes only every 10 s: any keyframe in between was asked for."""
    runner, base = await start_server(make_config(media=MediaConfig(keyframe_interval_s=10.0)))
    async with ClientSession() as http:
        yield Running(runner.app, base, http)
    await runner.cleanup()


def video_receiver(client: Client):  # noqa: ANN201
    return next(t.receiver for t in client.pc.getTransceivers() if t.kind == "video")


async def keyframe_after(client: Client, arrivals: list[float], send) -> float:  # noqa: ANN001
    """Seconds from sending feedback (`send()`) until the next keyframe arrives."""
    seen = len(arrivals)
    sent = time.monotonic()
    await send()
    assert await wait_for(lambda: len(arrivals) > seen, 2.0, interval=0.005), "no keyframe"
    return arrivals[seen] - sent


async def test_pli_and_fir_get_a_keyframe_within_200_ms(quiet_gop: Running) -> None:
    s = await quiet_gop.create()
    viewer = await whep(quiet_gop.http, s)
    arrivals = watch_keyframes(viewer)
    try:
        assert await wait_for(lambda: len(viewer.recording.video) >= 10, 20)
        receiver = video_receiver(viewer)
        await asyncio.sleep(0.5)
        ssrc = viewer.video_ssrc
        assert ssrc is not None
        delays = []
        for _ in range(3):
            delays.append(await keyframe_after(viewer, arrivals,
                                               lambda: receiver._send_rtcp_pli(ssrc)))
            await asyncio.sleep(1.1)  # the token bucket refills (1 a second)
        fir = RtcpPsfbPacket(fmt=RTCP_PSFB_FIR, ssrc=1, media_ssrc=ssrc,
                             fci=ssrc.to_bytes(4, "big") + b"\x01\x00\x00\x00")
        delays.append(await keyframe_after(viewer, arrivals, lambda: receiver._send_rtcp(fir)))
        frames = len(viewer.recording.video)
        assert await wait_for(lambda: len(viewer.recording.video) > frames + 10, 5)  # decoding
        session = quiet_gop.manager.get(s["session_id"])
        (variant,) = session.media.variants.values()
        print(f"\nkeyframe after PLI/FIR: {[round(d * 1000) for d in delays]} ms; "
              f"keyframes by cause {dict(variant.keyframes)}")
        assert max(delays) < 0.2, delays
        requested = variant.keyframe_requests.requested
        assert requested["pli"] == 3 and requested["fir"] == 1, requested
        # every keyframe seen was one asked for (a request waiting for another cause, such as a
        # join under load, can be the label the PLI's keyframe is counted under)
        assert variant.keyframes["periodic"] == 0

        # a flood of PLIs (50 a second for 2 s) cannot turn the stream into keyframes: a burst
        # of 2, then at most media.keyframe_requests_per_s (1) a second
        before = sum(variant.keyframes.values())
        for _ in range(100):
            await receiver._send_rtcp_pli(ssrc)
            await asyncio.sleep(0.02)
        made = sum(variant.keyframes.values()) - before
        assert 2 <= made <= 2 + 1 * 2.5, made
        assert variant.keyframe_requests.coalesced > 80

        # /metrics: keyframes by cause and encode time per variant, what each viewer got
        async with quiet_gop.http.get(f"{quiet_gop.base}/metrics") as r:
            text = await r.text()
        sid, name = s["session_id"], variant.key.name
        assert f'avatar_media_keyframes_total{{cause="pli",session="{sid}",variant="{name}"}} ' \
            f'{variant.keyframes["pli"]}' in text
        assert f'avatar_media_consumers{{session="{sid}",variant="{name}"}} 1' in text
        assert f'avatar_media_encode_seconds_total{{session="{sid}",variant="{name}"}}' in text
        sent = next(line for line in text.splitlines()
                    if line.startswith("avatar_viewer_frames_sent_total{")
                    and f'session="{sid}"' in line and 'kind="webrtc"' in line)
        assert float(sent.rsplit(" ", 1)[1]) >= len(viewer.recording.video) - 5
        assert "avatar_viewer_send_queue_frames{" in text
    finally:
        await viewer.close()


async def test_tapping_needs_aiortcs_rtcp_handler() -> None:
    async def nothing(packet: object) -> None:
        return None

    with pytest.raises(RuntimeError, match="adapt"):
        tap_rtcp(object(), nothing)  # type: ignore[arg-type]


async def test_a_limited_viewer_moves_down_and_the_others_stay_on_top(tmp_path: Path) -> None:
    runner, base = await start_server(make_config(
        sessions=SessionsConfig(default_size="704*384")))
    try:
        async with ClientSession() as http:
            running = Running(runner.app, base, http)
            s = await running.create(image=png_base64(textured_face(704, 384), tmp_path))
            assert (s["video"]["width"], s["video"]["height"]) == (704, 384)
            good = await whep(http, s)
            limited = await whep(http, s)
            bottleneck = Bottleneck(limited, kbps=500, queue_s=0.5)
            session = running.manager.get(s["session_id"])
            peers = {c: session.peers[c.location.rsplit("/", 1)[1]] for c in (good, limited)}
            try:
                assert await wait_for(lambda: len(good.recording.video) >= 25, 20)
                assert await wait_for(lambda: peers[limited].video.rung > 0, 20), (
                    peers[limited].feedback.figures(), bottleneck.dropped)
                top = session.media.ladder[0]

                def decoding_small(seconds: float = 2.0) -> bool:
                    """The limited viewer decoded a smaller picture for `seconds` now."""
                    recent = [v for v in limited.recording.video
                              if v[1] > time.monotonic() - seconds]
                    return (limited.recording.video_size != (top.width, top.height)
                            and len(recent) >= 0.6 * 12.5 * seconds)

                count = len(good.recording.video)
                start = time.monotonic()
                # aiortc's jitter buffer holds every frame behind a lost packet until 128 newer
                # ones pushed it out, so this client takes a while to show the new picture
                settled = await wait_for(decoding_small, 30)
                elapsed = time.monotonic() - start
                governor = peers[limited].feedback.governor
                assert governor is not None
                reached = min(session.media.ladder[c.new].bitrate_kbps for c in governor.changes)
                print(f"\nlimited viewer: {peers[limited].feedback.figures()}, moves "
                      f"{[c.reason for c in governor.changes]}, decoding again after "
                      f"{elapsed:.1f} s; the bottleneck passed {bottleneck.passed} and dropped "
                      f"{bottleneck.dropped} packets; the other viewer: "
                      f"{peers[good].feedback.figures()}")
                # the limited viewer was moved to a variant its path carries, and decodes it
                assert settled and reached < 500 and peers[limited].video.rung > 0
                # the other one never left the top and kept its 25 fps throughout
                assert peers[good].video.rung == 0 and peers[good].feedback.moves == 0
                assert len(good.recording.video) - count >= 25 * elapsed * 0.8
                assert good.recording.video_size == (top.width, top.height)
            finally:
                for c in (good, limited):
                    await c.close()
    finally:
        await runner.cleanup()
