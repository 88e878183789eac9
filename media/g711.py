"""G.711 μ-law and A-law with numpy lookup tables (no ``audioop``: it is gone in 3.13).

The tables are built once at import, vectorised, from the classic Sun ``g711.c``
algorithm that CPython's ``audioop`` also uses, so the bytes match ``audioop.lin2ulaw``
/ ``ulaw2lin`` / ``lin2alaw`` / ``alaw2lin`` (width 2) exactly (checked by the tests
wherever ``audioop`` is still importable).

Encoding is one table lookup per sample (a 64 KiB table indexed by the sample's 16 raw
bits), decoding one lookup in a 256-entry table::

    ulaw = encode_ulaw(pcm)          # int16 array  -> bytes
    pcm = decode_ulaw(ulaw)          # bytes-like   -> int16 array

μ-law silence is ``0xFF`` (decodes to 0); A-law silence is ``0xD5`` (decodes to 8).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ALAW_SILENCE",
    "ULAW_SILENCE",
    "decode_alaw",
    "decode_ulaw",
    "encode_alaw",
    "encode_ulaw",
]

ULAW_SILENCE = 0xFF
ALAW_SILENCE = 0xD5

_BIAS = 0x84
_CLIP = 8159  # 14-bit magnitude clip for μ-law
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _all_int16() -> np.ndarray:
    """Every int16 value, ordered by its raw 16 bits (index = value viewed as uint16)."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)


def _build_ulaw_encoder() -> np.ndarray:
    s = _all_int16() >> 2  # 14-bit
    negative = s < 0
    mask = np.where(negative, 0x7F, 0xFF)
    mag = np.minimum(np.where(negative, -s, s), _CLIP) + (_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first end >= mag
    code = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_ulaw_decoder() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + _BIAS
    t = t << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _BIAS - t, t - _BIAS).astype(np.int16)


def _build_alaw_encoder() -> np.ndarray:
    s = _all_int16() >> 3  # 13-bit
    negative = s < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -s - 1, s)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    segc = np.minimum(seg, 7)
    low = np.where(segc < 2, mag >> 1, mag >> np.maximum(segc, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (segc << 4) | low)
    return (code ^ mask).astype(np.uint8)


def _build_alaw_decoder() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


#: ``ULAW_ENCODE[sample.view(uint16)]`` is the μ-law byte of an int16 sample.
ULAW_ENCODE = _build_ulaw_encoder()
ULAW_DECODE = _build_ulaw_decoder()
ALAW_ENCODE = _build_alaw_encoder()
ALAW_DECODE = _build_alaw_decoder()
for _table in (ULAW_ENCODE, ULAW_DECODE, ALAW_ENCODE, ALAW_DECODE):
    _table.flags.writeable = False


def _as_int16(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"expected int16 samples, got {pcm.dtype}")
    return np.ascontiguousarray(pcm)


def encode_ulaw(pcm: np.ndarray) -> bytes:
    """int16 samples → μ-law bytes (one byte per sample)."""
    return ULAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def decode_ulaw(data: bytes | bytearray | memoryview) -> np.ndarray:
    """μ-law bytes → a new int16 array."""
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def encode_alaw(pcm: np.ndarray) -> bytes:
    """int16 samples → A-law bytes (one byte per sample)."""
    return ALAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def decode_alaw(data: bytes | bytearray | memoryview) -> np.ndarray:
    """A-law bytes → a new int16 array."""
    return ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]
