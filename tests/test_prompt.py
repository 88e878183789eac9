"""Prompt cache: decoded once and shared without copies, pre-encoded once to Opus, and a
pre-encoded prompt heard by a real far side at its frequency for its duration."""

from __future__ import annotations

import asyncio
import os

import av
import numpy as np
import pytest

from media import analysis
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.sinks.ogg import OggOpusSink
from media.sinks.wav import WavSink
from media.sources.prompt import Prompt, PromptCache, PromptSource
from media.sources.tone import ToneSource
from media_call import TIMEOUT, FrameGate, SendLog, call_pair, read_wav


def write_tone(path, freq, seconds):
    src = ToneSource(freq, seconds)
    sink = OggOpusSink(path) if str(path).endswith(".ogg") else WavSink(path)
    while (f := src.read()) is not None:
        sink.write(f, SAMPLE_RATE, 1)
    sink.close()
    return path


def decode(packets):
    ctx = av.CodecContext.create("libopus", "r")
    ctx.format, ctx.layout, ctx.sample_rate = "s16", "mono", SAMPLE_RATE
    return np.concatenate([f.to_ndarray().reshape(-1) for p in packets for f in ctx.decode(av.Packet(p))])


def test_playbacks_share_one_read_only_array(tmp_path):
    prompt = Prompt.from_file(write_tone(tmp_path / "p.wav", 500, 0.5))
    a, b = prompt.source(), prompt.source()
    fa, fb = a.read(), b.read()
    for frame in (fa, fb):
        assert np.shares_memory(frame, prompt.pcm)  # a view, not a copy
        assert not frame.flags.writeable
        with pytest.raises(ValueError):
            frame[0] = 1
    np.testing.assert_array_equal(fa, fb)
    frames = [fa]
    while (f := a.read()) is not None:
        frames.append(f)
    assert len(frames) == prompt.frames == 25
    assert analysis.dominant_frequency(np.concatenate(frames), SAMPLE_RATE) == pytest.approx(500, abs=2)
    assert prompt.plays == 2


def test_pre_encoding_gives_20ms_packets_that_decode_to_the_prompt(tmp_path):
    prompt = Prompt.from_file(write_tone(tmp_path / "p.ogg", 750, 1.0))
    packets = prompt.encode()
    assert prompt.encode() is packets  # once
    assert len(packets) == prompt.frames + 1
    assert all(len(p) < 400 for p in packets)  # 20 ms at ~32 kbit/s, not PCM
    pcm = decode(packets)[312:]  # drop the encoder's pre-skip
    assert analysis.dominant_frequency(pcm, SAMPLE_RATE) == pytest.approx(750, abs=2)
    assert analysis.tone_seconds(pcm, SAMPLE_RATE, 750) == pytest.approx(1.0, abs=0.021)
    source = PromptSource(prompt, encoded=True)
    got = []
    while source.read() is not None:
        got.append(source.packet)
    assert got == list(packets)
    with pytest.raises(ValueError):
        PromptSource(Prompt.from_pcm(np.zeros(960, np.int16)), encoded=True)


async def test_cache_decodes_once_encodes_when_reused_and_reloads_edited_files(tmp_path):
    path = write_tone(tmp_path / "hello.wav", 500, 0.3)
    cache = PromptCache(encode_after=2)
    first = cache.source(path)
    assert not first.encoded and cache.misses == 1
    second = cache.source(path)  # the second request starts pre-encoding in a thread
    assert second.prompt is first.prompt and cache.hits == 1
    await asyncio.wait_for(cache.wait_encoded(), TIMEOUT)
    third = cache.source(path)
    assert third.encoded and third.prompt is first.prompt
    assert cache.source(path, encoded=False).packet is None
    # An edited file is decoded again.
    write_tone(path, 900, 0.3)
    os.utime(path, ns=(1, 1_000_000_000))
    fresh = cache.source(path)
    assert fresh.prompt is not first.prompt
    assert analysis.dominant_frequency(fresh.prompt.pcm, SAMPLE_RATE) == pytest.approx(900, abs=3)


async def test_cache_evicts_least_recently_used(tmp_path):
    paths = [write_tone(tmp_path / f"{i}.wav", 400 + 100 * i, 1.0) for i in range(3)]
    one = Prompt.from_file(paths[0]).nbytes
    cache = PromptCache(max_bytes=int(2.5 * one), encode_after=0)
    a = cache.get(paths[0])
    cache.get(paths[1])
    cache.get(paths[0])  # a is now the most recent
    cache.get(paths[2])  # evicts paths[1]
    assert len(cache) == 2 and cache.get(paths[0]) is a
    misses = cache.misses
    cache.get(paths[1])
    assert cache.misses == misses + 1


async def test_preload_decodes_and_encodes_off_the_loop(tmp_path):
    cache = PromptCache()
    prompt = await cache.preload(write_tone(tmp_path / "x.wav", 650, 0.4), encode=True)
    assert prompt.encoded and len(prompt.packets) == prompt.frames + 1


async def test_far_side_hears_a_pre_encoded_prompt_between_pcm_frames(tmp_path):
    prompt = Prompt.from_file(write_tone(tmp_path / "prompt.wav", 600, 1.2))
    prompt.encode()
    heard = tmp_path / "heard.wav"
    arrivals = []
    async with call_pair() as (business, user):
        user.rtp_tap.add_listener(arrivals.append)
        recording = WavSink(heard)
        gate = FrameGate(user)
        user.add_sink(recording)
        user.add_sink(gate)
        log = SendLog(business.outbound)
        business.add_outbound_sink(log)
        before = business.play(ToneSource(1000, 0.4))
        played = business.play(prompt.source())
        after = business.play(ToneSource(800, 0.4))
        await asyncio.wait_for(after.done, TIMEOUT)
        await gate.more(10)
        stats = business.outbound.stats
    # The prompt went out as its packets, the tones were encoded.
    assert played.packets == played.frames == len(prompt.packets)
    assert stats.passthrough_frames == len(prompt.packets)
    assert before.packets == after.packets == 0
    # RTP timestamps advance by exactly one frame per packet, across both switches.
    pts = [a.pts for a in arrivals]
    assert set(np.diff(pts).tolist()) == {FRAME_SAMPLES}
    # The far side decodes: 1000 Hz, then the prompt's 600 Hz for its duration, then 800 Hz.
    x, rate = read_wav(heard)
    x = x[:, 0]
    start = (log.of(played)[0][1] - gate.first_pts) / SAMPLE_RATE
    segment = x[int(start * rate) : int((start + 1.2) * rate)]
    assert analysis.dominant_frequency(segment, rate) == pytest.approx(600, abs=2)  # FFT
    [(p0, p1)] = analysis.tone_segments(x, rate, 600)
    assert p1 - p0 == pytest.approx(1.2, abs=0.041)
    assert p0 == pytest.approx(start, abs=0.021)
    [(b0, b1)] = analysis.tone_segments(x, rate, 1000)
    [(a0, a1)] = analysis.tone_segments(x, rate, 800)
    assert b1 == pytest.approx(p0, abs=0.021) and a0 == pytest.approx(p1, abs=0.041)
    assert a1 - a0 == pytest.approx(0.4, abs=0.041)


def test_a_prompts_frame_levels_are_what_measuring_its_frames_gives():
    from media.sinks.meter import Levels

    t = np.arange(SAMPLE_RATE + 300) / SAMPLE_RATE  # 1 s and a partial frame
    pcm = (np.sin(2 * np.pi * 1000 * t) * 0.3 * 32767 * np.linspace(0.2, 1.0, t.size)).astype(np.int16)
    source = Prompt.from_pcm(pcm).source()
    measured, known = Levels(), Levels()
    while (frame := source.read()) is not None:
        measured.accumulate(frame)
        known.accumulate(frame, source.level)
    assert known.samples == measured.samples == 51 * FRAME_SAMPLES
    assert known.peak == measured.peak == int(np.abs(pcm).max())
    assert known.rms_dbfs == pytest.approx(measured.rms_dbfs, abs=0.01)
    assert known.rms_dbfs == pytest.approx(analysis.rms_dbfs(np.append(pcm, np.zeros(51 * FRAME_SAMPLES - pcm.size))
                                                             .astype(np.float32) / 32768), abs=0.05)
