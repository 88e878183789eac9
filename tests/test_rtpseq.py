"""One serial-number arithmetic for RTP's wrapping counters (media.rtpseq)."""

from hypothesis import given, strategies as st

from media.rtpseq import Unwrapper, newer, serial_delta


def test_serial_delta_across_the_wrap():
    assert serial_delta(2, 65534, 16) == 4 and serial_delta(65534, 2, 16) == -4
    assert serial_delta(5, 5, 16) == 0
    assert serial_delta(0, 1 << 15, 16) == -(1 << 15)  # exactly half: behind, by convention
    assert newer(1, 0xFFFFFFFF, 32) and not newer(0xFFFFFFFF, 1, 32)
    assert serial_delta(3, (7 << 16) + 65535, 16) == 4  # an extended reference works too


def test_unwrapper_keeps_counting_through_wraps_and_places_late_values():
    u = Unwrapper(16)
    seen = [u.extend(v) for v in (65530, 65535, 3, 65533, 10)]
    assert seen == [65530, 65535, 65539, 65533, 65546]
    assert u.newest == 65546


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=50))
def test_unwrapper_matches_the_unwrapped_truth(start, steps):
    """A stream whose true (unbounded) timestamps move by less than half the range per
    packet is recovered exactly from its 32-bit values."""
    u = Unwrapper(32)
    true = start
    assert u.extend(true % 2**32) == start
    for step in steps:
        true += step
        assert u.extend(true % 2**32) == true
