"""Call recordings for QA: stereo wall-clock alignment, Ogg/Opus pass-through and
encode, the JSON sidecar, crash safety under SIGKILL, repair, retention, file modes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import stat
import sys
import textwrap
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from media import analysis
from media.frames import SAMPLE_RATE
from media.sinks.ogg import OggOpusWriter, read_ogg_packets, repair_ogg
from media.sinks.recorder import CallRecorder, apply_retention, repair, repair_directory
from media.sinks.wav import WavSink, repair_wav
from media.sources.tone import SilenceSource, ToneSource
from media_call import TIMEOUT, FrameGate, SendLog, assert_segments_match, call_pair, read_wav, sent_segments

ROOT = Path(__file__).resolve().parent.parent


def channels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Left and right of stereo.wav, or of stereo.ogg decoded (by FFmpeg's decoder, not wacall's)."""
    if path.suffix == ".ogg":
        (left, right), rate = analysis.read_channels(path)
        assert rate == SAMPLE_RATE
        return left, right
    x, rate = read_wav(path)
    assert rate == SAMPLE_RATE and x.shape[1] == 2
    return x[:, 0], x[:, 1]


def at(loop, when: float, fn, *args) -> asyncio.Future:
    """Run ``fn(*args)`` at loop time ``when``; the future gets its result."""
    fut = loop.create_future()
    loop.call_at(when, lambda: fut.set_result(fn(*args)))
    return fut


# -- stereo alignment ---------------------------------------------------------------------


async def test_stereo_puts_each_leg_on_its_side_at_the_right_time(tmp_path):
    async with call_pair() as (business, user):
        recorder = CallRecorder(tmp_path / "c1", call_id="c1", stereo_ogg=True)
        recorder.attach(business)
        gate = FrameGate()
        business.add_sink(gate)
        user_log, business_log = SendLog(user.outbound), SendLog(business.outbound)
        user.add_outbound_sink(user_log)
        business.add_outbound_sink(business_log)
        loop = asyncio.get_running_loop()
        t0 = recorder.t0
        said = await asyncio.wait_for(at(loop, t0 + 0.5, user.play, ToneSource(600, 1.0)), TIMEOUT)
        played = await asyncio.wait_for(at(loop, t0 + 1.0, business.play, ToneSource(1000, 1.0)), TIMEOUT)
        await asyncio.wait_for(asyncio.gather(said.done, played.done), TIMEOUT)
        await gate.more(10)
    sidecar = recorder.close()
    # Scheduled at 0.5 s and 1.0 s; they went out with the next 20 ms frame (later only
    # if the event loop was held up, which then shows in the recording too).
    assert 0.5 <= said.started_at - t0 and 1.0 <= played.started_at - t0
    # stereo.wav (decoded, placed per sample) and stereo.ogg (the packets, placed per
    # 20 ms slot) say the same.
    for kind in ("stereo_wav", "stereo_ogg"):
        left, right = channels(recorder.paths[kind])
        user_segments = analysis.tone_segments(left, SAMPLE_RATE, 600)
        business_segments = analysis.tone_segments(right, SAMPLE_RATE, 1000)
        # Each tone is where (and as long as) it went out, within 40 ms.
        assert_segments_match(user_segments, sent_segments(user_log.of(said), t0))
        assert_segments_match(business_segments, sent_segments(business_log.of(played), t0))
        if user_log.track.stats.resyncs == business_log.track.stats.resyncs == 0:  # sent in one go
            [(u0, u1)], [(b0, b1)] = user_segments, business_segments
            assert u0 == pytest.approx(0.5, abs=0.04) and u1 - u0 == pytest.approx(1.0, abs=0.04)
            assert b0 == pytest.approx(1.0, abs=0.04) and b1 - b0 == pytest.approx(1.0, abs=0.04)
        assert analysis.tone_seconds(left, SAMPLE_RATE, 1000) == 0
        assert analysis.tone_seconds(right, SAMPLE_RATE, 600) == 0
    legs = sidecar["stereo_ogg"]
    assert legs["user"]["packets"] > 0 and legs["business"]["packets"] > 0
    assert legs["user"]["transcoded"] == legs["business"]["transcoded"] == 0  # passed through
    assert sidecar["durations_s"]["stereo_ogg"] == pytest.approx(sidecar["durations_s"]["stereo_wav"], abs=0.03)


@pytest.mark.parametrize("pause_s", [0.0, 1.0], ids=["continuous", "sender-silent-1s"])
async def test_gap_between_tones_is_kept_on_the_wall_clock(tmp_path, pause_s):
    """tone → silence → tone from the user; with a pause, the user's side sends no
    packets at all for ``pause_s`` (and its RTP timestamps do not jump)."""
    async with call_pair() as (business, user):
        recorder = CallRecorder(tmp_path / "gap", ogg=False, stereo_ogg=True)
        recorder.attach(business)
        gate = FrameGate()
        business.add_sink(gate)
        sent = SendLog(user.outbound)
        user.add_outbound_sink(sent)
        loop = asyncio.get_running_loop()
        first = user.play(ToneSource(600, 0.5))
        user.play(SilenceSource(0.3))
        await asyncio.wait_for(first.done, TIMEOUT)
        sender = user._pc.getTransceivers()[0].sender
        if pause_s:
            # Stop sending once the silence is on the wire (so the frames aiortc's jitter
            # buffer holds back until packets flow again are silence), resume later.
            await gate.more(10)
            sender.replaceTrack(None)
            await asyncio.wait_for(at(loop, loop.time() + pause_s, sender.replaceTrack, user.outbound), TIMEOUT)
        second = user.play(ToneSource(600, 0.5))
        await asyncio.wait_for(second.done, TIMEOUT)
        await gate.more(10)
    recorder.close()
    t0 = recorder.t0
    expected = sent_segments(sent.of(first) + sent.of(second), t0)
    gap = expected[-1][0] - expected[-2][1]  # silence before the second tone
    assert gap >= (0.28 if not pause_s else pause_s + 0.15)  # the scenario happened
    for kind in ("stereo_wav", "stereo_ogg"):
        left, _ = channels(recorder.paths[kind])
        recorded = analysis.tone_segments(left, SAMPLE_RATE, 600)
        assert_segments_match(recorded, expected)  # each boundary within 40 ms
        assert recorded[-1][0] - recorded[-2][1] == pytest.approx(gap, abs=0.04)
    if pause_s:
        assert recorder.sidecar()["alignment"]["user_resyncs"] >= 1
        assert recorder.sidecar()["stereo_ogg"]["user"]["resyncs"] >= 1


# -- Ogg/Opus -----------------------------------------------------------------------------


async def test_ogg_passthrough_keeps_the_received_opus_packets(tmp_path):
    received = []
    recorder = None

    def wire(business, user):
        nonlocal recorder
        recorder = CallRecorder(tmp_path / "ogg", stereo=False, wav=False)
        recorder.attach(business)
        business.rtp_tap.add_listener(received.append)

    async with call_pair(wire) as (business, user):
        gate = FrameGate()
        business.add_sink(gate)
        said = user.play(ToneSource(600, 1.0))
        await asyncio.wait_for(said.done, TIMEOUT)
        await gate.more(10)
    sidecar = recorder.close()
    path = recorder.paths["user_ogg"]
    packets, granule = read_ogg_packets(path)
    # Not re-encoded: the file's packets are the RTP payloads, byte for byte.
    assert packets == [r.payload for r in received]
    assert sidecar["ogg_mode"] == "passthrough"
    assert sidecar["ogg_passthrough"] == {"packets": len(received), "filled": 0, "dropped": 0}
    assert granule == 960 * len(packets)
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
    x, rate = analysis.read_audio(path)
    assert x.size / rate == pytest.approx(len(packets) * 0.02, abs=0.021)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(600, abs=2)
    assert analysis.tone_seconds(x, rate, 600) == pytest.approx(1.0, abs=0.041)


async def test_ogg_encode_mode_records_the_decoded_audio(tmp_path):
    async with call_pair() as (business, user):
        recorder = CallRecorder(tmp_path / "enc", stereo=False, wav=False, ogg_mode="encode")
        recorder.attach(business)
        gate = FrameGate()
        business.add_sink(gate)
        said = user.play(ToneSource(750, 0.8))
        await asyncio.wait_for(said.done, TIMEOUT)
        await gate.more(10)
    sidecar = recorder.close()
    assert sidecar["ogg_mode"] == "encode"
    x, rate = analysis.read_audio(recorder.paths["user_ogg"])
    assert x.size / rate == pytest.approx(recorder.user_seconds, abs=0.021)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(750, abs=2)
    assert analysis.tone_seconds(x, rate, 750) == pytest.approx(0.8, abs=0.041)


def test_ogg_pages_are_valid_and_torn_pages_are_cut(tmp_path):
    path = tmp_path / "t.ogg"
    writer = OggOpusWriter(path, flush_interval_s=0.2)
    packet = bytes([0xF8, 0xFF, 0xFE])  # a CELT 20 ms silence frame
    for _ in range(50):
        writer.write_packet(packet)
    assert path.stat().st_size > 0 and writer.packets == 50
    writer.close()
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"OggS\x00\x00garbage")  # a torn page, as a crash mid-write leaves
    assert repair_ogg(path) and path.stat().st_size == size
    assert not repair_ogg(path)
    packets, granule = read_ogg_packets(path)
    assert packets == [packet] * 50 and granule == 50 * 960
    x, rate = analysis.read_audio(path)
    assert x.size == 50 * 960


# -- sidecar and files --------------------------------------------------------------------


async def test_sidecar_and_file_modes(tmp_path):
    directory = tmp_path / "recordings" / "call-42"
    async with call_pair() as (business, user):
        recorder = CallRecorder(directory, call_id="call-42", meta={"user": "+49***78"})
        recorder.attach(business)
        gate = FrameGate()
        business.add_sink(gate)
        said = user.play(ToneSource(600, 0.6, amplitude=0.3))
        played = business.play(ToneSource(1000, 0.4, amplitude=0.5))
        await asyncio.wait_for(asyncio.gather(said.done, played.done), TIMEOUT)
        await gate.more(10)
        stats = await business.get_stats()
        # Live: the sidecar exists already, marked incomplete.
        assert json.loads((directory / "recording.json").read_text())["complete"] is False
    data = recorder.close(media_stats=stats)
    assert json.loads((directory / "recording.json").read_text()) == json.loads(json.dumps(data))
    assert data["call_id"] == "call-42" and data["complete"] is True
    started = dt.datetime.fromisoformat(data["started_at"])
    ended = dt.datetime.fromisoformat(data["ended_at"])
    assert started.tzinfo is not None and started <= ended
    durations = data["durations_s"]
    assert durations["user"] == pytest.approx(recorder.user_seconds)
    assert durations["user_wav"] == pytest.approx(durations["user"], abs=0.001)
    assert durations["business"] >= 0.4 and durations["stereo_wav"] >= durations["business"]
    levels = data["levels"]
    assert levels["business"]["peak_dbfs"] == pytest.approx(20 * np.log10(0.5 * 32767 / 32768), abs=0.01)
    assert levels["user"]["peak_dbfs"] == pytest.approx(20 * np.log10(0.3), abs=1.5)
    assert levels["user"]["rms_dbfs"] < levels["user"]["peak_dbfs"] - 3
    assert data["media_stats"]["pacing"]["frames"] > 0 and data["meta"] == {"user": "+49***78"}
    # Private: directories 0700, files 0600.
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.parent.stat().st_mode) == 0o700
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["recording.json", "stereo.wav", "user.ogg", "user.wav"]
    for p in directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_wav_header_is_valid_while_recording(tmp_path):
    path = tmp_path / "live.wav"
    sink = WavSink(path, flush_interval_s=1.0)
    src = ToneSource(500, 2.5)
    while (f := src.read()) is not None:
        sink.write(f, SAMPLE_RATE)
    # Not closed: the file on disk already is a valid WAV of the flushed 2 s.
    with wave.open(str(path), "rb") as w:
        assert w.getnframes() == 2 * SAMPLE_RATE
    x, rate = analysis.read_audio(path)
    assert x.size == 2 * SAMPLE_RATE and analysis.tone_seconds(x, rate, 500) == pytest.approx(2.0)
    sink.close()
    assert analysis.read_audio(path)[0].size == int(2.5 * SAMPLE_RATE)


def test_repair_fixes_a_wav_whose_header_lags_its_data(tmp_path):
    path = tmp_path / "old.wav"
    with wave.open(str(path), "wb") as w:  # the header says 0 frames ...
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframesraw(b"")
    tone = np.round(np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE) * 8000).astype("<i2")
    with open(path, "ab") as f:  # ... the samples that were appended say 1 s
        f.write(tone.tobytes() + b"\x01")  # and half a sample of a torn write
    assert repair(path) is True
    assert repair_wav(path) is False  # idempotent
    with wave.open(str(path), "rb") as w:
        assert w.getnframes() == SAMPLE_RATE
    x, rate = analysis.read_audio(path)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(440, abs=1)


# -- crash safety -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from media import sdp
    from media.peer import MediaPeer, PeerConfig
    from media.sinks.recorder import CallRecorder
    from media.sources.tone import ToneSource

    class Progress:
        frames = 0
        def write(self, pcm, rate, channels=1):
            self.frames += 1
            if self.frames % 25 == 0:
                print(f"AUDIO {{self.frames * 0.02:.2f}}", flush=True)
        def close(self):
            pass

    async def main(directory):
        config = PeerConfig(host_addresses=["127.0.0.1"])
        business, user = MediaPeer(config), MediaPeer(config)
        offer = await business.create_offer()
        recorder = CallRecorder(directory, call_id="killed", stereo_ogg=True)
        recorder.attach(business)
        business.add_sink(Progress())
        await business.apply_answer(sdp.mark_ice_lite(await user.accept_offer(offer)))
        await asyncio.gather(business.media_up(10), user.media_up(10))
        user.play(ToneSource(600, None))
        business.play(ToneSource(1000, None))
        await asyncio.Event().wait()  # until SIGKILL

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_sigkill_mid_call_leaves_playable_files(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    directory = tmp_path / "rec" / "killed"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(directory), stdout=asyncio.subprocess.PIPE
    )
    recorded = 0.0
    try:
        async def until_enough() -> float:
            while True:
                line = await proc.stdout.readline()
                assert line, "the child exited early"
                seconds = float(line.split()[1])
                if seconds >= 2.5:
                    return seconds

        recorded = await asyncio.wait_for(until_enough(), TIMEOUT)
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode == -signal.SIGKILL

    # As the kill left them, before any repair: valid files up to about 1 s before it.
    wav = directory / "user.wav"
    x, rate = analysis.read_audio(wav)
    assert recorded - 1.05 <= x.size / rate <= recorded + 0.5
    assert analysis.tone_seconds(x, rate, 600) >= x.size / rate - 0.1
    ogg = directory / "user.ogg"
    y, rate = analysis.read_audio(ogg)
    assert recorded - 1.1 <= y.size / rate <= recorded + 0.5
    assert analysis.dominant_frequency(y, rate) == pytest.approx(600, abs=2)
    left, right = channels(directory / "stereo.wav")
    assert analysis.tone_seconds(left, SAMPLE_RATE, 600) >= recorded - 1.1
    assert analysis.tone_seconds(right, SAMPLE_RATE, 1000) >= recorded - 1.1
    left, right = channels(directory / "stereo.ogg")  # (whole pages: playable as it is)
    assert analysis.tone_seconds(left, SAMPLE_RATE, 600) >= recorded - 1.1
    assert analysis.tone_seconds(right, SAMPLE_RATE, 1000) >= recorded - 1.1
    sidecar = json.loads((directory / "recording.json").read_text())
    assert sidecar["complete"] is False

    report = repair_directory(tmp_path / "rec")
    assert report["recovered"] == [str(directory)] and not report["errors"]
    sidecar = json.loads((directory / "recording.json").read_text())
    assert sidecar["recovered"] is True
    # user.wav's header trails its data by up to a second (HEADER_S); the data itself
    # went out every 100 ms, and the repair makes the header say so
    repaired = analysis.read_audio(wav)[0]
    assert repaired.size >= x.size and repaired.size / SAMPLE_RATE >= recorded - 0.15
    assert analysis.tone_seconds(repaired, SAMPLE_RATE, 600) >= repaired.size / SAMPLE_RATE - 0.1
    assert sidecar["durations_s"]["user_wav"] == pytest.approx(repaired.size / SAMPLE_RATE, abs=0.001)
    assert sidecar["durations_s"]["user_ogg"] == pytest.approx(y.size / SAMPLE_RATE, abs=0.021)
    assert repair_directory(tmp_path / "rec")["recovered"] == []  # once


# -- retention ----------------------------------------------------------------------------


def make_calls(root: Path, now: float, ages_and_sizes: list[tuple[str, float, int]]) -> None:
    for name, age, size in ages_and_sizes:
        d = root / name
        d.mkdir(parents=True)
        f = d / "user.wav"
        f.write_bytes(b"\0" * size)
        os.utime(f, (now - age, now - age))
        os.utime(d, (now - age, now - age))


def test_retention_by_age_count_and_size(tmp_path):
    now = 1_700_000_000.0
    calls = [("a", 5000, 400), ("b", 4000, 300), ("c", 3000, 200), ("d", 2000, 100), ("e", 1000, 50)]

    root = tmp_path / "age"
    make_calls(root, now, calls)
    removed = apply_retention(root, max_age_s=3500, now=now)
    assert [p.name for p in removed] == ["a", "b"]
    assert sorted(p.name for p in root.iterdir()) == ["c", "d", "e"]

    root = tmp_path / "count"
    make_calls(root, now, calls)
    assert [p.name for p in apply_retention(root, max_count=2, now=now)] == ["a", "b", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["d", "e"]

    root = tmp_path / "bytes"
    make_calls(root, now, calls)
    assert [p.name for p in apply_retention(root, max_bytes=360, now=now)] == ["a", "b"]

    root = tmp_path / "all"
    make_calls(root, now, calls)
    assert apply_retention(root, max_age_s=10_000, max_count=10, max_bytes=10_000, now=now) == []


def test_retention_never_deletes_a_recording_in_progress(tmp_path):
    root = tmp_path / "rec"
    old = CallRecorder(root / "live", stereo=False, ogg=False)
    os.utime(root / "live", (1, 1))
    for f in (root / "live").iterdir():
        os.utime(f, (1, 1))
    make_calls(root, 1_700_000_000.0, [("done", 10, 10)])
    removed = apply_retention(root, max_count=0, now=1_700_000_000.0)
    assert [p.name for p in removed] == ["done"]
    assert (root / "live").exists()
    old.close()
    assert [p.name for p in apply_retention(root, max_count=0)] == ["live"]
