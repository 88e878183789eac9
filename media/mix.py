"""Composition: a play queue with barge-in, a mixer, a tee and resampler stages.

Everything here speaks the frame protocols of :mod:`media.frames` (20 ms int16 PCM at
48 kHz unless a stage says otherwise), so pieces nest: a :class:`Mixer` can mix a
:class:`PlayQueue` (prompts) with background music, a :class:`Tee` can feed a recorder
and a meter from one receive pump, a :class:`ResampledSink` can hand 16 kHz audio to a
speech recogniser.

Frames returned by these sources may live in reused buffers (mixer output) or be
read-only views of shared tables (tones, prompts): consume or copy each frame before
reading the next one, and never modify it.

Pre-encoded sources (:class:`media.sources.prompt.PromptSource`) also expose the Opus
packet of the frame just read as ``source.packet``; :class:`PlayQueue` forwards it
(``queue.packet``) so the outbound track can send it without encoding. Stages that
change samples (the mixer, resamplers) naturally produce PCM only.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
from collections.abc import Iterable

import av
import numpy as np

from .clock import FRAME_S
from .frames import FRAME_MS, FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE, Sink, Source

__all__ = ["Playback", "PlayQueue", "Mixer", "Tee", "ResampledSource", "ResampledSink"]

_LAYOUTS = {1: "mono", 2: "stereo"}


class Playback:
    """One queued source. ``done`` resolves (to the seconds played) when it ends,
    is cleared, or the track stops.

    ``frames`` counts frames read from the source, ``packets`` those of them that went
    out as pre-encoded Opus (no encoding), ``started_at`` is the event-loop time of its
    first frame.
    """

    def __init__(self, source: Source):
        if source.sample_rate != SAMPLE_RATE:
            raise ValueError(f"sources must be {SAMPLE_RATE} Hz here, got {source.sample_rate}")
        if source.channels not in (1, 2):
            raise ValueError(f"sources must be mono or stereo, got {source.channels} channels")
        self.source = source
        self.frames = 0
        self.packets = 0
        self.started_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[float] = self._loop.create_future()

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_S

    @property
    def finished(self) -> bool:
        return self.done.done()

    def _finish(self) -> None:
        self.source.close()
        if not self.done.done():
            self.done.set_result(self.seconds)

    def __repr__(self) -> str:
        return f"Playback({self.source!r}, frames={self.frames}, done={self.done.done()})"


class PlayQueue:
    """A FIFO of sources played one after another, as a mono 48 kHz source.

    :meth:`read` returns the next frame of the head playback, moving on (and resolving
    ``Playback.done``) when a source ends, or ``None`` when nothing is queued — "nothing
    *now*": the queue stays usable. :meth:`clear` takes effect on the very next
    :meth:`read` (barge-in within one frame). Stereo sources are downmixed into a
    reused buffer.

    After each :meth:`read`, :attr:`packet` holds the pre-encoded Opus payload of that
    frame when the playing source has one (``source.packet``), else ``None``.
    """

    sample_rate = SAMPLE_RATE
    channels = 1

    def __init__(self) -> None:
        self._items: collections.deque[Playback] = collections.deque()
        self._mono = np.empty(FRAME_SAMPLES, dtype=PCM_DTYPE)
        self.packet: bytes | None = None
        #: ``(sum of squares, peak)`` of the last frame read, when its source knew them
        #: (a prompt: measured once); ``None``: measure the frame if needed.
        self.level: tuple[float, int] | None = None
        #: The playback the last :meth:`read` frame came from (``None`` = silence).
        self.current: Playback | None = None

    def play(self, source: Source) -> Playback:
        """Queue ``source`` after whatever is queued; returns its :class:`Playback`."""
        playback = Playback(source)
        self._items.append(playback)
        return playback

    def clear(self) -> None:
        """Stop the current playback and drop everything queued (barge-in)."""
        items = self._items
        while items:
            items.popleft()._finish()
        self.packet = None

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def playbacks(self) -> list[Playback]:
        return list(self._items)

    @property
    def head(self) -> Playback | None:
        """The playback the next :meth:`read` reads from (``None``: nothing queued)."""
        return self._items[0] if self._items else None

    def read(self) -> np.ndarray | None:
        items = self._items
        while items:
            playback = items[0]
            source = playback.source
            pcm = source.read()
            if pcm is None:
                items.popleft()._finish()
                continue
            if playback.started_at is None:
                playback.started_at = playback._loop.time()
            playback.frames += 1
            self.current = playback
            if source.channels == 2:
                self.packet = self.level = None
                np.right_shift(pcm[0::2], 1, out=self._mono)
                self._mono += pcm[1::2] >> 1
                return self._mono
            self.packet = getattr(source, "packet", None)
            self.level = getattr(source, "level", None)
            return pcm
        self.packet = self.level = None
        self.current = None
        return None

    def close(self) -> None:
        self.clear()


class Mixer:
    """Mixes several 48 kHz sources into one mono source.

    Each input is accumulated in int32 (with an optional gain, applied in Q15 fixed
    point) and the sum saturates to int16 instead of wrapping. An input that ends
    (``read()`` returns ``None``) is dropped and closed, unless it was added with
    ``keep=True`` (e.g. a :class:`PlayQueue` that may get more later), which then
    contributes silence. The mixer itself ends when no inputs are left, unless
    ``endless``.

    :meth:`read` returns a reused buffer: consume it before the next read.
    """

    sample_rate = SAMPLE_RATE
    channels = 1

    def __init__(self, *sources: Source, endless: bool = False) -> None:
        self.endless = endless
        self._inputs: list[tuple[Source, int, bool]] = []
        self._acc = np.empty(FRAME_SAMPLES, dtype=np.int32)
        self._tmp = np.empty(FRAME_SAMPLES, dtype=np.int32)
        self._out = np.empty(FRAME_SAMPLES, dtype=PCM_DTYPE)
        self._closed = False
        for source in sources:
            self.add(source)

    def add(self, source: Source, *, gain: float = 1.0, keep: bool = False) -> None:
        if source.sample_rate != SAMPLE_RATE:
            raise ValueError(f"mixer inputs must be {SAMPLE_RATE} Hz (wrap in ResampledSource)")
        if source.channels not in (1, 2):
            raise ValueError("mixer inputs must be mono or stereo")
        if not 0 <= gain <= 8:
            raise ValueError(f"gain must be in [0, 8], got {gain}")
        self._inputs.append((source, round(gain * 32768), keep))

    def remove(self, source: Source) -> None:
        self._inputs = [i for i in self._inputs if i[0] is not source]

    @property
    def inputs(self) -> list[Source]:
        return [i[0] for i in self._inputs]

    def read(self) -> np.ndarray | None:
        if self._closed:
            return None
        acc, tmp = self._acc, self._tmp
        acc.fill(0)
        ended = None
        for entry in self._inputs:
            source, gain_q15, keep = entry
            pcm = source.read()
            if pcm is None:
                if not keep:
                    ended = ended or []
                    ended.append(entry)
                continue
            if source.channels == 2:
                np.add(pcm[0::2], pcm[1::2], out=tmp, dtype=np.int32)
                np.right_shift(tmp, 1, out=tmp)
                pcm = tmp
            if gain_q15 == 32768:
                np.add(acc, pcm, out=acc, dtype=np.int32)
            else:
                np.multiply(pcm, gain_q15, out=tmp, dtype=np.int32)
                np.right_shift(tmp, 15, out=tmp)
                acc += tmp
        if ended:
            for entry in ended:
                self._inputs.remove(entry)
                entry[0].close()
            if not self._inputs and not self.endless:
                return None
        elif not self._inputs and not self.endless:
            return None
        np.clip(acc, -32768, 32767, out=acc)
        np.copyto(self._out, acc, casting="unsafe")
        return self._out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for source, _, _ in self._inputs:
            source.close()
        self._inputs.clear()


class Tee:
    """One stream to several sinks: each :meth:`write` goes to every sink in order.

    Sinks must not modify the frame (they all see the same array)."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks: list[Sink] = list(sinks)
        self._closed = False

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def remove(self, sink: Sink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed:
            return
        for sink in self.sinks:
            sink.write(pcm, sample_rate, channels)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            sink.close()


def _check_rate(rate: int) -> int:
    if rate <= 0 or rate * FRAME_MS % 1000:
        raise ValueError(f"sample rate must be a positive multiple of 50, got {rate}")
    return rate


class ResampledSource:
    """A source at another rate (8, 16, 24, 44.1 kHz...) or channel count, converted to
    20 ms frames at ``sample_rate`` (48 kHz by default) with PyAV's ``AudioResampler``.

    The resampler's output is cut into exact 20 ms frames; the tail is zero-padded.
    """

    def __init__(self, source: Source, *, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if channels not in _LAYOUTS or source.channels not in _LAYOUTS:
            raise ValueError("channels must be 1 or 2")
        self.source = source
        self.sample_rate = _check_rate(sample_rate)
        self.channels = channels
        self._in_layout = _LAYOUTS[source.channels]
        self._in_rate = _check_rate(source.sample_rate)
        self._frame_len = sample_rate * FRAME_MS // 1000 * channels
        self._resampler = av.AudioResampler(format="s16", layout=_LAYOUTS[channels], rate=sample_rate)
        self._buf = np.empty(self._frame_len * 4, dtype=PCM_DTYPE)
        self._have = 0
        self._in_pts = 0
        self._eof = False
        self._out = np.empty(self._frame_len, dtype=PCM_DTYPE)

    def _push(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            data = frame.to_ndarray().reshape(-1)
            need = self._have + data.size
            if need > self._buf.size:
                grown = np.empty(max(need, 2 * self._buf.size), dtype=PCM_DTYPE)
                grown[: self._have] = self._buf[: self._have]
                self._buf = grown
            self._buf[self._have : need] = data
            self._have = need

    def read(self) -> np.ndarray | None:
        n = self._frame_len
        while self._have < n and not self._eof:
            pcm = self.source.read()
            if pcm is None:
                self._eof = True
                self._push(self._resampler.resample(None))
                break
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=self._in_layout
            )
            frame.sample_rate = self._in_rate
            frame.pts = self._in_pts
            frame.time_base = fractions.Fraction(1, self._in_rate)
            self._in_pts += pcm.size // self.source.channels
            self._push(self._resampler.resample(frame))
        if self._have == 0:
            return None
        out = self._out
        take = min(n, self._have)
        out[:take] = self._buf[:take]
        if take < n:
            out[take:] = 0
        self._buf[: self._have - take] = self._buf[take : self._have]
        self._have -= take
        return out

    def close(self) -> None:
        self._eof = True
        self._have = 0
        self.source.close()


class ResampledSink:
    """Feeds ``sink`` at ``sample_rate`` / ``channels`` (e.g. 16 kHz mono for a speech
    recogniser, 8 kHz for G.711 archives) from 48 kHz frames.

    Output comes in whole 20 ms frames (``sample_rate // 50`` samples per channel), so a
    frame-based sink downstream sees the usual framing; a partial tail is flushed,
    zero-padded, on :meth:`close`.
    """

    def __init__(self, sink: Sink, *, sample_rate: int, channels: int = 1) -> None:
        if channels not in _LAYOUTS:
            raise ValueError("channels must be 1 or 2")
        self.sink = sink
        self.sample_rate = _check_rate(sample_rate)
        self.channels = channels
        self._frame_samples = sample_rate * FRAME_MS // 1000
        self._resampler: av.AudioResampler | None = None
        self._in_key: tuple[int, int] | None = None
        self._pts = 0
        self._closed = False

    def _new_resampler(self) -> av.AudioResampler:
        return av.AudioResampler(
            format="s16", layout=_LAYOUTS[self.channels], rate=self.sample_rate,
            frame_size=self._frame_samples,
        )

    def _emit(self, frames: Iterable[av.AudioFrame], pad: bool = False) -> None:
        for frame in frames:
            data = frame.to_ndarray().reshape(-1)
            want = self._frame_samples * self.channels
            if data.size < want:
                if not pad or data.size == 0:
                    continue
                data = np.concatenate([data, np.zeros(want - data.size, dtype=PCM_DTYPE)])
            self.sink.write(data, self.sample_rate, self.channels)

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed:
            return
        if channels not in _LAYOUTS:
            raise ValueError("channels must be 1 or 2")
        key = (sample_rate, channels)
        if self._resampler is None or key != self._in_key:
            if self._resampler is not None:
                self._emit(self._resampler.resample(None), pad=True)
            self._resampler = self._new_resampler()
            self._in_key = key
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=_LAYOUTS[channels]
        )
        frame.sample_rate = sample_rate
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, sample_rate)
        self._pts += pcm.size // channels
        self._emit(self._resampler.resample(frame))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resampler is not None:
            self._emit(self._resampler.resample(None), pad=True)
        self.sink.close()
