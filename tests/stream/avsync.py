"""Measure lip sync from what a client received: mouth-opening vs loudness, on the sender clock."""

from __future__ import annotations

import numpy as np

from tests.stream.rtc_client import Client

RTP_WRAP = 2**32


def _sender_times(client: Client, kind: str, pts: np.ndarray, rate: int) -> np.ndarray:
    """Decoded pts (relative to the first RTP timestamp) -> sender wall clock (NTP seconds)."""
    reports = client.reports.by_kind.get(kind)
    if not reports:
        raise AssertionError(f"no RTCP sender report received for {kind}")
    ntp, rtp = reports[-1]
    raw = (pts + client.origin(kind)) % RTP_WRAP
    delta = (raw - rtp + RTP_WRAP // 2) % RTP_WRAP - RTP_WRAP // 2  # signed distance
    return ntp + delta / rate


def signals(client: Client) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(video times, mouth values, audio times, loudness values), all on the sender clock."""
    rec = client.recording
    vpts = np.array([v[0] for v in rec.video], dtype=np.int64)
    vt = _sender_times(client, "video", vpts, 90000)
    mouth = np.array([v[2] for v in rec.video])
    at, loud = [], []
    apts = np.array([a[0] for a in rec.audio], dtype=np.int64)
    starts = _sender_times(client, "audio", apts, 48000)
    for t0, (_, _, rms) in zip(starts, rec.audio, strict=True):
        at.extend(t0 + 0.005 * np.arange(len(rms)))
        loud.extend(rms)
    return vt, mouth, np.array(at), np.array(loud)


def av_offset(client: Client, start: float, stop: float, max_lag: float = 0.3) -> float:
    """Lag (s) of the mouth signal behind the loudness envelope within [start, stop) seconds of
    sender time after the first video frame. Positive: video late. 1 ms resolution."""
    vt, mouth, at, loud = signals(client)
    origin = vt.min()
    grid = origin + np.arange(start, stop, 0.001)
    # the video frame on screen at t is the latest one at or before t; audio in 5 ms bins
    vi = np.searchsorted(vt, grid, side="right") - 1
    ai = np.searchsorted(at, grid, side="right") - 1
    if (vi < 0).any() or (ai < 0).any():
        raise AssertionError("the window starts before the recording")
    m = mouth[vi]
    a = loud[ai]
    if m.std() < 1e-6 or a.std() < 1e-6:
        raise AssertionError("no mouth movement or no loudness change in the window")
    m = (m - m.mean()) / m.std()
    lags = np.arange(-int(max_lag * 1000), int(max_lag * 1000) + 1)
    best, best_lag = -np.inf, 0
    for lag in lags:
        # corr(L) = mean(mouth(t) * loud(t - L))
        ai_l = np.searchsorted(at, grid - lag / 1000, side="right") - 1
        if (ai_l < 0).any():
            continue
        x = loud[ai_l]
        c = float(np.mean(m * (x - x.mean()) / (x.std() + 1e-12)))
        if c > best:
            best, best_lag = c, lag
    return best_lag / 1000.0
