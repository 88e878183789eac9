"""G.711 tables, the bridges' streaming resamplers and the bot playout queue (marks,
clear) in isolation."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from media import analysis, g711
from media.bridges.base import BotAudio, BridgeStats
from media.frames import SILENT_FRAME
from media.bridges.resample import Decimator, Interpolator, lowpass

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")  # stdlib ≤ 3.12, or audioop-lts
        except ImportError:
            return None


# -- G.711 ---------------------------------------------------------------------------------


@pytest.mark.skipif(_audioop() is None, reason="no audioop (Python ≥ 3.13 without audioop-lts)")
def test_g711_matches_audioop_byte_for_byte():
    audioop = _audioop()
    raw = ALL_INT16.tobytes()
    codes = bytes(range(256))
    assert g711.encode_ulaw(ALL_INT16) == audioop.lin2ulaw(raw, 2)
    assert g711.encode_alaw(ALL_INT16) == audioop.lin2alaw(raw, 2)
    assert g711.decode_ulaw(codes).tobytes() == audioop.ulaw2lin(codes, 2)
    assert g711.decode_alaw(codes).tobytes() == audioop.alaw2lin(codes, 2)


def test_g711_reference_values_and_round_trip():
    # Values from CPython's audioop (Sun g711.c), so this holds without audioop too.
    ulaw = {0x00: -32124, 0x0F: -16764, 0x70: -120, 0x7F: 0, 0x80: 32124, 0xFF: 0}
    alaw = {0x00: -5504, 0x2A: -32256, 0x55: -8, 0x80: 5504, 0xAA: 32256, 0xD5: 8}
    assert {c: int(g711.decode_ulaw(bytes([c]))[0]) for c in ulaw} == ulaw
    assert {c: int(g711.decode_alaw(bytes([c]))[0]) for c in alaw} == alaw
    enc = {0: ("ff", "d5"), 1: ("ff", "d5"), -1: ("7e", "55"), 32767: ("80", "aa"),
           -32768: ("00", "2a"), 1000: ("ce", "fa"), -1000: ("4e", "7a")}
    for value, (u, a) in enc.items():
        pcm = np.array([value], np.int16)
        assert (g711.encode_ulaw(pcm).hex(), g711.encode_alaw(pcm).hex()) == (u, a), value
    assert g711.ULAW_SILENCE == 0xFF and g711.ALAW_SILENCE == 0xD5
    # Every code decodes and re-encodes to itself (μ-law 0x7F is "-0" → 0xFF).
    codes = np.arange(256, dtype=np.uint8).tobytes()
    back = np.frombuffer(g711.encode_ulaw(g711.decode_ulaw(codes)), np.uint8)
    assert np.array_equal(back[np.arange(256) != 0x7F], np.arange(256)[np.arange(256) != 0x7F])
    assert np.frombuffer(g711.encode_alaw(g711.decode_alaw(codes)), np.uint8).tolist() == list(range(256))
    # Quantisation error stays within half a step of the segment (μ-law: ≤ 1/32 + 4).
    decoded = g711.decode_ulaw(g711.encode_ulaw(ALL_INT16)).astype(np.int32)
    err = np.abs(decoded - ALL_INT16.astype(np.int32))
    assert np.all(err <= np.abs(ALL_INT16.astype(np.int32)) // 16 + 64)
    with pytest.raises(TypeError):
        g711.encode_ulaw(np.zeros(4, np.float32))


# -- resamplers ----------------------------------------------------------------------------


def sine(freq: float, rate: int, n: int, amplitude: float = 0.5, delay: float = 0.0) -> np.ndarray:
    return amplitude * 32767 * np.sin(2 * np.pi * freq * (np.arange(n) - delay) / rate)


def level_db(x: np.ndarray, ref_amplitude: float = 0.5) -> float:
    rms = np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))
    return 20 * np.log10(max(rms, 1e-9) / (ref_amplitude * 32767 / np.sqrt(2)))


@pytest.mark.parametrize("factor", [6, 4, 3, 2])
def test_decimator_is_streaming_exact_and_clean(factor):
    low = 48000 // factor
    x = np.round(sine(1000, 48000, 48000)).astype(np.int16)
    whole = Decimator(factor).process(x)
    d = Decimator(factor)
    framed = np.concatenate([d.process(x[i : i + 960]) for i in range(0, x.size, 960)])
    assert framed.size == whole.size == x.size // factor
    assert np.array_equal(framed, whole)  # 20 ms frames join exactly: no clicks
    # Output is the tone delayed by the filter's group delay, within -60 dB.
    delay = (lowpass(factor).size - 1) / 2 - (factor - 1)  # in input samples
    n = np.arange(whole.size)
    ideal = 0.5 * 32767 * np.sin(2 * np.pi * 1000 * (n * factor - delay) / 48000)
    assert level_db(whole[100:] - ideal[100:]) < -60
    # A tone above the low rate's Nyquist (+0.15 of the low rate) is gone, not aliased.
    above = np.round(sine(low * 0.5 + low * 0.1, 48000, 48000)).astype(np.int16)
    assert level_db(Decimator(factor).process(above)[100:]) < -55
    # Pass band: a tone at 0.85 × Nyquist keeps its level within 0.5 dB.
    near = np.round(sine(low * 0.5 * 0.85, 48000, 48000)).astype(np.int16)
    assert abs(level_db(Decimator(factor).process(near)[100:])) < 0.5
    with pytest.raises(ValueError):
        Decimator(factor).process(np.zeros(factor + 1, np.int16))


@pytest.mark.parametrize("factor", [6, 3, 2])
def test_interpolator_is_streaming_exact_and_image_free(factor):
    low = 48000 // factor
    frame = low // 50
    x = np.round(sine(1000, low, low)).astype(np.int16)
    i = Interpolator(factor)
    assert i.quiet
    framed = np.concatenate([i.process(x[k : k + frame]) for k in range(0, x.size, frame)])
    whole = Interpolator(factor).process(x)
    assert framed.size == whole.size == x.size * factor
    assert np.array_equal(framed, whole)
    assert not i.quiet
    # Unity gain, images above the low Nyquist at least 60 dB down.
    seg = framed[4800:4800 + 24000].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    freqs = np.fft.rfftfreq(seg.size, 1 / 48000)
    main = spec[np.abs(freqs - 1000) < 50].max()
    assert 20 * np.log10(spec[freqs > low * 0.575].max() / main) < -60
    assert abs(level_db(seg) - 0) < 0.2
    # Zeros ring the filter out, then it is quiet (exact silence) again.
    i.process(np.zeros(frame, np.int16))
    assert i.quiet
    assert not i.process(np.zeros(frame, np.int16)).any()


def test_resamplers_cost_little_per_frame():
    import time

    d, i = Decimator(6), Interpolator(6)
    frame48 = np.round(sine(600, 48000, 960)).astype(np.int16)
    frame8 = np.round(sine(600, 8000, 160)).astype(np.int16)
    for _ in range(50):
        d.process(frame48), i.process(frame8)
    t0 = time.perf_counter()
    for _ in range(500):
        d.process(frame48)
        i.process(frame8)
    per_frame_us = (time.perf_counter() - t0) / 500 * 1e6
    assert per_frame_us < 500  # ~25 µs here; generous for slow CI machines


# -- playout queue: marks and clear ------------------------------------------------------


async def test_playout_queue_marks_clear_and_end():
    echoed: list[str] = []
    stats = BridgeStats()
    src = BotAudio(8000, on_mark=echoed.append, stats=stats)
    tone = np.round(sine(1000, 8000, 400)).astype(np.int16)  # 50 ms: 2.5 frames
    src.mark("early")  # nothing queued: straight back
    assert echoed == ["early"]
    src.push(tone, received_at=0.0)
    src.mark("a")
    src.push(tone.copy())
    src.mark("b")
    src.mark("c")
    assert src.buffered == 800 and echoed == ["early"]
    frames = [src.read() for _ in range(3)]
    assert all(f.size == 960 for f in frames) and echoed == ["early"]  # a's audio just went out
    assert src.read().any() and echoed == ["early", "a"]  # next frame: a echoed first
    src.read()  # B's last (half) frame goes out; b and c wait for it to play
    assert echoed == ["early", "a"]
    src.mark("d")  # nothing queued, but B is still playing and b, c are pending
    assert echoed == ["early", "a"]
    src.read()
    assert echoed == ["early", "a", "b", "c", "d"]
    assert stats.frames_played == 5 and stats.to_user.count == 1
    # Silence when empty, counted.
    src.read()
    silent = src.read()
    assert not silent.any() and stats.silence_frames >= 1
    src.mark("idle")  # nothing queued or playing: straight back
    assert echoed[-1] == "idle"
    # clear: pending marks echoed at once, in order; audio dropped.
    src.push(tone.copy())
    src.mark("x")
    src.push(tone.copy())
    src.mark("y")
    src.read()
    src.clear()
    assert echoed[-2:] == ["x", "y"] and src.buffered == 0
    assert stats.audio_cleared_s == pytest.approx(0.1 - 0.02)
    ring_out = src.read()
    assert np.count_nonzero(ring_out) <= 150
    assert not src.read().any()
    # end(drain=True): what is queued still plays, then the source ends.
    src.push(tone.copy())
    src.mark("late")
    src.end(drain=True)
    src.push(tone.copy())  # too late: ignored
    played = []
    while (f := src.read()) is not None:
        played.append(f)
    assert len(played) == 3  # 2.5 frames of audio; the ring-out fits in the third
    assert "late" not in echoed
    assert stats.audio_from_bot_s == pytest.approx(0.25)


def test_playout_queue_is_a_48k_source_at_every_rate():
    for rate in (8000, 12000, 16000, 24000, 48000):
        src = BotAudio(rate, on_mark=lambda n: None, stats=BridgeStats())
        assert (src.sample_rate, src.channels) == (48000, 1)
        src.push(np.round(sine(1000, rate, rate)).astype(np.int16))
        out = np.concatenate([src.read() for _ in range(50)])
        assert out.size == 48000
        assert abs(analysis.dominant_frequency(out[4800:], 48000) - 1000) < 1
        assert analysis.tone_seconds(out, 48000, 1000) >= 0.98
    with pytest.raises(ValueError):
        BotAudio(44100, on_mark=lambda n: None, stats=BridgeStats())


def test_playout_queue_caps_its_buffer():
    stats = BridgeStats()
    src = BotAudio(8000, on_mark=lambda n: None, stats=stats, max_buffer_s=1.0)
    for _ in range(3):
        src.push(np.zeros(4000, np.int16))
    assert src.buffered_s == 1.0
    assert stats.audio_overflow_s == pytest.approx(0.5)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_bot_audio_encodes_at_its_own_rate_and_renders_48k_only_when_read(rate):
    from media import libopus
    from media.opus import OpusSettings

    wanted = [False]
    stats = BridgeStats()
    src = BotAudio(rate, on_mark=lambda n: None, stats=stats, opus=OpusSettings(),
                   pcm_wanted=lambda: wanted[0])
    src.push(np.round(sine(1000, rate, rate)).astype(np.int16))  # 1 s
    decoder = libopus.Decoder()  # at 48 kHz, as the phone decodes
    heard, rendered = [], []
    for k in range(50):
        wanted[0] = k >= 25  # a recording starts half way
        frame = src.read()
        assert src.packet is not None
        heard.append(decoder.decode(src.packet))
        if k < 25:
            assert not frame.any() and not frame.flags.writeable  # nothing rendered
        else:
            rendered.append(frame)
    out = np.concatenate(heard)
    assert out.size == 48000
    assert analysis.dominant_frequency(out[4800:], 48000) == pytest.approx(1000, abs=2)
    assert analysis.tone_seconds(out, 48000, 1000) >= 0.95  # of 1 s
    pcm = np.concatenate(rendered[1:])  # (the resampler starts clean at frame 25)
    assert analysis.dominant_frequency(pcm, 48000) == pytest.approx(1000, abs=2)
    assert analysis.tone_seconds(pcm, 48000, 1000) >= 0.95 * pcm.size / 48000
    # nothing queued: 100 ms of silence still through this encoder (its lookahead holds
    # the end of the tone), then the shared silent frame: the track's silence packet
    assert np.count_nonzero(src.read()) <= 150 and src.packet is not None
    for _ in range(4):
        src.read()
        assert src.packet is not None
    assert src.read() is SILENT_FRAME and src.packet is None and stats.silence_frames == 6
    src.push(np.round(sine(1000, rate, rate // 10)).astype(np.int16))  # the bot speaks again
    assert src.read().any() and src.packet is not None
    src.end(drain=True)
    while src.read() is not None:
        pass
    assert src.packet is None


def test_bot_audio_at_48k_or_without_settings_leaves_encoding_to_the_track():
    from media.opus import OpusSettings

    for src in (BotAudio(48000, on_mark=lambda n: None, stats=BridgeStats(), opus=OpusSettings()),
                BotAudio(16000, on_mark=lambda n: None, stats=BridgeStats())):
        src.push(np.round(sine(1000, src.wire_rate, src.wire_rate // 10)).astype(np.int16))
        frame = src.read()
        assert src.packet is None and frame.any()


def test_latency_histogram_percentiles_are_exact_to_their_bin():
    from media.bridges.base import LatencyHistogram

    h = LatencyHistogram()
    assert h.percentile(50) is None and h.as_dict()["max"] is None
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.uniform(0.0002, 0.0009, 500),  # 0.2-0.9 ms
                             rng.uniform(0.002, 0.008, 300),  # 2-8 ms
                             rng.uniform(0.02, 0.09, 150),  # 20-90 ms
                             [0.25] * 50])  # past the last bin
    for v in values:
        h.add(float(v))
    h.add(-0.001)  # a clock step: counted in the first bin
    assert h.count == 1001
    for p in (10, 50, 70, 90, 94):
        exact = float(np.percentile(np.append(values, -0.001) * 1000, p, method="inverted_cdf"))
        width = 0.01 if exact < 1 else 0.1 if exact < 10 else 1.0
        assert abs(h.percentile(p) - exact) <= width / 2 + 1e-9, (p, h.percentile(p), exact)
    assert h.percentile(99) == h.max_ms == 250.0  # the overflow bin reports the maximum
    assert len(h._hist) * h._hist.itemsize < 1200  # 1.1 kB, not 80 kB


def test_resamplers_share_their_scratch_and_keep_their_own_state():
    """Many calls' resamplers share one copy buffer per shape (it holds nothing between
    calls): interleaving two streams gives what each gives alone."""
    a = np.round(sine(1000, 48000, 9600)).astype(np.int16)
    b = np.round(sine(3000, 48000, 9600) * 0.5).astype(np.int16)
    d_a, d_b = Decimator(3), Decimator(3)
    ref_a, ref_b = Decimator(3), Decimator(3)
    expect_a = np.concatenate([ref_a.process(a[i : i + 960]) for i in range(0, a.size, 960)])
    expect_b = np.concatenate([ref_b.process(b[i : i + 960]) for i in range(0, b.size, 960)])
    got_a, got_b = [], []
    for i in range(0, a.size, 960):  # interleaved, as the ticker runs calls one after another
        got_a.append(d_a.process(a[i : i + 960]))
        got_b.append(d_b.process(b[i : i + 960]))
    np.testing.assert_array_equal(np.concatenate(got_a), expect_a)
    np.testing.assert_array_equal(np.concatenate(got_b), expect_b)
    i_a, i_b, ref_i = Interpolator(3), Interpolator(3), Interpolator(3)
    x = expect_a
    expect = np.concatenate([ref_i.process(x[k : k + 320]) for k in range(0, x.size, 320)])
    got = []
    for k in range(0, x.size, 320):
        got.append(i_a.process(x[k : k + 320]))
        i_b.process(x[::-1][k : k + 320].copy())
    np.testing.assert_array_equal(np.concatenate(got), expect)
    assert analysis.dominant_frequency(np.concatenate(got), 48000) == pytest.approx(1000, abs=2)
    assert not hasattr(d_a._work, "rows")  # no per-resampler copy buffer
