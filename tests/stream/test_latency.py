"""The latency wiring: a session's controller (stream/latency.py) feeding the governor and the
playout delay, the pacer changing the delay only at pauses, admission and /readyz by measured
capacity, and a governed session announcing `tier.changed` to its bot (schema-checked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest
from aiohttp import ClientSession

from engine.api import BlockTimings, FrameBlock
from engine.config import EngineConfig
from engine.preview import PreviewEngine
from stream.app import build_app
from stream.config import LatencyConfig, SessionsConfig, StreamConfig
from stream.governor import GenerationTier
from stream.latency import LatencyController
from stream.media.audio_in import Arrivals
from stream.media.pacer import FramePacer, Tick
from stream.media.timeline import SAMPLES_PER_VIDEO_FRAME, FrameStore, MediaClock, PlayoutAudio
from stream.metrics import Metrics
from tests.stream.conftest import make_config
from tests.stream.ws_client import WsClient, tone

LADDER = (GenerationTier("448*256", 4), GenerationTier("352*192", 4),
          GenerationTier("256*144", 4), GenerationTier("256*144", 3))


class FakeEngine:
    """The runtime as a controller sees it: records what it is told."""

    def __init__(self) -> None:
        self.tiers: list[tuple[str | None, int | None]] = []
        self.delays: list[float] = []

    def set_tier(self, size: str | None, steps: int | None,
                 on_done: Callable[[BaseException | None], None]) -> None:
        self.tiers.append((size, steps))
        on_done(None)

    def set_playout_delay(self, seconds: float) -> None:
        self.delays.append(seconds)

    def sharing(self) -> int:
        return 1


def block(index: int, busy: float, tier: GenerationTier, setup: float = 0.0) -> FrameBlock:
    w, h = (int(p) for p in tier.size.split("*"))
    return FrameBlock(index, index * 12, np.zeros((12, h, w, 3), np.uint8),
                      BlockTimings(denoise=busy, total=busy + setup, busy=busy, setup=setup),
                      tier=(tier.size, tier.steps))


def controller(governor: bool = True) -> tuple[LatencyController, FakeEngine, Metrics, list]:
    clock = MediaClock(time.monotonic(), 1.2)
    pacer = FramePacer(clock, FrameStore(100), PlayoutAudio(30.0))
    engine, metrics, changes = FakeEngine(), Metrics(), []
    ctl = LatencyController("s", LatencyConfig(governor=governor, generation_ladder=LADDER),
                            clock, pacer, Arrivals(), engine, metrics, "448*256", 4, 0.15,
                            on_change=changes.append)
    return ctl, engine, metrics, changes


def test_a_slow_engine_is_stepped_down_once_and_announced() -> None:
    ctl, engine, metrics, changes = controller()
    t0 = ctl.clock.t0
    # 2x slower than real time at the top: one block is enough (far over budget)
    ctl.on_block(block(0, 0.96, LADDER[0]), t0 + 1.2)
    assert engine.tiers == [("256*144", None)]  # straight to the first rung that fits
    assert [str(c.tier) for c in changes] == ["256x144/4 steps"]
    assert "load 2.00" in changes[0].reason
    # the blocks still in flight at the old tier, and the one paying for the change, are
    # not counted against the new tier
    ctl.on_block(block(1, 0.96, LADDER[0]), t0 + 2.2)
    ctl.on_block(block(2, 0.31, LADDER[2], setup=0.31), t0 + 2.8)
    for i in range(3, 60):  # then it holds: the rung fits (load 0.64), the one above does not
        ctl.on_block(block(i, 0.31, LADDER[2]), t0 + 0.48 * i + 1.0)
    assert len(changes) == 1
    sample = metrics.registry.get_sample_value("avatar_tier_changes_total",
                                               {"kind": "generation", "reason": "governor"})
    assert sample == 1.0
    fig = ctl.figures()
    assert fig["generation"]["changes"] == 1 and fig["generation"]["rung"] == 2
    assert fig["generation"]["last_change"]["to"] == "256x144/4 steps"


def test_without_the_governor_the_tier_stays_and_the_delay_grows() -> None:
    ctl, engine, _, changes = controller(governor=False)
    t0 = ctl.clock.t0
    for i in range(10):  # each block done 0.96 s after its media start, later every time
        ctl.on_block(block(i, 0.96, LADDER[0]), t0 + 0.48 * i + 0.96 * (i + 1))
    assert engine.tiers == [] and changes == []
    # the delay heads for the worst lag plus the margin (the pacer moves it at pauses)
    lag = 0.96 * 10 - 0.48 * 9 + 0.15
    assert ctl.pacer.target_delay == pytest.approx(min(3.0, lag), abs=0.01)


def test_frame_sent_completes_the_blocks_latency_record() -> None:
    ctl, _, metrics, _ = controller(governor=False)
    t0 = ctl.clock.t0
    ctl.arrivals.record(0, 16000, t0 + 0.02)  # the first second of audio arrived at once
    ctl.on_block(block(0, 0.3, LADDER[0]), t0 + 0.95)
    from stream.media.consumer import MediaPacket

    ctl.frame_sent(MediaPacket("video", 0, 40, b"", encoded_at=t0 + 1.25), now=t0 + 1.26)
    stages = ctl.figures()["latency"]["stages_ms"]
    # received 20 ms after its media time: started at 0.65, decoded at 0.95, encoded at 1.25
    assert stages == {"wait": 630, "compute": 300, "buffer": 300, "send": 10, "total": 1240}
    count = metrics.registry.get_sample_value("avatar_latency_seconds_count", {"stage": "total"})
    assert count == 1.0


async def test_the_pacer_changes_the_delay_only_at_pauses() -> None:
    """Speech 0.8 s, a pause 0.8 s, speech, a pause, speech: the delay grows by 0.2 s (ticks of
    silence inserted) and then shrinks back (silent media frames dropped), only in the pauses;
    every speech frame's audio goes out once and in order."""
    loud = [range(0, 20), range(40, 60), range(80, 100)]
    audio = np.zeros(100 * SAMPLES_PER_VIDEO_FRAME, np.int16)
    for span in loud:
        audio[span.start * SAMPLES_PER_VIDEO_FRAME:span.stop * SAMPLES_PER_VIDEO_FRAME] = 8000
    clock = MediaClock(time.monotonic(), 0.0)
    playout = PlayoutAudio(30.0)
    playout.write(0, audio)
    pacer = FramePacer(clock, FrameStore(200), playout)
    ticks: list[Tick] = []
    past: dict[int, asyncio.Event] = {45: asyncio.Event(), 99: asyncio.Event()}

    def on_tick(tick: Tick) -> None:
        ticks.append(tick)
        for n, event in past.items():
            if tick.index >= n:
                event.set()

    pacer.subscribe(on_tick)
    pacer.set_target_delay(0.2)
    await asyncio.wait_for(past[45].wait(), 10)
    pacer.set_target_delay(0.0)
    await asyncio.wait_for(past[99].wait(), 10)
    await pacer.aclose()
    inserted = [t.index for t in ticks if t.inserted]
    dropped = [t.index for t in ticks if t.dropped]
    assert len(inserted) == 5 and len(dropped) == 5
    speech = {n for span in loud for n in span}
    around = {n + d for n in speech for d in range(-3, 3)}
    assert not set(inserted) & around and not set(dropped) & around
    played = [t.index for t in ticks if not t.inserted and not t.dropped]
    assert [n for n in played if n in speech] == sorted(speech)  # each once, in order
    outs = [t.out_index for t in ticks if not t.dropped]
    assert outs == list(range(outs[0], outs[0] + len(outs)))  # a steady output clock
    assert pacer.shift == 0 and clock.delay == pytest.approx(0.0)


def slow_config(speed: float, **latency) -> tuple[StreamConfig, PreviewEngine]:
    cfg = make_config(sessions=SessionsConfig(default_size="448*256"),
                      latency=LatencyConfig(generation_ladder=LADDER, **latency))
    return cfg, PreviewEngine(EngineConfig(max_size="448*256", preview_speed=speed))


async def serve(cfg: StreamConfig, engine: PreviewEngine):  # noqa: ANN201
    from aiohttp import web

    runner = web.AppRunner(build_app(cfg, engine), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_readyz_and_admission_go_by_the_measured_cost() -> None:
    # 5x slower than real time: even 256x144 at 3 steps needs 1.6x real time
    runner, base = await serve(*slow_config(0.2))
    try:
        async with ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                ready = await r.json()
            assert r.status == 503 and ready["status"] == "too_slow", ready
            assert ready["block_cost"] == {"tier": "448x256/4 steps", "block_ms": 2400,
                                           "source": "cost model"}
            assert [t["tier"] for t in ready["tiers"]] == [str(t) for t in LADDER]
            assert "cheapest tier (256x144/3 steps)" in ready["error"]
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "capacity_exhausted", body
            assert "even at its cheapest tier" in body["error"]["message"]
    finally:
        await runner.cleanup()
    # 2x slower: ready, and the capacity is counted at the rungs that fit
    runner, base = await serve(*slow_config(0.5))
    try:
        async with ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                ready = await r.json()
            assert r.status == 200 and ready["status"] == "ready", ready
            fits = {t["tier"]: t["sessions"] for t in ready["tiers"]}
            assert fits == {"448x256/4 steps": 0, "352x192/4 steps": 0, "256x144/4 steps": 1,
                            "256x144/3 steps": 1}
            assert ready["capacity"] == 1
    finally:
        await runner.cleanup()


async def test_a_governed_session_tells_its_bot_and_metrics() -> None:
    runner, base = await serve(*slow_config(0.5))
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                s = await r.json()
                assert r.status == 201, s
            bot = await WsClient.connect(s)
            await bot.send({"type": "session.update", "audio_in": {"sample_rate": 16000},
                            "output": {"video": "none", "audio": False},
                            "stats_interval_ms": 500})
            await bot.wait("session.updated")
            await bot.send(tone(3.0))
            change = await bot.wait("tier.changed", 15)
            assert change["kind"] == "generation"
            await asyncio.sleep(1.5)  # a stats event or two at the new tier
            stats = bot.rec.of("stats")[-1]
            await bot.close()  # (checks every event it got against the schema)
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
    finally:
        await runner.cleanup()
    assert change["reason"] == "governor" and change["generation"] == {"size": "256*144",
                                                                       "steps": 4}
    assert change["previous_generation"] == {"size": "448*256", "steps": 4}
    assert change["output"] == change["previous"]  # the socket's own output is unchanged
    assert stats["generation"]["size"] == "256*144" and stats["generation"]["changes"] == 1
    assert set(stats["latency"]["stages_ms"]) == {"wait", "compute", "buffer", "send", "total"}
    assert 'avatar_tier_changes_total{kind="generation",reason="governor"} 1.0' in text
    assert "avatar_session_generation_rung" in text


def test_the_latency_section_names_its_keys() -> None:
    with pytest.raises(Exception, match=r"latency.target_s"):
        StreamConfig.parse({"latency": {"target_s": 0.01}})
    with pytest.raises(Exception, match=r"latency.generation_ladder\[1\]"):
        StreamConfig.parse({"latency": {"generation_ladder": [
            {"size": "704*384", "steps": 4}, {"size": "576*320"}]}})
    with pytest.raises(Exception, match="must cost less than the one before"):
        StreamConfig.parse({"latency": {"generation_ladder": [
            {"size": "448*256", "steps": 4}, {"size": "704*384", "steps": 4}]}})
    cfg = StreamConfig.parse({"latency": {"generation_ladder": [
        {"size": "448*256", "steps": 4}, {"size": "448*256", "steps": 3}]}})
    assert cfg.latency.generation_ladder == (GenerationTier("448*256", 4),
                                             GenerationTier("448*256", 3))
