"""stereo.ogg: both legs' Opus packets in one two-stream Ogg file, aligned in 20 ms slots.

Files are decoded by FFmpeg's own Opus decoder (``analysis.read_channels``), not by
anything of wacall's, so the framing is checked by an independent implementation."""

from __future__ import annotations

import av
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from media import analysis
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.opus import OpusEncoder
from media.sinks.ogg import OggOpusWriter, opus_packet_samples, read_ogg_packets, self_delimited
from media.sinks.recorder import CallRecorder
from media.sinks.stereo_opus import AlignedOpusRecorder


def tone(hz: float, start: int, count: int, amplitude: float = 0.25) -> np.ndarray:
    n = np.arange(start, start + count)
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * n / SAMPLE_RATE)).astype(np.int16)


def frames20(hz: float, count: int) -> list[np.ndarray]:
    return [tone(hz, k * FRAME_SAMPLES, FRAME_SAMPLES) for k in range(count)]


def encoded20(hz: float, count: int) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(frame) for frame in frames20(hz, count)]


def pyav_packets(hz: float, seconds: float, frame_ms: float, *, vbr: bool = True,
                 application: str = "audio", bitrate: int = 48000) -> list[bytes]:
    """Packets of ``frame_ms`` from FFmpeg's libopus encoder (multi-frame packets:
    codes 1, 2, 3), 48 kHz mono."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = SAMPLE_RATE, "mono", "s16", bitrate
    ctx.options = {"frame_duration": str(frame_ms), "vbr": "on" if vbr else "off", "application": application}
    size = round(SAMPLE_RATE * frame_ms / 1000)
    out: list[bytes] = []
    for k in range(round(seconds * 1000 / frame_ms)):
        frame = av.AudioFrame.from_ndarray(tone(hz, k * size, size).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, k * size
        out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    return out


def padded(packet: bytes, padding: int) -> bytes:
    """A one-frame packet made a code 3 packet with ``padding`` bytes of padding."""
    assert packet[0] & 3 == 0
    lengths = b""
    rest = padding
    while rest >= 255:
        lengths += b"\xff"
        rest -= 254
    lengths += bytes((rest,))
    return bytes((packet[0] | 3, 0x41)) + lengths + packet[1:] + bytes(padding)


def combined(a: bytes, b: bytes) -> bytes:
    """Two one-frame packets of the same configuration as one two-frame packet: code 1
    when the frames are of equal size, else code 2 (what libopus' repacketizer makes)."""
    assert a[0] == b[0] and a[0] & 3 == 0
    if len(a) == len(b):
        return bytes((a[0] | 1,)) + a[1:] + b[1:]
    n = len(a) - 1
    length = bytes((n,)) if n < 252 else bytes((252 + (n & 3), (n - 252 - (n & 3)) >> 2))
    return bytes((a[0] | 2,)) + length + a[1:] + b[1:]


def pairs(packets: list[bytes]) -> list[bytes]:
    return [combined(packets[i], packets[i + 1]) for i in range(0, len(packets) - 1, 2)]


def write_two_streams(path, left: list[bytes], right: list[bytes]) -> None:
    writer = OggOpusWriter(path, channels=2, streams=2)
    for a, b in zip(left, right):
        assert opus_packet_samples(a) == opus_packet_samples(b)
        writer.write_packet(self_delimited(a) + b, opus_packet_samples(a))
    writer.close()


@pytest.mark.parametrize("kind", ["code0", "code1-cbr", "code2-vbr", "code3-cbr", "code3-vbr", "code3-padded",
                                  "code3-long-padding"])
def test_self_delimited_packets_make_a_playable_two_stream_file(tmp_path, kind, rtp_core):
    if kind == "code0":
        left, right = encoded20(600, 50), encoded20(1000, 50)
    elif kind.startswith("code3-pad") or kind == "code3-long-padding":
        pad = 300 if kind == "code3-long-padding" else 7
        left = [padded(p, pad) for p in encoded20(600, 50)]
        right = [padded(p, pad) for p in encoded20(1000, 50)]
    elif kind.startswith(("code1", "code2")):
        vbr = kind.endswith("vbr")
        left = pairs(pyav_packets(600, 1.2, 20, vbr=vbr, bitrate=64000))  # (one TOC throughout)
        right = pairs(pyav_packets(1000, 1.2, 20, vbr=vbr, bitrate=64000))
    else:
        vbr = kind.endswith("vbr")
        left = pyav_packets(600, 1.2, 60, vbr=vbr)
        right = pyav_packets(1000, 1.2, 60, vbr=vbr)
    codes = {p[0] & 3 for p in left}
    assert int(kind[4]) in codes  # the packets are of the framing under test
    path = tmp_path / "two.ogg"
    write_two_streams(path, left, right)
    (l, r), rate = analysis.read_channels(path)
    seconds = l.size / rate
    assert seconds == pytest.approx(sum(map(opus_packet_samples, left)) / SAMPLE_RATE, abs=0.001)
    assert analysis.tone_seconds(l, rate, 600) >= seconds - 0.1
    assert analysis.tone_seconds(r, rate, 1000) >= seconds - 0.1
    assert analysis.tone_seconds(l, rate, 1000) == analysis.tone_seconds(r, rate, 600) == 0


@pytest.mark.parametrize("packet", [b"", b"\x02", b"\x02\xfd", b"\x02\x05abc", b"\x03", b"\x03\x00",
                                    b"\x03\x02abc", b"\x03\x42\xff", b"\x03\x82\xfc", b"\x03\x41\x09ab",
                                    b"\x01abc"], ids=repr)
def test_malformed_packets_are_refused(packet):
    with pytest.raises(ValueError):
        self_delimited(packet)


def test_long_frames_take_two_length_bytes(tmp_path, rtp_core):
    left = pyav_packets(600, 1.0, 20, bitrate=256000)  # (~640 bytes a packet)
    assert max(map(len, left)) > 300
    right = encoded20(1000, len(left))
    path = tmp_path / "big.ogg"
    write_two_streams(path, left, right[: len(left)])
    (l, r), rate = analysis.read_channels(path)
    assert analysis.tone_seconds(l, rate, 600) >= l.size / rate - 0.1
    assert analysis.tone_seconds(r, rate, 1000) >= r.size / rate - 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gaps_late_reordered_and_malformed_packets(tmp_path, rtp_core):
    clock = Clock()
    rec = AlignedOpusRecorder(tmp_path / "s.ogg", clock=clock)
    t0 = clock.now
    user, business = encoded20(600, 150), encoded20(1000, 150)
    held = None
    for k in range(150):
        clock.now = t0 + k * 0.02
        if k == 20:
            rec.left.write_packet(b"\x03\x00", k * 960, clock.now + 0.004)  # malformed: skipped
        if 50 <= k < 75:  # half a second lost on the user's side
            pass
        elif k == 100:
            held = user[k]  # arrives after the next one (reordered)
        else:
            rec.left.write_packet(user[k], k * 960, clock.now + 0.004)
            if k == 101:
                rec.left.write_packet(held, 100 * 960, clock.now + 0.005)
        rec.right.write_packet(business[k], k * 960, clock.now)
    rec.left.write_packet(user[149], 149 * 960, clock.now + 0.01)  # a duplicate: dropped
    rec.close()
    (l, r), rate = analysis.read_channels(rec.path)
    assert l.size == r.size == 150 * 960
    assert analysis.tone_seconds(r, rate, 1000) >= 2.98
    segments = analysis.tone_segments(l, rate, 600)
    assert len(segments) == 2 and segments[0][0] == pytest.approx(0.0, abs=0.03)
    assert segments[0][1] == pytest.approx(1.0, abs=0.03) and segments[1][0] == pytest.approx(1.5, abs=0.03)
    assert segments[1][1] == pytest.approx(3.0, abs=0.03)  # the reordered packet in its place
    assert rec.left.undecodable == 1 and rec.left.resyncs == 0 and rec.left.late == 0
    assert rec.left.dropped == 1
    assert rec.filled == [25, 0]  # the lost half second: silence packets on the left only
    assert rec.left.packets == 125 and rec.right.packets == 150


def test_a_leg_that_stalls_is_placed_again_by_its_arrival(tmp_path, rtp_core):
    """A sender that pauses without advancing its timestamps: its packets after the pause
    re-anchor on their arrival time (as in stereo.wav), the pause stays silence."""
    clock = Clock()
    rec = AlignedOpusRecorder(tmp_path / "s.ogg", clock=clock)
    t0 = clock.now
    user, business = encoded20(600, 100), encoded20(1000, 150)
    for k in range(150):
        clock.now = t0 + k * 0.02
        if k < 50:
            rec.left.write_packet(user[k], k * 960, clock.now)
        elif k >= 100:  # a second later, timestamps go on from where they stopped
            rec.left.write_packet(user[k - 50], (k - 50) * 960, clock.now)
        rec.right.write_packet(business[k], k * 960, clock.now)
    rec.close()
    (l, r), rate = analysis.read_channels(rec.path)
    segments = analysis.tone_segments(l, rate, 600)
    assert [(round(a, 1), round(b, 1)) for a, b in segments] == [(0.0, 1.0), (2.0, 3.0)]
    assert rec.left.resyncs == 1 and rec.filled == [50, 0]


@pytest.mark.parametrize("frame_ms", [10, 40, 60])
def test_a_leg_whose_packets_are_not_20ms_is_transcoded(tmp_path, frame_ms, rtp_core):
    clock = Clock()
    rec = AlignedOpusRecorder(tmp_path / "s.ogg", clock=clock)
    t0 = clock.now
    user = pyav_packets(600, 2.0, frame_ms)
    size = round(SAMPLE_RATE * frame_ms / 1000)
    business = encoded20(1000, 100)
    k_user = 0
    for k in range(100):
        clock.now = t0 + k * 0.02
        while k_user < len(user) and k_user * size <= k * 960:
            rec.left.write_packet(user[k_user], k_user * size, t0 + k_user * size / SAMPLE_RATE)
            k_user += 1
        rec.right.write_packet(business[k], k * 960, clock.now)
    rec.close()
    (l, r), rate = analysis.read_channels(rec.path)
    assert rec.left.transcoded >= 100 * 20 // frame_ms - 2 and rec.right.transcoded == 0
    assert analysis.tone_seconds(l, rate, 600) == pytest.approx(2.0, abs=0.08)
    assert analysis.tone_seconds(r, rate, 1000) == pytest.approx(2.0, abs=0.04)


def test_a_recorder_without_a_peer_encodes_what_it_is_given(tmp_path, rtp_core):
    recorder = CallRecorder(tmp_path / "pcm", wav=False, stereo=False, ogg=False, stereo_ogg=True)
    assert recorder.user.needs_pcm  # (no packets to pass through: it needs the audio)
    for left, right in zip(frames20(600, 50), frames20(1000, 50)):
        recorder.user.write(left, SAMPLE_RATE)
        recorder.business.write(right, SAMPLE_RATE)
    sidecar = recorder.close()
    (l, r), rate = analysis.read_channels(recorder.paths["stereo_ogg"])
    assert analysis.tone_seconds(l, rate, 600) == pytest.approx(1.0, abs=0.04)
    assert analysis.tone_seconds(r, rate, 1000) == pytest.approx(1.0, abs=0.04)
    assert sidecar["files"] == {"stereo_ogg": "stereo.ogg"}
    assert sidecar["durations_s"]["stereo_ogg"] == pytest.approx(1.0, abs=0.04)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=40))
def test_any_payload_is_placed_or_counted_never_raised(tmp_path_factory, payloads):
    """Whatever the far side sends as Opus, stereo.ogg takes it or counts it: no exception
    reaches the receive path, and the file stays whole Ogg pages, one packet per slot."""
    clock = Clock()
    rec = AlignedOpusRecorder(tmp_path_factory.mktemp("fuzz") / "s.ogg", clock=clock)
    t0 = clock.now
    for k, payload in enumerate(payloads):
        clock.now = t0 + k * 0.02
        rec.left.write_packet(payload, k * 960, clock.now)
        rec.right.write_packet(b"\xf8\xff\xfe", k * 960, clock.now)
    rec.close()
    assert rec.right.packets == len(payloads)
    assert rec.left.packets + rec.left.dropped + rec.left.undecodable >= sum(1 for p in payloads if p) - 1
    packets, granule = read_ogg_packets(rec.path)
    assert granule == len(packets) * 960 and len(packets) == round(rec.duration_s * 50)
    for packet in packets:  # each a self-delimited left packet followed by the right one
        assert packet.endswith(b"\xf8\xff\xfe")


# -- the C core's OpusRing against the Python reference --------------------------------------

_PLAIN = bytes((0x08 | 0x70,)) + b"\x01" * 40  # (config 15 << 3: hybrid FB 20 ms, code 0)


_RING_OPS = st.lists(
    st.tuples(
        st.sampled_from(["packet", "stored", "emit", "anchor", "commit", "set_end"]),
        st.sampled_from([0, 1]),
        st.sampled_from([_PLAIN, _PLAIN[:1] + bytes(260), b"\x0b\x05abc", b"\x78" + bytes(3), b"", b"\xfc\x00"]),
        st.one_of(st.none(), st.integers(-5_000, 300_000)),
        st.floats(-0.05, 0.3, allow_nan=False),
        st.integers(-3, 40),
    ),
    min_size=1, max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(_RING_OPS, st.one_of(st.none(), st.integers(1, 12)), st.sampled_from([(30, 15, 10), (4, 1, 1), (30, 0, 3)]))
def test_the_c_ring_places_and_commits_as_the_reference_does(ops, fail_at, shape):
    from media.sinks import stereo_opus
    from tests.helpers import native_rtp_core

    core = native_rtp_core()
    ring_len, max_delay, chunk = shape
    rings, writes = [], []
    for kind in (stereo_opus.OpusRing, core.OpusRing):
        written: list[list[bytes]] = []
        calls = [0]

        def write(packets, written=written, calls=calls):
            calls[0] += 1
            if calls[0] == fail_at:
                raise OSError(28, "No space left on device")
            written.append(list(packets))

        rings.append(kind(ring_len, max_delay, chunk, 4800, 100.0, b"\xf8\x00", b"\xf8", stereo_opus._PLAIN_20MS,
                          write))
        writes.append(written)
    at = 100.0
    for kind, channel, payload, pts, step, slots in ops:
        at += step
        results = []
        for ring in rings:
            try:
                if kind == "packet":
                    out = ring.packet(channel, payload, pts, at)
                elif kind == "stored":
                    out = ring.packet(channel, payload, pts, at, payload + b"!")
                elif kind == "emit":
                    out = ring.emit(channel, payload + b"?", at)
                elif kind == "anchor":
                    out = ring.anchor_place(channel, pts, at, slots * FRAME_SAMPLES)
                elif kind == "commit":
                    out = ring.commit(ring.committed + slots)
                else:
                    out = ring.set_end(channel, max(0, slots))
            except OSError as exc:
                out = ("raised", exc.errno)
            results.append((out, ring.leg(0), ring.leg(1), ring.filled, ring.committed))
        assert results[0] == results[1], (kind, channel, payload, pts, at)
        assert writes[0] == writes[1]


def test_a_ring_left_in_a_cycle_is_collected():
    """The recorder holds its ring and the ring the recorder's write: the garbage
    collector must free both (the C type takes part in collection)."""
    import gc
    import weakref

    from media.sinks import stereo_opus
    from tests.helpers import native_rtp_core

    core = native_rtp_core()

    class Holder:
        def write(self, packets):
            pass

    holder = Holder()
    holder.ring = core.OpusRing(30, 15, 10, 4800, 0.0, b"\xf8\x00", b"\xf8", stereo_opus._PLAIN_20MS, holder.write)
    assert holder.ring.packet(0, _PLAIN, 0, 0.0) == stereo_opus.PLACED  # (a slot holds a packet)
    gone = weakref.ref(holder)
    del holder
    gc.collect()
    assert gone() is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.one_of(st.binary(min_size=1, max_size=40),
                                              st.sampled_from([bytes(254), bytes(255), bytes(256), bytes(510)])),
                                    max_size=90), st.booleans()), max_size=12),
       st.sampled_from([0.02, 0.1, 0.2, 3600]))
@example(batches=[([b"x"] * 90, False)] * 2 + [([b"x"] * 70, False), ([bytes(300)] * 3, False)], page_s=3600)
def test_packets_written_in_bulk_make_the_same_pages(tmp_path_factory, batches, page_s):
    """OggOpusWriter.write_packets (each stereo.ogg commit) lays out pages exactly as
    write_packet one packet at a time does."""
    base = tmp_path_factory.mktemp("bulk")
    one, bulk = (OggOpusWriter(base / name, channels=2, streams=2, flush_interval_s=page_s) for name in ("1", "2"))
    for w in (one, bulk):
        w._serial = 1234  # (random per file otherwise)
    for batch, flush in batches:
        for packet in batch:
            one.write_packet(packet, FRAME_SAMPLES)
        bulk.write_packets(batch, FRAME_SAMPLES)
        if flush:
            one.flush()
            bulk.flush()
    one.close()
    bulk.close()
    assert (base / "1").read_bytes() == (base / "2").read_bytes()
    assert one.packets == bulk.packets and one.samples == bulk.samples
