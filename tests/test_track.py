"""OutboundAudioTrack: inline Opus encoding, pre-encoded pass-through with continuous
timestamps, the outbound tap, pacing statistics, barge-in, and file playback heard by a
real far side (found by cross-correlation)."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest

from media import analysis
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.peer import PeerConfig
from media.sinks.wav import WavSink
from media.sources.file import FileSource
from media.sources.prompt import Prompt
from media.sources.tone import ToneSource
from media.track import OutboundAudioTrack
from media_call import TIMEOUT, FrameGate, PtsRecorder, SendLog, call_pair, chirp, locate, read_wav


def decode_packets(packets: list[bytes]) -> np.ndarray:
    ctx = av.CodecContext.create("libopus", "r")
    ctx.format = "s16"
    ctx.layout = "mono"
    ctx.sample_rate = SAMPLE_RATE
    out = [f.to_ndarray().reshape(-1) for p in packets for f in ctx.decode(av.Packet(p))]
    return np.concatenate(out)


def tone_pcm(freq: float, seconds: float) -> np.ndarray:
    src = ToneSource(freq, seconds)
    frames = []
    while (f := src.read()) is not None:
        frames.append(f.copy())
    return np.concatenate(frames)


async def test_pcm_and_pre_encoded_packets_share_one_timeline():
    track = OutboundAudioTrack()
    prompt = Prompt.from_pcm(tone_pcm(600, 0.2))
    prompt.encode()
    track.play(ToneSource(1000, 0.1))
    played = track.play(prompt.source())
    track.play(ToneSource(1000, 0.1))
    out = [track.next_frame() for _ in range(5 + len(prompt.packets) + 5 + 3)]
    # Everything is an Opus packet aiortc only has to pack, numbered by frame index.
    assert all(isinstance(p, av.Packet) for p in out)
    assert [p.pts for p in out] == [i * FRAME_SAMPLES for i in range(len(out))]
    assert all(p.time_base == fractions.Fraction(1, SAMPLE_RATE) for p in out)
    # The prompt's frames went out as its stored packets, byte for byte.
    middle = out[5 : 5 + len(prompt.packets)]
    assert [bytes(p) for p in middle] == list(prompt.packets)
    assert played.packets == len(prompt.packets) == prompt.frames + 1
    stats = track.stats
    assert (stats.encoded_frames, stats.passthrough_frames, stats.silent_frames) == (10, len(prompt.packets), 3)
    # Decoded as one stream: 1000 Hz, then 600 Hz, then 1000 Hz again, no hole.
    pcm = decode_packets([bytes(p) for p in out])
    assert analysis.tone_segments(pcm, SAMPLE_RATE, 1000)[0][0] == pytest.approx(0.0, abs=0.021)
    [(start, end)] = analysis.tone_segments(pcm, SAMPLE_RATE, 600)
    assert start == pytest.approx(0.1, abs=0.021) and end - start == pytest.approx(0.2, abs=0.021)
    track.stop()


async def test_a_source_between_sentences_costs_no_encoding():
    """A source that returns the shared silent frame (nothing to say now, not finished)
    gets the track's cached silence packet, not an encoded frame of zeros."""
    from media.frames import SILENT_FRAME

    class Pauses:
        sample_rate, channels = SAMPLE_RATE, 1

        def __init__(self):
            self.tone = ToneSource(1000, 0.1)

        def read(self):
            frame = self.tone.read()
            return SILENT_FRAME if frame is None else frame

        def close(self):
            pass

    track = OutboundAudioTrack()
    track.play(Pauses())
    out = [track.next_payload() for _ in range(15)]
    stats = track.stats
    assert (stats.encoded_frames, stats.silent_frames) == (5, 10)
    assert set(out[5:]) == {track._silence_packet} and track.playing  # still playing
    assert analysis.dominant_frequency(decode_packets(out)[:4800], SAMPLE_RATE) == pytest.approx(1000, abs=5)
    track.stop()


async def test_outbound_tap_sees_every_frame_sent():
    track = OutboundAudioTrack()
    tapped: list[np.ndarray] = []
    pts: list[int] = []

    class Tap:
        def write(self, pcm, rate, channels=1):
            assert (rate, channels) == (SAMPLE_RATE, 1)
            tapped.append(pcm.copy())
            pts.append(track.sent_pts)

        def close(self):
            pass

    track.add_sink(Tap())
    prompt = Prompt.from_pcm(tone_pcm(700, 0.1))
    prompt.encode()
    track.play(ToneSource(1000, 0.06))
    track.play(prompt.source())
    for _ in range(3 + len(prompt.packets) + 2):
        track.next_frame()
    signal = np.concatenate(tapped)
    expected = np.concatenate([tone_pcm(1000, 0.06), prompt.pcm[: len(prompt.packets) * FRAME_SAMPLES], np.zeros(2 * FRAME_SAMPLES, np.int16)])
    np.testing.assert_array_equal(signal, expected)  # PCM of the packets too
    assert pts == [i * FRAME_SAMPLES for i in range(len(tapped))]
    track.stop()


async def test_legacy_mode_hands_pcm_frames_to_aiortc():
    track = OutboundAudioTrack(opus=None)
    prompt = Prompt.from_pcm(tone_pcm(700, 0.04))
    prompt.encode()
    track.play(prompt.source())
    frames = [track.next_frame() for _ in range(3)]
    assert all(isinstance(f, av.AudioFrame) for f in frames)
    assert [f.pts for f in frames] == [0, 960, 1920]
    assert track.stats.passthrough_frames == 0
    track.stop()


async def test_pacing_stats_report_interval_jitter_and_underruns():
    track = OutboundAudioTrack()
    for _ in range(40):
        await track.recv()
    # Stall the event loop for 3 frame periods: the next frame is an underrun.
    time.sleep(0.065)
    for _ in range(5):
        await track.recv()
    stats = track.stats.as_dict()
    intervals = stats["interval_ms"]
    assert intervals["p50"] == pytest.approx(20, abs=3)
    assert intervals["p50"] <= intervals["p95"] <= intervals["max"]
    assert intervals["max"] >= 60
    assert stats["underruns"] >= 1 and stats["late_frames"] >= stats["underruns"]
    assert stats["frames"] == 45 and stats["silent_frames"] == 45
    track.stop()


async def test_aiortc_encoding_mode_still_plays_prompts_in_a_call():
    """PeerConfig(opus=None): PCM frames for aiortc to encode (e.g. for G.711); a
    pre-encoded prompt then plays from its PCM."""
    prompt = Prompt.from_pcm(tone_pcm(600, 0.6))
    prompt.encode()
    config = PeerConfig(host_addresses=["127.0.0.1"], opus=None)
    async with call_pair(business_config=config) as (business, user):
        assert business.outbound.opus is None
        heard = PtsRecorder(user)
        gate = FrameGate(user)
        user.add_sink(heard)
        user.add_sink(gate)
        played = business.play(prompt.source())
        await asyncio.wait_for(played.done, TIMEOUT)
        await gate.more(10)
    assert played.packets == 0 and business.outbound.stats.passthrough_frames == 0
    x = heard.timeline()
    assert analysis.dominant_frequency(x, SAMPLE_RATE) == pytest.approx(600, abs=2)
    assert analysis.tone_seconds(x, SAMPLE_RATE, 600) == pytest.approx(len(prompt.packets) * 0.02, abs=0.041)


async def test_clear_stops_playback_within_one_frame():
    async with call_pair() as (business, user):
        log = SendLog(business.outbound)
        business.add_outbound_sink(log)
        heard = FrameGate()
        user.add_sink(heard)
        tone = business.play(ToneSource(1000, None))
        loop = asyncio.get_running_loop()
        cleared = loop.create_future()

        def barge_in():
            business.clear()
            cleared.set_result(loop.time())

        loop.call_later(0.5, barge_in)
        cleared_at = await asyncio.wait_for(cleared, TIMEOUT)
        assert await asyncio.wait_for(tone.done, TIMEOUT) == pytest.approx(tone.seconds)
        await heard.more(10)
        tone_rows = log.of(tone)
        after = [r for r in log.rows if r[0] > cleared_at]
        # Nothing of the tone goes out after clear(); the last tone frame went out at
        # most one frame period before it.
        assert after and all(r[2] is None for r in after)
        assert cleared_at - tone_rows[-1][0] <= 0.020 + 0.002
        assert tone.frames == len(tone_rows)


async def test_played_file_is_found_in_the_far_sides_recording(tmp_path):
    signal = chirp(1.5)
    path = tmp_path / "prompt.wav"
    with WavSink(path) as sink:
        sink.write(signal, SAMPLE_RATE)
    far = tmp_path / "far.wav"
    async with call_pair() as (business, user):
        recording = WavSink(far)
        heard = PtsRecorder(user)
        gate = FrameGate(user)
        user.add_sink(recording)
        user.add_sink(heard)
        user.add_sink(gate)
        log = SendLog(business.outbound)
        business.add_outbound_sink(log)
        await gate.reached(10)  # some silence first
        playback = business.play(FileSource(path))
        await asyncio.wait_for(playback.done, TIMEOUT)
        await gate.more(10)
    first_sent_pts = log.of(playback)[0][1]
    # The far side's recording starts at its first decoded frame; Opus adds its
    # 312-sample lookahead.
    expected = first_sent_pts - heard.first_pts + 312
    offset, score = locate(signal, heard.timeline())
    assert abs(offset - expected) <= 48, (offset, expected, heard.gaps)  # 1 ms
    assert score > 0.8, (score, heard.gaps)
    if not heard.gaps:  # nothing dropped: the plain WAV recording has it at the same place
        x, rate = read_wav(far)
        assert locate(signal, x[:, 0]) == (offset, pytest.approx(score, abs=0.01))
