"""Record frames to 16-bit PCM WAV files that survive a crash.

:class:`WavWriter` is the file: a 44-byte header, then samples appended through one
preallocated buffer. Every ``flush_interval_s`` of audio (1 s by default) the buffer
goes to the kernel with one ``write``, and the header's length fields are rewritten to
match (one 40-byte ``pwrite``) after every flush, or, with ``header_interval_s``, once
that much more audio was flushed (the data reaches the file often, the header follows
about once a second). So at any moment the file on disk is a valid WAV of everything
flushed (up to the last header update): a process killed with SIGKILL leaves a file
that plays up to there, and up to the last flush once repaired. :func:`repair_wav`
re-derives the lengths from the file size for files whose header lags behind their
data (killed between the data write and the header update, or written by another
tool), and is what :func:`media.sinks.recorder.repair_directory` runs at startup.

Files are created with mode 0600 (recordings are personal data). The data reaches the
page cache, not necessarily the disk: a crash of the *machine* can lose more.

:class:`WavSink` is the :class:`~media.frames.Sink` on top (channel mixing, counters).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..frames import FRAME_MS, PCM_DTYPE, SAMPLE_RATE

__all__ = ["WavSink", "WavWriter", "repair_wav", "wav_header"]

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
HEADER_SIZE = _HEADER.size  # 44
_MAX_DATA = 0xFFFFFFFF - 36


def wav_header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    """A canonical 44-byte PCM s16le WAV header for ``data_bytes`` of samples."""
    data_bytes = min(data_bytes, _MAX_DATA)
    block = 2 * channels
    return _HEADER.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, sample_rate,
        sample_rate * block, block, 16, b"data", data_bytes,
    )


def close_and_repair(fd: int | None, path: Path, repair: Callable[[Path], bool]) -> None:
    """After a failed write: close ``fd`` without writing more and run ``repair`` on
    ``path`` (fix the header / cut a torn page) so the file plays up to the fault.
    Never raises: the disk may be full, the file may be gone."""
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        repair(path)
    except (OSError, ValueError):
        pass


def open_private(path: Path, mode: int = 0o600) -> int:
    """Create/truncate ``path`` for writing with permissions ``mode`` (exactly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):  # pragma: no cover - non-POSIX
        pass
    return fd


class WavWriter:
    """An s16le WAV file written in ``flush_interval_s`` chunks with a header that is
    always valid for what has been flushed (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
        flush_interval_s: float = 1.0,
        header_interval_s: float | None = None,
        mode: int = 0o600,
    ) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.data_bytes = 0  # flushed to the file
        self.header_bytes = 0  # what the header on disk says
        capacity = max(1, round(sample_rate * flush_interval_s)) * channels
        self._buf = np.empty(capacity, dtype=PCM_DTYPE)
        self._used = 0
        #: The header is rewritten once this many more bytes were flushed (0: every flush).
        self._header_every = 0 if header_interval_s is None else round(sample_rate * header_interval_s) * 2 * channels
        self._fd: int | None = open_private(self.path, mode)
        os.write(self._fd, wav_header(sample_rate, channels, 0))

    @property
    def samples(self) -> int:
        """Samples per channel written (flushed or buffered)."""
        return (self.data_bytes // 2 + self._used) // self.channels

    @property
    def closed(self) -> bool:
        return self._fd is None

    def append(self, pcm: np.ndarray) -> None:
        """Append interleaved int16 samples (a multiple of ``channels``)."""
        if self._fd is None:
            return
        n = pcm.size
        if self._used + n > self._buf.size:
            self.flush()
            if n >= self._buf.size:
                self._write(np.ascontiguousarray(pcm, dtype=PCM_DTYPE))
                self._maybe_sync_header()
                return
        self._buf[self._used : self._used + n] = pcm.reshape(-1)
        self._used += n
        if self._used == self._buf.size:
            self.flush()

    def append_direct(self, pcm: np.ndarray) -> None:
        """Write ``pcm`` straight to the file and update the header (no buffering)."""
        if self._fd is None:
            return
        self.flush()
        self._write(np.ascontiguousarray(pcm, dtype=PCM_DTYPE))
        self._maybe_sync_header()

    def flush(self) -> None:
        """Buffered samples to the file, then the header lengths to match (every
        ``header_interval_s`` of audio when one was given)."""
        if self._fd is None or self._used == 0:
            return
        self._write(self._buf[: self._used])
        self._used = 0
        self._maybe_sync_header()

    def sync_header(self) -> None:
        """Flush, and make the header match everything written now."""
        self.flush()
        if self._fd is not None and self.header_bytes != self.data_bytes:
            self._sync_header()

    def _write(self, data: np.ndarray) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.data_bytes += data.size * 2

    def _maybe_sync_header(self) -> None:
        if self.data_bytes - self.header_bytes >= self._header_every:
            self._sync_header()

    def _sync_header(self) -> None:
        # bytes 4..44 (RIFF length .. data length) in one pwrite
        os.pwrite(self._fd, wav_header(self.sample_rate, self.channels, self.data_bytes)[4:], 4)
        self.header_bytes = self.data_bytes

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.sync_header()
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Stop after a write failed (e.g. a full disk): write nothing more, close the
        file and make its header match what did reach it, so it plays up to there.
        Idempotent; never raises."""
        fd, self._fd = self._fd, None
        self._used = 0
        close_and_repair(fd, self.path, repair_wav)  # 8 header bytes in place: no new blocks


def repair_wav(path: str | os.PathLike[str]) -> bool:
    """Make a WAV file's RIFF/data lengths match the samples actually in the file.

    Handles any RIFF/WAVE file whose ``data`` chunk is the last chunk (what every
    recorder writes). A trailing partial sample frame is left out of the declared
    length. Returns ``True`` when the header was changed.

    Raises:
        ValueError: not a RIFF/WAVE file, or no ``data`` chunk.
    """
    p = Path(path)
    with open(p, "r+b") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError(f"{p} is not a RIFF/WAVE file")
        file_size = os.fstat(f.fileno()).st_size
        offset = 12
        block_align = 1
        while True:
            f.seek(offset)
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError(f"{p} has no data chunk")
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(16)
                if len(fmt) == 16:
                    block_align = max(1, struct.unpack("<H", fmt[12:14])[0])
            if cid == b"data":
                data_start = offset + 8
                break
            offset += 8 + size + (size & 1)
        actual = max(0, file_size - data_start)
        actual -= actual % block_align
        actual = min(actual, _MAX_DATA)
        riff = data_start - 8 + actual  # everything after the RIFF size field
        changed = size != actual or struct.unpack("<I", head[4:8])[0] != riff
        if changed:
            f.seek(4)
            f.write(struct.pack("<I", riff))
            f.seek(data_start - 4)
            f.write(struct.pack("<I", actual))
        return changed


class WavSink:
    """A :class:`~media.frames.Sink` writing 16-bit PCM WAV, crash-safe (see module).

    Args:
        path: output file (mode 0600); missing parent directories are created. The
            file is opened (and truncated) by the constructor.
        sample_rate: the file's rate. Frames at another rate are refused with
            ``ValueError`` (wrap the sink in :class:`media.mix.ResampledSink`).
        channels: the file's channel count. Frames with a different count are mixed:
            several channels down to mono by averaging, mono up by duplication (and
            anything else via mono).
        flush_interval_s: how much audio may sit in memory before it is written and
            the header updated (what a SIGKILL can lose).
        header_interval_s: update the header only once this much more audio was
            written (``None``: at every write); the data still goes out every
            ``flush_interval_s`` and :func:`repair_wav` recovers it after a crash.

    Counters: ``frames_written`` counts :meth:`write` calls that wrote audio,
    ``samples_written`` counts samples *per channel* (WAV "sample frames"), and
    ``duration_s`` is ``samples_written / sample_rate``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
        flush_interval_s: float = 1.0,
        header_interval_s: float | None = None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.flush_interval_s = flush_interval_s
        self.header_interval_s = header_interval_s
        self.frames_written = 0
        self.samples_written = 0
        self._closed = False
        # Scratch buffers for channel mixing, sized for one 20 ms frame, grown on demand.
        frame = sample_rate * FRAME_MS // 1000
        self._acc = np.empty(frame, dtype=np.int32)
        self._mix = np.empty(frame * channels, dtype=PCM_DTYPE)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = WavWriter(
            self.path, sample_rate=sample_rate, channels=channels, flush_interval_s=flush_interval_s,
            header_interval_s=header_interval_s,
        )

    def __reduce__(self):
        """Pickled (for a media worker process) as what it was made from: the file is
        opened (truncated) again on the other side."""
        return (functools.partial(WavSink, self.path, sample_rate=self.sample_rate, channels=self.channels,
                                  flush_interval_s=self.flush_interval_s,
                                  header_interval_s=self.header_interval_s), ())

    @property
    def duration_s(self) -> float:
        """Seconds of audio written so far."""
        return self.samples_written / self.sample_rate

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Append one frame of interleaved int16 samples (ignored after :meth:`close`).

        Raises:
            ValueError: ``sample_rate`` differs from the sink's, ``channels`` < 1, or
                the sample count is not a multiple of ``channels``.
            TypeError: ``pcm`` is not int16.
        """
        if self._closed:
            return
        if sample_rate != self.sample_rate:
            raise ValueError(
                f"WavSink {self.path.name} records {self.sample_rate} Hz, "
                f"got a {sample_rate} Hz frame"
            )
        if pcm.dtype != PCM_DTYPE:
            raise TypeError(f"expected int16 PCM, got {pcm.dtype}")
        if channels < 1 or pcm.size % channels:
            raise ValueError(f"{pcm.size} samples do not split into {channels} channels")
        if pcm.size == 0:
            return
        out = self._convert(pcm.reshape(-1), channels)
        self._wav.append(out)
        self.frames_written += 1
        self.samples_written += out.size // self.channels

    def flush(self) -> None:
        """Write what is buffered and update the header now."""
        if not self._closed:
            self._wav.sync_header()

    def close(self) -> None:
        """Flush and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wav.close()

    def abort(self) -> None:
        """Close without writing more (after a write failed); see :meth:`WavWriter.abort`."""
        self._closed = True
        self._wav.abort()

    def fail(self, exc: BaseException) -> None:
        """Detached after ``exc`` (see :mod:`media.sinkset`): keep what was written."""
        self.abort()

    def __enter__(self) -> WavSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"WavSink({str(self.path)!r}, sample_rate={self.sample_rate}, "
            f"channels={self.channels})"
        )

    def _convert(self, pcm: np.ndarray, channels: int) -> np.ndarray:
        """``pcm`` (interleaved, ``channels`` wide) in the sink's channel count."""
        if channels == self.channels:
            return pcm
        count = pcm.size // channels  # samples per channel
        if count > self._acc.size:
            self._acc = np.empty(count, dtype=np.int32)
            self._mix = np.empty(count * self.channels, dtype=PCM_DTYPE)
        if channels > 1:
            # Average the channels into mono (int32 accumulation: no overflow). One
            # strided add per channel: much faster than a reduction along a short axis.
            acc = self._acc[:count]
            np.add(pcm[0::channels], pcm[1::channels], out=acc, dtype=np.int32)
            for c in range(2, channels):
                acc += pcm[c::channels]
            if channels == 2:
                np.right_shift(acc, 1, out=acc)
            else:
                np.floor_divide(acc, channels, out=acc)
            mono = self._mix[:count]
            np.copyto(mono, acc, casting="unsafe")  # the mean of int16s fits in int16
            if self.channels == 1:
                return mono
            pcm = mono.copy()  # small, rare (N -> M channel mixes): free the scratch buffer
        mixed = self._mix[: count * self.channels]
        mixed.reshape(count, self.channels)[:] = pcm[:, None]
        return mixed
