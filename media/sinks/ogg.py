"""Ogg/Opus recordings (RFC 7845), written by hand, crash-safe.

:class:`OggOpusWriter` lays Opus packets out in Ogg pages. A page is closed and written
with a single ``write`` once it holds ``flush_interval_s`` of audio (1 s by default), so
a process killed with SIGKILL leaves a file of whole pages that plays up to the last
completed page; only the end-of-stream flag is missing, which players do not need.
:func:`repair_ogg` cuts off a torn trailing page (a write interrupted by a full disk or
a machine crash) and is what the recorder's startup repair runs.

Two ways to fill it:

* :class:`OggOpusPassthrough` stores the Opus payloads the far side sent, *as received*
  (an :class:`media.taps.RtpTap` listener): no decoding, no re-encoding, no quality
  loss, almost no CPU. Timestamp gaps (lost packets, DTX) are filled with 20 ms silence
  packets so the file keeps the stream's timeline; a small reorder window puts
  out-of-order packets back in place.
* :class:`OggOpusSink` encodes PCM frames (any :class:`~media.frames.Sink` input) with
  libopus; for when no RTP is available (e.g. a G.711 call, or audio from elsewhere).

Page CRCs use Ogg's CRC-32 (polynomial 0x04C11DB7, unreflected), computed with
:func:`zlib.crc32` on bit-reversed bytes: a C-speed loop, no per-byte Python.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np

from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from ..opus import DEFAULT_SETTINGS, OpusEncoder, OpusSettings, silence_packet
from .wav import close_and_repair, open_private

__all__ = [
    "OggOpusWriter",
    "OggOpusPassthrough",
    "OggOpusSink",
    "ogg_crc",
    "opus_packet_samples",
    "read_ogg_packets",
    "repair_ogg",
    "self_delimited",
]

_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
_PAGE_HEADER = struct.Struct("<4sBBqIIIB")
#: Longest gap filled with silence packets; a longer jump is treated as a new timeline.
MAX_GAP_SAMPLES = 60 * SAMPLE_RATE


def ogg_crc(data: bytes | bytearray | memoryview) -> int:
    """Ogg's page checksum (CRC-32, poly 0x04C11DB7, init 0, no reflection, no xor)."""
    reflected = zlib.crc32(bytes(data).translate(_REV), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_REV), "big")


_FRAME_SIZES = (
    # SILK-only configs 0-11: 10, 20, 40, 60 ms; hybrid 12-15: 10, 20 ms; CELT 16-31.
    [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4
)


def _lacing(length: int) -> bytes:
    """An Ogg page's lacing values for one packet of ``length`` bytes."""
    return b"\xff" * (length // 255) + bytes((length % 255,))


def opus_packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) an Opus packet decodes to, from its TOC byte (RFC 6716 3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    per_frame = _FRAME_SIZES[toc >> 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        frames = (packet[1] & 0x3F) if len(packet) > 1 else 0
    return per_frame * frames


def _opus_head(channels: int, pre_skip: int, input_rate: int = SAMPLE_RATE, streams: int | None = None) -> bytes:
    if streams is None:
        return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)
    # Channel mapping family 1 (RFC 7845 5.1.1.2) with one uncoupled mono stream per
    # channel, channel i from stream i: two independent legs as left and right.
    return (b"OpusHead" + struct.pack("<BBHIhBBB", 1, channels, pre_skip, input_rate, 0, 1, streams, 0)
            + bytes(range(channels)))


def _length_field(n: int) -> bytes:
    """An Opus frame length as coded in packets (RFC 6716 3.2.1): 1 or 2 bytes."""
    if n < 252:
        return bytes((n,))
    if n > 1275:
        raise ValueError(f"an Opus frame is at most 1275 bytes, not {n}")
    first = 252 + (n & 3)
    return bytes((first, (n - first) >> 2))


def _read_length(packet: bytes, i: int) -> tuple[int, int]:
    """``(length, bytes used)`` of the frame length coded at ``packet[i]``."""
    if i >= len(packet):
        raise ValueError("truncated Opus packet")
    first = packet[i]
    if first < 252:
        return first, 1
    if i + 1 >= len(packet):
        raise ValueError("truncated Opus packet")
    return first + 4 * packet[i + 1], 2


def self_delimited(packet: bytes) -> bytes:
    """``packet`` in self-delimiting framing (RFC 6716 appendix B): one more frame
    length after the ones it has, so that a packet can be followed by another. Every
    stream of an Opus multistream packet but the last is framed so (RFC 7845 5.1.1).
    Raises ``ValueError`` for a malformed packet."""
    n = len(packet)
    if n == 0:
        raise ValueError("an empty Opus packet has no TOC byte")
    code = packet[0] & 3
    if code == 0:  # one frame: the rest
        return packet[:1] + _length_field(n - 1) + packet[1:]
    if code == 1:  # two frames of equal size
        if (n - 1) % 2:
            raise ValueError("an Opus code 1 packet needs an even payload")
        return packet[:1] + _length_field((n - 1) // 2) + packet[1:]
    if code == 2:  # two frames, the first one's length coded
        first, used = _read_length(packet, 1)
        last = n - 1 - used - first
        if last < 0:
            raise ValueError("truncated Opus packet")
        return packet[: 1 + used] + _length_field(last) + packet[1 + used :]
    # code 3: frame count byte, optional padding length, lengths of all frames but the last (VBR)
    if n < 2:
        raise ValueError("truncated Opus packet")
    count_byte = packet[1]
    frames = count_byte & 0x3F
    if frames == 0:
        raise ValueError("an Opus code 3 packet with no frames")
    i = 2
    padding = 0
    if count_byte & 0x40:
        while True:
            if i >= n:
                raise ValueError("truncated Opus packet")
            b = packet[i]
            i += 1
            padding += 254 if b == 255 else b
            if b != 255:
                break
    if count_byte & 0x80:  # VBR
        total = 0
        for _ in range(frames - 1):
            length, used = _read_length(packet, i)
            i += used
            total += length
        last = n - i - padding - total
        if last < 0:
            raise ValueError("truncated Opus packet")
        return packet[:i] + _length_field(last) + packet[i:]
    data = n - i - padding
    if data < 0 or data % frames:
        raise ValueError("an Opus CBR packet whose frames are not of equal size")
    return packet[:i] + _length_field(data // frames) + packet[i:]


def _opus_tags(vendor: str, comments: dict[str, str]) -> bytes:
    v = vendor.encode()
    out = [b"OpusTags", struct.pack("<I", len(v)), v, struct.pack("<I", len(comments))]
    for key, value in comments.items():
        c = f"{key}={value}".encode()
        out += [struct.pack("<I", len(c)), c]
    return b"".join(out)


class OggOpusWriter:
    """Writes Opus packets into an Ogg file, a page per ``flush_interval_s`` of audio.

    The two header pages (OpusHead, OpusTags) are written by :meth:`start` — called
    on the first packet, so the channel count can follow the stream (``channels=None``:
    from the first packet's TOC stereo flag) — or by :meth:`close` if no packet came.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        channels: int | None = 1,
        pre_skip: int = 0,
        flush_interval_s: float = 1.0,
        comments: dict[str, str] | None = None,
        mode: int = 0o600,
        streams: int | None = None,
    ) -> None:
        if streams is not None and streams != channels:
            raise ValueError("a multistream file here has one mono stream per channel")
        self.path = Path(path)
        self.channels = channels
        #: ``None``: one (mono or stereo) stream; N: N mono streams, one per channel,
        #: whose packets are multistream packets (all but the last self-delimited).
        self.streams = streams
        self.pre_skip = pre_skip
        self.comments = dict(comments or {})
        self._page_samples = max(FRAME_SAMPLES, round(flush_interval_s * SAMPLE_RATE))
        self._serial = random.getrandbits(32)
        self._seq = 0
        self._fd: int | None = open_private(self.path, mode)
        self._started = False
        self._granule = 0  # samples of every packet so far (pre-skip included)
        self._segments = bytearray()
        self._body: list[bytes] = []
        self._pending_samples = 0
        self.packets = 0
        self.bytes = 0

    @property
    def samples(self) -> int:
        """Decodable samples written (excluding the pre-skip)."""
        return max(0, self._granule - self.pre_skip)

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def closed(self) -> bool:
        return self._fd is None

    def start(self, channels: int | None = None) -> None:
        if self._started or self._fd is None:
            return
        if self.channels is None:
            self.channels = channels or 1
        self._started = True
        self._write_page([_opus_head(self.channels, self.pre_skip, streams=self.streams)], granule=0, flags=0x02)
        tags = _opus_tags("wacall", self.comments)
        self._write_page([tags], granule=0, flags=0)

    def write_packet(self, packet: bytes, samples: int | None = None) -> None:
        """Append one Opus packet (``samples`` defaults to what its TOC says)."""
        if self._fd is None:
            return
        if not self._started:
            self.start(2 if packet and packet[0] & 0x04 else 1)
        if samples is None:
            samples = opus_packet_samples(packet)
        lacing = _lacing(len(packet))
        if len(self._segments) + len(lacing) > 255:
            self._flush_page()
        self._segments += lacing
        self._body.append(bytes(packet))
        self._granule += samples
        self._pending_samples += samples
        self.packets += 1
        if self._pending_samples >= self._page_samples:
            self._flush_page()

    def write_packets(self, packets: list[bytes], samples: int) -> None:
        """Append Opus packets of ``samples`` each, as :meth:`write_packet` one by one
        would (in bulk where they fit the page)."""
        if self._fd is None or not packets:
            return
        # (one by one, a page closes after the packet that fills it, or before one that
        # does not fit its lacing: in bulk only if neither happens before the last one)
        lengths = bytes(map(len, packets)) if max(map(len, packets)) < 255 else \
            b"".join(_lacing(len(p)) for p in packets)  # (some take more than one lacing value)
        if not self._started or len(self._segments) + len(lengths) > 255 or \
                self._pending_samples + samples * (len(packets) - 1) >= self._page_samples:
            for packet in packets:
                self.write_packet(packet, samples)
            return
        self._segments += lengths
        self._body += packets
        total = samples * len(packets)
        self._granule += total
        self._pending_samples += total
        self.packets += len(packets)
        if self._pending_samples >= self._page_samples:
            self._flush_page()

    def flush(self) -> None:
        """Close the current page and write it now."""
        if self._body:
            self._flush_page()

    def _flush_page(self, flags: int = 0) -> None:
        self._write_page(None, granule=self._granule, flags=flags)
        self._segments = bytearray()
        self._body = []
        self._pending_samples = 0

    def _write_page(self, packets: list[bytes] | None, *, granule: int, flags: int) -> None:
        if packets is not None:  # header pages: one packet each, laced here
            segments = bytearray()
            for p in packets:
                segments += _lacing(len(p))
            body = b"".join(packets)
        else:
            segments = self._segments
            body = b"".join(self._body)
        header = _PAGE_HEADER.pack(b"OggS", 0, flags, granule, self._serial, self._seq, 0, len(segments))
        page = bytearray(header)
        page += segments
        page += body
        struct.pack_into("<I", page, 22, ogg_crc(page))
        self._seq += 1
        view = memoryview(page)
        while view:
            view = view[os.write(self._fd, view) :]
        self.bytes += len(page)

    def close(self, *, samples: int | None = None) -> None:
        """Write the last page with the end-of-stream flag and close. Idempotent.

        ``samples``: the stream's true length (excluding pre-skip) when the last packet
        decodes to more than that (encoder padding); the final granule position then
        trims the tail, as RFC 7845 allows for the last page."""
        if self._fd is None:
            return
        try:
            if not self._started:
                self.start(1)
            if samples is not None and self.pre_skip + samples < self._granule:
                self._granule = max(self._granule - self._pending_samples, self.pre_skip + samples)
            self._flush_page(flags=0x04)
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Stop after a write failed (e.g. a full disk): write nothing more, close, and
        cut a torn last page, so the file plays up to its last whole page. Never raises."""
        fd, self._fd = self._fd, None
        self._body.clear()
        self._segments.clear()
        close_and_repair(fd, self.path, repair_ogg)


class OggOpusPassthrough:
    """An :class:`media.taps.RtpTap` listener storing received Opus payloads unchanged.

    ``packets_received`` counts payloads taken from RTP, ``packets_filled`` the silence
    packets written for timestamp gaps, ``packets_dropped`` duplicates / too-late ones.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval_s: float = 1.0,
        reorder_window: int = 3,
        comments: dict[str, str] | None = None,
        fill: OpusSettings = DEFAULT_SETTINGS,
    ) -> None:
        self.writer = OggOpusWriter(path, channels=None, pre_skip=0, flush_interval_s=flush_interval_s, comments=comments)
        self.path = self.writer.path
        self._window = max(0, reorder_window)
        self._held: list[tuple[int, bytes]] = []
        self._next_pts: int | None = None
        self._fill = silence_packet(fill)
        self.packets_received = 0
        self.packets_filled = 0
        self.packets_dropped = 0
        self._closed = False

    def __call__(self, arrival) -> None:
        self.add(arrival.pts, arrival.payload)

    def add(self, pts: int, payload: bytes) -> None:
        if self._closed:
            return
        held = self._held
        if self._next_pts is not None and pts < self._next_pts:
            self.packets_dropped += 1  # its slot is already written
            return
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] == pts:
                self.packets_dropped += 1
                return
            if held[i][0] < pts:
                held.insert(i + 1, (pts, payload))
                break
        else:
            held.insert(0, (pts, payload))
        while len(held) > self._window:
            self._emit(*held.pop(0))

    def _emit(self, pts: int, payload: bytes) -> None:
        writer = self.writer
        if self._next_pts is not None:
            gap = pts - self._next_pts
            if 0 < gap <= MAX_GAP_SAMPLES:
                for _ in range(gap // FRAME_SAMPLES):
                    writer.write_packet(self._fill, FRAME_SAMPLES)
                    self.packets_filled += 1
        samples = opus_packet_samples(payload) or FRAME_SAMPLES
        writer.write_packet(payload, samples)
        self.packets_received += 1
        self._next_pts = pts + samples

    @property
    def duration_s(self) -> float:
        return self.writer.duration_s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pts, payload in self._held:
            self._emit(pts, payload)
        self._held.clear()
        self.writer.close()

    def abort(self) -> None:
        """Close without writing more (after a write failed); see :meth:`OggOpusWriter.abort`."""
        self._closed = True
        self._held.clear()
        self.writer.abort()

    def fail(self, exc: BaseException) -> None:
        self.abort()


class OggOpusSink:
    """A :class:`~media.frames.Sink` encoding 48 kHz frames (mono mix) to Ogg/Opus."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        settings: OpusSettings = DEFAULT_SETTINGS,
        flush_interval_s: float = 1.0,
        comments: dict[str, str] | None = None,
    ) -> None:
        self._encoder = OpusEncoder(settings)
        self.writer = OggOpusWriter(
            path, channels=1, pre_skip=self._encoder.delay, flush_interval_s=flush_interval_s, comments=comments
        )
        self.path = self.writer.path
        self._mono = np.empty(FRAME_SAMPLES, dtype=PCM_DTYPE)
        self._acc = np.empty(FRAME_SAMPLES, dtype=np.int32)
        self._stage = np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE)
        self._staged = 0
        self._samples = 0
        self._closed = False

    @property
    def duration_s(self) -> float:
        return self.writer.duration_s

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed:
            return
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"OggOpusSink takes {SAMPLE_RATE} Hz frames, got {sample_rate} Hz")
        if channels == 2 and pcm.size == 2 * FRAME_SAMPLES:
            np.add(pcm[0::2], pcm[1::2], out=self._acc, dtype=np.int32)
            np.right_shift(self._acc, 1, out=self._acc)
            np.copyto(self._mono, self._acc, casting="unsafe")
            pcm = self._mono
        elif channels != 1:
            pcm = pcm.reshape(-1, channels).mean(axis=1).astype(PCM_DTYPE)
        if pcm.size == FRAME_SAMPLES and self._staged == 0:
            self._encode(pcm)
            return
        # Odd-sized frames: restage into whole 20 ms frames.
        pcm = pcm.reshape(-1)
        while pcm.size:
            take = min(FRAME_SAMPLES - self._staged, pcm.size)
            self._stage[self._staged : self._staged + take] = pcm[:take]
            self._staged += take
            pcm = pcm[take:]
            if self._staged == FRAME_SAMPLES:
                self._encode(self._stage)
                self._staged = 0

    def _encode(self, pcm: np.ndarray) -> None:
        self._samples += FRAME_SAMPLES
        packet = self._encoder.encode(pcm)
        if packet is not None:
            self.writer.write_packet(bytes(packet), FRAME_SAMPLES)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            samples = self._samples + self._staged
            if self._staged:
                self._stage[self._staged :] = 0
                self._encode(self._stage)
            for packet in self._encoder.flush():
                self.writer.write_packet(bytes(packet), FRAME_SAMPLES)
        finally:
            self.writer.close(samples=samples)

    def abort(self) -> None:
        """Close without writing more (after a write failed); see :meth:`OggOpusWriter.abort`."""
        self._closed = True
        self.writer.abort()

    def fail(self, exc: BaseException) -> None:
        self.abort()


def _pages(data: bytes):
    """Yield ``(offset, end, header_type, granule, serial, seq, segments, body_offset)``
    for each complete, CRC-valid page from the start of ``data``; stops at the first
    torn or corrupt one."""
    offset = 0
    size = len(data)
    while offset + 27 <= size:
        if data[offset : offset + 4] != b"OggS":
            return
        _, _, flags, granule, serial, seq, crc, nseg = _PAGE_HEADER.unpack_from(data, offset)
        seg_start = offset + 27
        if seg_start + nseg > size:
            return
        segments = data[seg_start : seg_start + nseg]
        end = seg_start + nseg + sum(segments)
        if end > size:
            return
        page = bytearray(data[offset:end])
        page[22:26] = b"\0\0\0\0"
        if ogg_crc(page) != crc:
            return
        yield offset, end, flags, granule, serial, seq, segments, seg_start + nseg
        offset = end


def read_ogg_packets(path: str | os.PathLike[str]) -> tuple[list[bytes], int]:
    """Audio packets of a single-stream Ogg/Opus file and the last granule position
    (headers skipped; stops at the first torn page)."""
    data = Path(path).read_bytes()
    packets: list[bytes] = []
    partial = b""
    granule = 0
    index = 0
    for _, _, _, g, _, _, segments, body in _pages(data):
        pos = body
        for lace in segments:
            partial += data[pos : pos + lace]
            pos += lace
            if lace < 255:
                if index >= 2:
                    packets.append(partial)
                index += 1
                partial = b""
        if g >= 0:
            granule = g
    return packets, granule


def repair_ogg(path: str | os.PathLike[str]) -> bool:
    """Cut an Ogg file after its last complete, CRC-valid page. Returns ``True`` when
    bytes were removed."""
    p = Path(path)
    data = p.read_bytes()
    good = 0
    for _, end, *_ in _pages(data):
        good = end
    if good == len(data):
        return False
    with open(p, "r+b") as f:
        f.truncate(good)
    return True
