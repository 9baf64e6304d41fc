"""What an aiortc viewer sees of the preview's marks ([engine] preview_marks): the frame number
of every decoded frame (a frame shown again reads the same number) and the onset patch; from
them, each frame's latency from its audio's media time and the longest run of one frame
(tests/stream/test_latency_e2e.py). Onsets matched to a browser's clicks: stream/latency_probe.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import av
from aiohttp import ClientSession

from engine.preview_marks import onset_patch_lit, read_frame_code
from tests.stream.rtc_client import Client, whep

MISREAD_FRAMES = 12  # neighbours further apart than a block: one of them was misread


@dataclass
class Seen:
    """Decoded frames: (arrival time.monotonic(), frame number or None, onset patch lit)."""

    frames: list[tuple[float, int | None, bool]] = field(default_factory=list)
    size: tuple[int, int] | None = None

    def drop_misread(self) -> None:
        """A code that a codec artefact turned into another valid one (the parity cell catches
        one wrong cell, not two) stands alone: the frames either side of a real one read within
        a block of it. The one before the newest is checked, and forgotten if it stands alone."""
        if len(self.frames) < 3:
            return
        (_, a, _), (at, b, lit), (_, c, _) = self.frames[-3:]
        if a is not None and b is not None and c is not None and \
                abs(b - a) > MISREAD_FRAMES and abs(c - b) > MISREAD_FRAMES:
            self.frames[-2] = (at, None, lit)


class MarkedClient(Client):
    """A viewer whose video frames are read for the preview's marks, not recorded whole."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = Seen()

    def on_video(self, frame: av.VideoFrame, now: float) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        self.seen.size = (rgb.shape[1], rgb.shape[0])
        self.seen.frames.append((now, read_frame_code(rgb), onset_patch_lit(rgb)))
        self.seen.drop_misread()

    def on_audio(self, frame: av.AudioFrame, now: float) -> None:
        """The avatar's audio: taken and dropped."""


def longest_repeat(seen: Seen, after: float) -> int:
    """The most consecutive decoded frames (arriving after `after`) showing one frame number."""
    best = run = 0
    last = None
    for at, code, _ in seen.frames:
        if code is None:
            continue
        run = run + 1 if code == last else 1
        last = code
        if at >= after:
            best = max(best, run)
    return best


async def marked_whep(http: ClientSession, session: dict) -> MarkedClient:
    """Watch the session through WHEP (video only); the avatar's frames are read for marks."""
    client = MarkedClient()
    await whep(http, session, client=client, audio=False)
    return client


def frame_latencies(seen: Seen, t0: float, after: float) -> list[tuple[float, float]]:
    """(arrival, latency) per decoded frame arriving after `after`: arrival - (t0 + n/25), the
    time from its audio's media time to the viewer having it (one clock: the server runs in the
    test's process)."""
    return [(at, at - (t0 + code * 0.04)) for at, code, _ in seen.frames
            if code is not None and at >= after]
