"""RTP's wrapping counters: one serial-number arithmetic for sequence numbers (16 bit)
and timestamps (32 bit), used by the playout buffer, the RTP tap and DTMF.

RTP counters wrap around; two values are compared by their distance modulo 2**bits
(RFC 1982 serial numbers): within half the range, the one ahead is the newer. An
:class:`Unwrapper` turns a wrapping counter into an ever-growing one, relative to the
newest value it has seen.
"""

from __future__ import annotations

__all__ = ["Unwrapper", "newer", "serial_delta"]


def serial_delta(a: int, b: int, bits: int) -> int:
    """How far ``a`` is ahead of ``b`` (negative: behind), in ``[-2**(bits-1), 2**(bits-1))``.
    ``b`` may be an extended (unwrapped) value; only its low ``bits`` count."""
    half = 1 << (bits - 1)
    return ((a - b + half) & ((1 << bits) - 1)) - half


def newer(a: int, b: int, bits: int) -> bool:
    """``a`` comes after ``b`` (RFC 1982)."""
    return serial_delta(a, b, bits) > 0


class Unwrapper:
    """Extends a ``bits``-wide wrapping counter: the first value maps to itself, each
    later one to the extended value nearest the newest seen (within half the range,
    older or newer)."""

    __slots__ = ("bits", "newest")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        #: The newest extended value, or ``None`` before the first.
        self.newest: int | None = None

    def extend(self, value: int) -> int:
        newest = self.newest
        if newest is None:
            self.newest = value
            return value
        extended = newest + serial_delta(value, newest, self.bits)
        if extended > newest:
            self.newest = extended
        return extended
