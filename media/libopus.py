"""libopus' decoder, called directly (ctypes), for the 50-times-a-second receive path.

PyAV reaches libopus through FFmpeg: every packet becomes an ``av.Packet``, a decode
call returns a list holding a new ``av.AudioFrame``, and each context carries FFmpeg's
own state next to libopus'. On this machine that is ~50 µs per 20 ms frame against
~33 µs for libopus alone, and ~88 kB per decoder against libopus' 18 kB. Here a call
is one ``opus_decode`` into a scratch buffer and one copy out; concealment asks libopus
for it directly (``data = NULL``), and in-band FEC — which FFmpeg's wrapper never
asks for — is one argument away (:meth:`Decoder.decode` with ``fec=True``).

The library is the one PyAV already loaded (its wheels bundle libopus; a PyAV built
against the system's FFmpeg uses the system's), else whatever ``ctypes.util`` finds.
:func:`available` says whether either worked; callers keep PyAV as their fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import weakref

import numpy as np

from .ffmpeg import loaded_library
from .frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE

__all__ = ["APPLICATIONS", "Decoder", "Encoder", "OpusError", "available", "has_fec", "library"]

log = logging.getLogger(__name__)

#: The longest an Opus packet may last.
MAX_MS = 120
#: The largest packet :class:`Encoder` asks for (libopus' recommended maximum).
MAX_PACKET = 1276 * 3
#: ``OPUS_APPLICATION_*`` by the names FFmpeg and :class:`media.opus.OpusSettings` use.
APPLICATIONS = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
_SET_BITRATE, _SET_COMPLEXITY, _SET_INBAND_FEC, _SET_PACKET_LOSS_PERC = 4002, 4010, 4012, 4014
_SET_VBR_CONSTRAINT = 4020
_GET_LOOKAHEAD = 4027
_GET_BITRATE, _GET_COMPLEXITY = 4003, 4011
_BUFFER_TOO_SMALL = -2  # OPUS_BUFFER_TOO_SMALL


class OpusError(ValueError):
    """libopus refused a packet (``code`` is its negative error number)."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"libopus: {_strerror(code)} ({code})")


def _bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    c_int, c_int32, ptr = ctypes.c_int, ctypes.c_int32, ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [c_int32, c_int, ctypes.POINTER(c_int)]
    lib.opus_decoder_create.restype = ptr
    lib.opus_decoder_destroy.argtypes = [ptr]
    lib.opus_decoder_destroy.restype = None
    lib.opus_decode.argtypes = [ptr, ctypes.c_char_p, c_int32, ptr, c_int, c_int]
    lib.opus_decode.restype = c_int
    lib.opus_encoder_create.argtypes = [c_int32, c_int, c_int, ctypes.POINTER(c_int)]
    lib.opus_encoder_create.restype = ptr
    lib.opus_encoder_destroy.argtypes = [ptr]
    lib.opus_encoder_destroy.restype = None
    lib.opus_encode.argtypes = [ptr, ptr, c_int, ptr, c_int32]
    lib.opus_encode.restype = c_int32
    lib.opus_encoder_ctl.restype = c_int  # variadic: arguments passed as ctypes objects
    lib.opus_strerror.argtypes = [c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_get_version_string.argtypes = []
    lib.opus_get_version_string.restype = ctypes.c_char_p
    if hasattr(lib, "opus_packet_has_lbrr"):  # libopus 1.5 and later
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, c_int32]
        lib.opus_packet_has_lbrr.restype = c_int
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    import av  # noqa: F401  (maps PyAV's libopus into the process)

    tried = []
    for path in (loaded_library("libopus"), ctypes.util.find_library("opus")):
        if not path or path in tried:
            continue
        tried.append(path)
        try:
            lib = _bind(path)
            return lib, f"{lib.opus_get_version_string().decode()} ({path})"
        except (OSError, AttributeError) as exc:
            log.debug("libopus at %s unusable: %s", path, exc)
    return None, f"no usable libopus (tried {', '.join(tried) or 'nothing found'})"


_lib, _where = _load()
#: Whether this libopus can tell if a packet carries FEC (1.5 and later).
_TELLS_FEC = _lib is not None and hasattr(_lib, "opus_packet_has_lbrr")


def available() -> bool:
    """Whether libopus could be bound (else callers decode through PyAV)."""
    return _lib is not None


def library() -> str:
    """libopus' version and path, or why it is not available."""
    return _where


def has_fec(payload: bytes) -> bool | None:
    """Whether an Opus packet carries in-band FEC (LBRR) for the one before it;
    ``None`` if this libopus cannot tell (before 1.5)."""
    if not _TELLS_FEC:
        return None
    return _lib.opus_packet_has_lbrr(payload, len(payload)) > 0


def _strerror(code: int) -> str:
    if _lib is None:
        return "libopus not loaded"
    return _lib.opus_strerror(code).decode(errors="replace")


class Decoder:
    """One libopus decoder: int16 PCM at ``rate`` (48 kHz default) and ``channels``.

    Every call returns a new array (a copy out of the decoder's scratch buffer), so
    callers may keep or change it. Raises :class:`OpusError` for a packet libopus
    refuses (its state is unchanged: go on with the next packet or :meth:`conceal`).
    libopus' state is freed when the object is collected."""

    __slots__ = ("rate", "channels", "_state", "_scratch", "_address", "_frame", "_finalizer",
                 "__weakref__")

    def __init__(self, rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if _lib is None:
            raise RuntimeError(_where)
        error = ctypes.c_int(0)
        state = _lib.opus_decoder_create(rate, channels, ctypes.byref(error))
        if not state or error.value:
            raise OpusError(error.value or -7)
        self.rate = rate
        self.channels = channels
        self._state = state
        self._finalizer = weakref.finalize(self, _lib.opus_decoder_destroy, state)
        self._frame = rate * FRAME_SAMPLES // SAMPLE_RATE  # 20 ms per channel
        self._scratch = np.zeros(self._frame * channels, dtype=PCM_DTYPE)  # grown for longer packets
        self._address = self._scratch.ctypes.data

    def decode(self, payload: bytes, fec: bool = False) -> np.ndarray:
        """PCM of one packet (all its frames). ``fec=True``: instead, the packet
        *before* this one, rebuilt from the in-band FEC this one carries (20 ms; what
        libopus conceals if it carries none)."""
        if fec:
            n = _lib.opus_decode(self._state, payload, len(payload), self._address, self._frame, 1)
        else:
            n = _lib.opus_decode(self._state, payload, len(payload), self._address,
                                 self._scratch.size // self.channels, 0)
            if n == _BUFFER_TOO_SMALL and self._scratch.size < self.rate * MAX_MS // 1000 * self.channels:
                # a packet longer than 20 ms (libopus checked before decoding anything)
                self._scratch = np.zeros(self.rate * MAX_MS // 1000 * self.channels, dtype=PCM_DTYPE)
                self._address = self._scratch.ctypes.data
                return self.decode(payload)
        if n < 0:
            raise OpusError(n)
        return self._scratch[: n * self.channels].copy()

    def conceal(self, samples: int | None = None) -> np.ndarray:
        """``samples`` per channel (20 ms by default) of libopus' packet-loss
        concealment (it extrapolates from what it decoded, then fades out)."""
        n = _lib.opus_decode(self._state, None, 0, self._address, samples or self._frame, 0)
        if n < 0:
            raise OpusError(n)
        return self._scratch[: n * self.channels].copy()


class Encoder:
    """One libopus encoder taking int16 frames of ``frame_ms`` at ``rate``, one packet
    per frame (``bytes``). ``application``: ``voip``, ``audio`` or ``lowdelay``;
    ``fec_loss``: in-band FEC for this much loss, percent (0: off). libopus' state is
    freed when the object is collected."""

    __slots__ = ("rate", "channels", "frame", "delay", "_state", "_out", "_address", "_input",
                 "_input_address", "_finalizer", "__weakref__")

    def __init__(self, rate: int = SAMPLE_RATE, channels: int = 1, *, application: str = "audio",
                 bitrate: int = 32_000, complexity: int = 5, fec_loss: int = 0,
                 frame_ms: int = 20) -> None:
        if _lib is None:
            raise RuntimeError(_where)
        if application not in APPLICATIONS:
            raise ValueError(f"application must be one of {sorted(APPLICATIONS)}, got {application!r}")
        error = ctypes.c_int(0)
        state = _lib.opus_encoder_create(rate, channels, APPLICATIONS[application], ctypes.byref(error))
        if not state or error.value:
            raise OpusError(error.value or -7)
        self._state = state
        self._finalizer = weakref.finalize(self, _lib.opus_encoder_destroy, state)
        handle = ctypes.c_void_p(state)
        for request, value in ((_SET_BITRATE, bitrate), (_SET_COMPLEXITY, complexity),
                               (_SET_INBAND_FEC, 1 if fec_loss else 0), (_SET_PACKET_LOSS_PERC, fec_loss),
                               (_SET_VBR_CONSTRAINT, 0)):  # unconstrained VBR, as FFmpeg asks
            status = _lib.opus_encoder_ctl(handle, ctypes.c_int(request), ctypes.c_int(value))
            if status:
                raise OpusError(status)
        # (opus_encoder_ctl is variadic: read two settings back, so an ABI where ctypes
        # passes variadic arguments differently fails here, not silently later)
        if self.settings() != {"bitrate": bitrate, "complexity": complexity}:
            raise OpusError(-1)
        lookahead = ctypes.c_int32(0)
        _lib.opus_encoder_ctl(handle, ctypes.c_int(_GET_LOOKAHEAD), ctypes.byref(lookahead))
        self.rate = rate
        self.channels = channels
        self.frame = rate * frame_ms // 1000  # samples per channel per packet
        #: Samples (at ``rate``) of lookahead: decoded audio lags the input by this much.
        self.delay = lookahead.value
        self._out = ctypes.create_string_buffer(MAX_PACKET)
        self._address = ctypes.addressof(self._out)
        self._input = np.zeros(self.frame * channels, dtype=PCM_DTYPE)
        self._input_address = self._input.ctypes.data

    def settings(self) -> dict[str, int]:
        """The ``bitrate`` and ``complexity`` libopus reports for this encoder."""
        handle = ctypes.c_void_p(self._state)
        out = {}
        for name, request in (("bitrate", _GET_BITRATE), ("complexity", _GET_COMPLEXITY)):
            got = ctypes.c_int32(-1)
            _lib.opus_encoder_ctl(handle, ctypes.c_int(request), ctypes.byref(got))
            out[name] = got.value
        return out

    def encode(self, pcm: np.ndarray) -> bytes:
        """One frame of interleaved samples (``frame * channels`` of them, int16 or
        anything numpy casts to it) to one Opus packet. ``ValueError`` for a wrong size."""
        self._input[:] = pcm  # (copied into the buffer libopus reads: ValueError if it does not fit)
        n = _lib.opus_encode(self._state, self._input_address, self.frame, self._address, MAX_PACKET)
        if n < 0:
            raise OpusError(n)
        return ctypes.string_at(self._address, n)
