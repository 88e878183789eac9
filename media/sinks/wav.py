"""Record frames to a 16-bit PCM WAV file (stdlib :mod:`wave`)."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from ..frames import FRAME_MS, PCM_DTYPE, SAMPLE_RATE

__all__ = ["WavSink"]


class WavSink:
    """A :class:`~media.frames.Sink` writing 16-bit PCM WAV.

    Args:
        path: output file; missing parent directories are created. The file is
            opened (and truncated) by the constructor.
        sample_rate: the file's rate. Frames at another rate are refused with
            ``ValueError`` (resampling is not this sink's job).
        channels: the file's channel count. Frames with a different count are mixed:
            several channels down to mono by averaging, mono up by duplication (and
            anything else via mono).

    Counters: ``frames_written`` counts :meth:`write` calls that wrote audio,
    ``samples_written`` counts samples *per channel* (WAV "sample frames"), and
    ``duration_s`` is ``samples_written / sample_rate``.

    The WAV header's length fields are fixed up by :meth:`close`; close the sink (or
    use it as a context manager) to get a well-formed file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames_written = 0
        self.samples_written = 0
        self._closed = False
        # Scratch buffers for channel mixing, sized for one 20 ms frame, grown on demand.
        frame = sample_rate * FRAME_MS // 1000
        self._acc = np.empty(frame, dtype=np.int32)
        self._mix = np.empty(frame * channels, dtype=PCM_DTYPE)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(self.path), "wb")
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)

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
        self._wav.writeframesraw(np.ascontiguousarray(out))
        self.frames_written += 1
        self.samples_written += out.size // self.channels

    def close(self) -> None:
        """Finish the WAV header and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wav.close()

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
