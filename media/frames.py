"""The two small protocols every media piece implements, and the frame constants.

A call's audio moves in 20 ms frames of signed 16-bit PCM held in numpy arrays
(interleaved when there is more than one channel). WhatsApp's media is Opus at
48 kHz with a 20 ms ptime, so that is the native rate here: a frame is 960 samples.

* A :class:`Source` produces frames (a file, a tone, later a bot).
* A :class:`Sink` consumes frames (a WAV recorder, later meters and bots).

Both are synchronous and cheap per call: the pacing clock (``media.track``) and the
receive pump (``media.peer``) call them once per frame on the event loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 48_000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 960

PCM_DTYPE = np.int16


@runtime_checkable
class Source(Protocol):
    """Produces 20 ms frames of int16 PCM at ``sample_rate`` with ``channels`` channels."""

    sample_rate: int
    channels: int

    def read(self) -> np.ndarray | None:
        """Return the next 20 ms frame (``sample_rate // 50 * channels`` int16 samples,
        interleaved), or ``None`` once the source is exhausted."""
        ...

    def close(self) -> None:
        """Release whatever the source holds (files, decoders). Idempotent."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Consumes int16 PCM frames."""

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Consume one frame of interleaved int16 samples."""
        ...

    def close(self) -> None:
        """Flush and release. Idempotent; ``write`` after ``close`` is ignored."""
        ...


def silence(sample_rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """One 20 ms frame of digital silence."""
    return np.zeros(sample_rate * FRAME_MS // 1000 * channels, dtype=PCM_DTYPE)


#: What a 48 kHz mono source returns, by identity, when it has nothing to say now but
#: is not finished (a bot between sentences): the outbound track then sends its cached
#: silence packet instead of encoding zeros. Shared and read-only.
SILENT_FRAME = silence()
SILENT_FRAME.flags.writeable = False
