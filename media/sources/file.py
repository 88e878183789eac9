"""Play an audio file (anything PyAV decodes) as a stream of 20 ms PCM frames.

:class:`FileSource` opens and checks the file in its constructor, so a missing or
unreadable file is reported before a call is placed, then decodes *lazily*: each
:meth:`FileSource.read` pulls only as many packets from the demuxer as it needs to fill
one frame. Decoded audio is converted to packed ``s16`` at the requested rate and
layout (with numpy when only the sample format differs, which is the usual case for
Opus, FLAC and WAV at 48 kHz; with ``av.AudioResampler`` otherwise) and appended to a
small reusable staging buffer, from which frames are cut. Looping replays the file
exactly: lossless files seek back to the start, lossy ones are reopened so codec
priming (Opus pre-skip, AAC delay) is applied again.

:func:`open_audio` is the shared "open this file and find its audio" step; the
analysis helpers use it too, so every entry point reports bad files the same way.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import InputContainer

from ..errors import MediaFileError
from ..frames import FRAME_MS, PCM_DTYPE, SAMPLE_RATE

__all__ = ["FileSource", "decoded_chunks", "open_audio"]

log = logging.getLogger(__name__)

#: Output layouts FileSource can produce (telephony needs no more than stereo).
_LAYOUTS = {1: "mono", 2: "stereo"}
#: Decoded sample formats converted with numpy instead of a resampler (same rate/channels).
_DIRECT_FORMATS = frozenset({"s16", "s16p", "flt", "fltp"})
#: Staging buffer size, in frames; grows on its own if a decoder emits bigger chunks.
_INITIAL_BUFFER_FRAMES = 8
#: What a closed source's buffers become (their memory is freed at close).
_EMPTY = np.empty(0, dtype=PCM_DTYPE)


def open_audio(path: str | os.PathLike[str]) -> tuple[InputContainer, AudioStream]:
    """Open ``path`` with PyAV and return ``(container, first_audio_stream)``.

    The caller owns the container and must close it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaFileError: it is not a regular file, PyAV cannot open it, or it has no
            audio stream.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, "no such media file", str(p))
    if not p.is_file():
        raise MediaFileError(p, "not a regular file")
    try:
        container = av.open(str(p), mode="r")
    except av.FFmpegError as exc:
        raise MediaFileError(p, f"PyAV cannot open it ({_describe(exc)})") from exc
    if not container.streams.audio:
        container.close()
        raise MediaFileError(p, "no audio stream")
    stream = container.streams.audio[0]
    # Audio decoders gain nothing from threads, and a gateway runs hundreds of these.
    stream.codec_context.thread_count = 1
    return container, stream


def _same(chunk: np.ndarray) -> np.ndarray:
    return chunk


def decoded_chunks(path: str | os.PathLike[str], sample_format: str) -> tuple[int, int, Iterator[np.ndarray]]:
    """Open ``path`` (:func:`open_audio`) and decode it a frame at a time into
    ``sample_format`` at its own rate and layout: ``(rate, channels, chunks)``, the
    chunks as PyAV's ``to_ndarray`` gives them (planar: ``(channels, n)``; packed:
    ``(1, n * channels)``). The file is closed when the chunks run out or the iterator
    is closed. Raises like :func:`open_audio`; a decoding error surfaces from the
    iteration as :class:`MediaFileError`."""
    container, stream = open_audio(path)
    rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels

    def chunks() -> Iterator[np.ndarray]:
        try:
            resampler = av.AudioResampler(format=sample_format, rate=rate)  # (the layout is kept)
            try:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        yield out.to_ndarray()
                for out in resampler.resample(None):
                    yield out.to_ndarray()
            except (av.FFmpegError, ValueError) as exc:
                raise MediaFileError(path, f"cannot decode its audio ({_describe(exc)})") from exc
        finally:
            container.close()

    return rate, channels, chunks()


def _describe(exc: BaseException) -> str:
    """A short human reason for a PyAV error (its strerror when it has one)."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _container_duration(container: InputContainer, stream: AudioStream) -> float | None:
    """The playable duration in seconds as the container declares it, or ``None``."""
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return None
    # Ogg/Opus granule positions count the encoder's pre-skip, which decoders drop.
    extradata = stream.codec_context.extradata or b""
    if container.format.name == "ogg" and extradata[:8] == b"OpusHead" and len(extradata) >= 12:
        seconds -= int.from_bytes(extradata[10:12], "little") / 48_000
    return max(seconds, 0.0)


class FileSource:
    """A :class:`~media.frames.Source` reading an audio file.

    Args:
        path: any file PyAV can decode (WAV, MP3, Ogg/Opus, FLAC, M4A/AAC, ...).
        sample_rate: output rate in Hz; a multiple of 50 so a 20 ms frame is whole.
        channels: 1 (mono) or 2 (interleaved stereo). Stereo files played as mono
            are averaged, mono files played as stereo are duplicated at full level, and
            other layouts get libswresample's standard downmix.
        loop: start over at the end of the file instead of ending; the passes join
            seamlessly (no padding between them).

    Each :meth:`read` returns a new int16 array of exactly
    ``sample_rate // 50 * channels`` samples that the caller owns. The last partial
    frame is zero-padded, after which :meth:`read` returns ``None`` (unless looping).

    Raises (from the constructor, before any call is placed):
        FileNotFoundError: the path does not exist.
        MediaFileError: PyAV cannot open or decode the file, or it has no audio.
        ValueError: unsupported ``sample_rate`` or ``channels``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
        loop: bool = False,
    ) -> None:
        if sample_rate <= 0 or sample_rate * FRAME_MS % 1000:
            raise ValueError(f"sample_rate must be a positive multiple of 50, got {sample_rate}")
        if channels not in _LAYOUTS:
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.loop = loop
        self._frame_len = sample_rate * FRAME_MS // 1000 * channels

        # Staging buffer: valid samples are _buf[_start:_end].
        self._buf = np.empty(self._frame_len * _INITIAL_BUFFER_FRAMES, dtype=PCM_DTYPE)
        self._start = 0
        self._end = 0
        self._eof = False  # the current pass has no more samples
        self._done = False  # nothing more will ever be decoded (end, error or close)
        self._pass_samples = 0  # samples decoded in the current pass
        self._closed = False
        # Scratch for the numpy conversion path (_convert_direct), grown on demand.
        self._scratch = np.empty(self._frame_len, dtype=np.float32)
        self._scratch16 = np.empty(self._frame_len, dtype=PCM_DTYPE)
        self._stereo = np.empty(0, dtype=PCM_DTYPE)
        self._decode_channels = channels  # channels decoded to; set per pass by _decode

        self._container, self._stream = open_audio(self.path)
        self._duration = _container_duration(self._container, self._stream)
        codec = self._stream.codec_context.name
        self._seek_to_loop = codec.startswith("pcm_") or codec == "flac"
        self._begin_pass()
        try:
            # Fail fast: decode up to the first audio so a broken stream shows up now.
            self._fill(1)
        except (av.FFmpegError, ValueError) as exc:
            self.close()
            raise MediaFileError(self.path, f"cannot decode its audio ({_describe(exc)})") from exc

    def __reduce__(self):
        """Pickled (for a media worker process) as what it was made from: the path and
        options, opened again on the other side, from the start."""
        return (functools.partial(FileSource, self.path, sample_rate=self.sample_rate,
                                  channels=self.channels, loop=self.loop), ())

    # -- Source protocol -------------------------------------------------------------

    def read(self) -> np.ndarray | None:
        """Return the next 20 ms frame (a new int16 array), or ``None`` at the end."""
        if self._closed:
            return None
        n = self._frame_len
        if self._end - self._start < n and not self._done:
            self._refill(n)
        available = self._end - self._start
        if available >= n:
            frame = self._buf[self._start : self._start + n].copy()
            self._start += n
            if self._start == self._end:
                self._start = self._end = 0  # keep appends at the front: no compaction
            return frame
        if available == 0:
            return None
        frame = np.zeros(n, dtype=PCM_DTYPE)
        frame[:available] = self._buf[self._start : self._end]
        self._start = self._end = 0
        return frame

    def close(self) -> None:
        """Stop decoding and close the file. Idempotent; ``read`` then returns ``None``."""
        if self._closed:
            return
        self._closed = True
        self._done = True
        self._chunks.close()
        self._container.close()
        # Free the decoder and buffers now, not when the last reference goes.
        self._chunks = self._container = self._stream = None
        self._buf = self._scratch = self._scratch16 = self._stereo = _EMPTY

    # -- extras ----------------------------------------------------------------------

    @property
    def duration_s(self) -> float | None:
        """The file's duration in seconds as its container declares it (one pass,
        regardless of ``loop``), or ``None`` when the container does not say."""
        return self._duration

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FileSource({str(self.path)!r}, sample_rate={self.sample_rate}, "
            f"channels={self.channels}, loop={self.loop})"
        )

    # -- decoding --------------------------------------------------------------------

    def _new_resampler(self) -> av.AudioResampler:
        layout = _LAYOUTS[self._decode_channels]
        return av.AudioResampler(format="s16", layout=layout, rate=self.sample_rate)

    def _decode(self, container: InputContainer, stream: AudioStream) -> Iterator[np.ndarray]:
        """Yield the file's audio as packed int16 chunks in the output format.

        A chunk may be a view into a PyAV frame or a scratch buffer that is reused, so
        the consumer must copy it before resuming the generator.

        Frames already at the output rate and channel count in a plain sample format
        (what Opus, FLAC and most WAV files decode to) are converted with numpy, which
        is several times cheaper per frame than a libavfilter resampling graph; any
        other frame goes through ``av.AudioResampler``. Once the resampler has been
        used (it buffers samples) every later frame goes through it too, so order is
        kept; a change of input format mid-stream gets a fresh resampler.

        A packet that fails to decode is skipped once audio has started (a glitch, not
        the end of the call); before that the error propagates, so a bad file fails
        the constructor.
        """
        resampler: av.AudioResampler | None = None
        started = False
        # Mono files played as stereo are decoded as mono and duplicated here:
        # libswresample would put the mono signal on both sides at -3 dB.
        self._decode_channels = 1 if stream.codec_context.layout.nb_channels == 1 else self.channels
        emit = self._duplicate if self._decode_channels != self.channels else _same
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                if not started:
                    raise
                log.warning("%s: skipping undecodable packet: %s", self.path, _describe(exc))
                continue
            for frame in frames:
                if not frame.samples:
                    continue
                if resampler is None:
                    chunk = self._convert_direct(frame)
                    if chunk is not None:
                        started = True
                        yield emit(chunk)
                        continue
                    resampler = self._new_resampler()
                try:
                    out = resampler.resample(frame)
                except ValueError:  # input format/layout/rate changed mid-stream
                    out = resampler.resample(None)
                    resampler = self._new_resampler()
                    out += resampler.resample(frame)
                for o in out:
                    if o.samples:
                        started = True
                        yield emit(self._packed_view(o))
        if resampler is not None:
            for o in resampler.resample(None):
                if o.samples:
                    yield emit(self._packed_view(o))

    def _packed_view(self, frame: av.AudioFrame) -> np.ndarray:
        """The samples of a packed s16 frame, without copying."""
        count = frame.samples * self._decode_channels
        return np.frombuffer(frame.planes[0], dtype=PCM_DTYPE, count=count)

    def _duplicate(self, mono: np.ndarray) -> np.ndarray:
        """Mono samples as interleaved stereo (both sides equal), in a scratch buffer."""
        if self._stereo.size < 2 * mono.size:
            self._stereo = np.empty(2 * mono.size, dtype=PCM_DTYPE)
        out = self._stereo[: 2 * mono.size]
        out.reshape(-1, 2)[:] = mono[:, None]
        return out

    def _convert_direct(self, frame: av.AudioFrame) -> np.ndarray | None:
        """``frame`` as packed int16 if only the sample format needs converting, else
        ``None``. Float is scaled like libswresample does (x * 32768, rounded to
        nearest even, clipped), so both paths give the same samples."""
        fmt = frame.format.name
        ch = self._decode_channels
        if (
            fmt not in _DIRECT_FORMATS
            or frame.sample_rate != self.sample_rate
            or frame.layout.nb_channels != ch
        ):
            return None
        count = frame.samples * ch
        if fmt == "s16":
            return np.frombuffer(frame.planes[0], dtype=PCM_DTYPE, count=count)
        if self._scratch.size < count:
            self._scratch = np.empty(count, dtype=np.float32)
            self._scratch16 = np.empty(count, dtype=PCM_DTYPE)
        out = self._scratch16[:count]
        planar = fmt.endswith("p")
        src_dtype = np.float32 if fmt.startswith("flt") else PCM_DTYPE
        per_plane = frame.samples if planar else count
        for c, plane in enumerate(frame.planes if planar else frame.planes[:1]):
            src = np.frombuffer(plane, dtype=src_dtype, count=per_plane)
            dst = out[c::ch] if planar else out
            if src_dtype is PCM_DTYPE:
                dst[:] = src
                continue
            tmp = self._scratch[: src.size]
            np.multiply(src, 32768.0, out=tmp)
            np.rint(tmp, out=tmp)
            np.maximum(tmp, -32768.0, out=tmp)
            np.minimum(tmp, 32767.0, out=tmp)
            np.copyto(dst, tmp, casting="unsafe")
        return out

    def _fill(self, need: int) -> None:
        """Decode until ``need`` samples are staged or this pass ends."""
        while self._end - self._start < need:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
                return
            self._append(chunk)

    def _refill(self, need: int) -> None:
        """:meth:`_fill`, starting new passes when looping. Errors end the source."""
        try:
            self._fill(need)
            while self._eof and self.loop and self._pass_samples and self._end - self._start < need:
                self._restart()
                self._fill(need)
        except (av.FFmpegError, OSError, ValueError) as exc:
            log.warning("%s: decoding stopped: %s", self.path, _describe(exc))
            self._done = True
            return
        if self._eof and not (self.loop and self._pass_samples):
            self._done = True  # the end (or an empty file, which cannot loop)

    def _restart(self) -> None:
        """Begin another pass over the file, identical to the first.

        Lossless codecs without decoder delay (PCM, FLAC) just seek back to the start,
        which is nearly free; other codecs are reopened, because after a seek their
        priming (Opus pre-skip, AAC edit lists) is not applied again. Reopening costs
        one ``av.open`` per pass, not per frame.
        """
        self._chunks.close()
        if self._seek_to_loop:
            try:
                self._container.seek(0)
                self._stream.codec_context.flush_buffers()
            except av.FFmpegError:
                self._seek_to_loop = False
            else:
                self._begin_pass()
                return
        self._container.close()
        self._container, self._stream = open_audio(self.path)
        self._begin_pass()

    def _begin_pass(self) -> None:
        self._chunks = self._decode(self._container, self._stream)
        self._eof = False
        self._pass_samples = 0

    def _append(self, chunk: np.ndarray) -> None:
        """Copy ``chunk`` after the staged samples, compacting or growing as needed."""
        size = chunk.size
        if self._end + size > self._buf.size:
            live = self._end - self._start
            if live + size > self._buf.size:
                capacity = max(2 * self._buf.size, live + size + self._frame_len)
                grown = np.empty(capacity, dtype=PCM_DTYPE)
                grown[:live] = self._buf[self._start : self._end]
                self._buf = grown
            else:
                self._buf[:live] = self._buf[self._start : self._end]
            self._start, self._end = 0, live
        self._buf[self._end : self._end + size] = chunk
        self._end += size
        self._pass_samples += size
