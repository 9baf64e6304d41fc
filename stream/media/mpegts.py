"""MPEG-TS (ISO/IEC 13818-1) packetizer for already-encoded H.264 and ADTS AAC.

GET /v1/sessions/{id}/stream.ts carries one of these per session: the encoded access units of
the session's H.264 variant and its AAC audio are wrapped once (no re-encoding, no per-reader
muxer) and the same bytes go to every reader (stream/media/ts_feed.py). Because the packetizer
is ours, a reader can join exactly where a keyframe starts: every keyframe's PES is preceded by
the PAT and PMT, so the first bytes a reader gets are a clean start for any demuxer (OBS's Media
Source, ffmpeg, VLC).

Both elementary streams carry the session's media time as PTS (plus `PTS_OFFSET`), so players
keep them in sync; the PCR rides on the video PID, `PCR_LEAD` before the video PTS, and is sent
on its own when video pauses (audio keeps flowing whatever the video does).
"""

from __future__ import annotations

from engine.api import FPS

TS_PACKET = 188
PAYLOAD = TS_PACKET - 4
PID_PMT, PID_VIDEO, PID_AUDIO = 0x1000, 0x100, 0x101
STREAM_H264, STREAM_AAC = 0x1B, 0x0F
CLOCK = 90_000  # PTS / PCR base, Hz
PTS_OFFSET = CLOCK  # media time 0 is PTS 1 s: the AAC priming frame stays positive
PCR_LEAD = CLOCK // 10  # the PCR runs 100 ms ahead of the frames it announces
PSI_EVERY = CLOCK * 2 // 5  # PAT/PMT at every keyframe and at least every 0.4 s
PCR_EVERY = CLOCK // FPS  # a PCR-only packet when no video went out for a frame's time
WRAP = 1 << 33
AUD = b"\x00\x00\x00\x01\x09\xf0"  # H.264 access unit delimiter (primary_pic_type: any)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        table.append(c & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def crc32_mpeg2(data: bytes) -> int:
    """CRC-32/MPEG-2 of a PSI section (no reflection, no final xor)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def _section(table_id: int, body: bytes) -> bytes:
    """A PSI section: header + body + CRC (section_syntax_indicator set)."""
    length = len(body) + 4
    head = bytes((table_id, 0xB0 | (length >> 8), length & 0xFF))
    crc = crc32_mpeg2(head + body)
    return head + body + crc.to_bytes(4, "big")


def _pat() -> bytes:
    # transport_stream_id 1, version 0, current; program 1 -> PMT PID
    return _section(0x00, bytes((0, 1, 0xC1, 0, 0, 0, 1, 0xE0 | (PID_PMT >> 8),
                                 PID_PMT & 0xFF)))


def _pmt() -> bytes:
    body = bytes((0, 1, 0xC1, 0, 0, 0xE0 | (PID_VIDEO >> 8), PID_VIDEO & 0xFF, 0xF0, 0))
    for kind, pid in ((STREAM_H264, PID_VIDEO), (STREAM_AAC, PID_AUDIO)):
        body += bytes((kind, 0xE0 | (pid >> 8), pid & 0xFF, 0xF0, 0))
    return _section(0x02, body)


def _pts_field(pts: int) -> bytes:
    """The 5-byte PTS of a PES header ('0010' prefix: PTS only)."""
    return bytes((0x21 | ((pts >> 29) & 0x0E), (pts >> 22) & 0xFF, ((pts >> 14) & 0xFE) | 1,
                  (pts >> 7) & 0xFF, ((pts << 1) & 0xFE) | 1))


def _pcr_field(pcr: int) -> bytes:
    """A PCR of 90 kHz base (the 27 MHz extension is 0)."""
    return bytes(((pcr >> 25) & 0xFF, (pcr >> 17) & 0xFF, (pcr >> 9) & 0xFF, (pcr >> 1) & 0xFF,
                  ((pcr & 1) << 7) | 0x7E, 0))


def _pes(stream_id: int, pts: int, payload: bytes, bounded: bool) -> bytes:
    """A PES packet (data_alignment_indicator set). Video PES may be unbounded (length 0)."""
    length = 8 + len(payload)
    if not bounded or length > 0xFFFF:
        length = 0
    return (bytes((0, 0, 1, stream_id, length >> 8, length & 0xFF, 0x84, 0x80, 5))
            + _pts_field(pts) + payload)


def ms_to_clock(ms: int) -> int:
    return ms * (CLOCK // 1000)


def samples_to_clock(sample: int, rate: int) -> int:
    return sample * CLOCK // rate


class TsMuxer:
    """Encoded packets in, TS bytes out (whole 188-byte packets, one call per packet).

    `video(au, pts, keyframe)` and `audio(adts, pts)` take PTS on the 90 kHz media clock
    (without `PTS_OFFSET`); each returns the TS packets to append to the stream.
    """

    def __init__(self) -> None:
        self._cc = {0: 0, PID_PMT: 0, PID_VIDEO: 0, PID_AUDIO: 0}
        self._pat, self._pmt = _pat(), _pmt()
        self._last_psi: int | None = None
        self._last_pcr: int | None = None

    def video(self, au: bytes, pts: int, keyframe: bool) -> bytes:
        out = bytearray()
        if keyframe or self._psi_due(pts):
            out += self._psi(pts)
        if not au.startswith(AUD):
            au = AUD + au
        stamp = (pts + PTS_OFFSET) % WRAP
        pcr = self._pcr_value(pts)
        out += self._packetize(PID_VIDEO, _pes(0xE0, stamp, au, bounded=False), pcr, keyframe)
        return bytes(out)

    def audio(self, adts: bytes, pts: int) -> bytes:
        out = bytearray()
        if self._psi_due(pts):
            out += self._psi(pts)
        if self._last_pcr is None or pts - PCR_LEAD - self._last_pcr >= PCR_EVERY:
            pcr = self._pcr_value(pts)  # video is not flowing: keep the clock going
            if pcr is not None:
                out += self._pcr_only(pcr)
        stamp = (pts + PTS_OFFSET) % WRAP
        out += self._packetize(PID_AUDIO, _pes(0xC0, stamp, adts, bounded=True), None, False)
        return bytes(out)

    # internals -------------------------------------------------------------------------------

    def _psi_due(self, pts: int) -> bool:
        return self._last_psi is None or pts - self._last_psi >= PSI_EVERY

    def _psi(self, pts: int) -> bytes:
        self._last_psi = pts
        return self._section_packet(0, self._pat) + self._section_packet(PID_PMT, self._pmt)

    def _pcr_value(self, pts: int) -> int | None:
        """The PCR for content at `pts`, if it moves the clock forward (it never goes back)."""
        pcr = pts - PCR_LEAD
        if self._last_pcr is not None and pcr <= self._last_pcr:
            return None
        self._last_pcr = pcr
        return (pcr + PTS_OFFSET) % WRAP

    def _next_cc(self, pid: int) -> int:
        cc = self._cc[pid]
        self._cc[pid] = (cc + 1) & 0x0F
        return cc

    def _section_packet(self, pid: int, section: bytes) -> bytes:
        payload = b"\x00" + section  # pointer_field
        head = bytes((0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | self._next_cc(pid)))
        return head + payload + b"\xff" * (PAYLOAD - len(payload))

    def _pcr_only(self, pcr: int) -> bytes:
        """An adaptation-field-only packet on the PCR PID (no payload: CC does not advance)."""
        field = bytes((0x10,)) + _pcr_field(pcr)
        field += b"\xff" * (PAYLOAD - 1 - len(field))
        cc = (self._cc[PID_VIDEO] - 1) & 0x0F
        return bytes((0x47, PID_VIDEO >> 8, PID_VIDEO & 0xFF, 0x20 | cc, len(field))) + field

    def _packetize(self, pid: int, pes: bytes, pcr: int | None, random_access: bool) -> bytes:
        out = bytearray()
        hi, lo = pid >> 8, pid & 0xFF
        pos, n = 0, len(pes)
        first = True
        while pos < n:
            field: bytes | None = None  # adaptation field after its length byte (None: absent)
            if first and (pcr is not None or random_access):
                field = bytes(((0x40 if random_access else 0) | (0x10 if pcr is not None else 0),))
                if pcr is not None:
                    field += _pcr_field(pcr)
            room = PAYLOAD - (0 if field is None else 1 + len(field))
            chunk = pes[pos:pos + room]
            if len(chunk) < room:  # the last packet: stuff the adaptation field
                spare = room - len(chunk)
                if field is None:
                    field = b"" if spare == 1 else b"\x00" + b"\xff" * (spare - 2)
                else:
                    field += b"\xff" * spare
            flags = 0x30 if field is not None else 0x10
            out += bytes((0x47, (0x40 if first else 0) | hi, lo, flags | self._next_cc(pid)))
            if field is not None:
                out.append(len(field))
                out += field
            out += chunk
            pos += len(chunk)
            first = False
        return bytes(out)
