"""The lean sender's lane (media.lean.LeanSender._load, media._rtpcore.Lane): while a
pre-encoded prompt or silence plays, the C core sends up to RUNWAY frames ahead and the
Python objects catch up afterwards. Held here against the frame-by-frame path (RUNWAY 0):
the far side hears the same prompt, stereo.ogg has it in its business leg, and every
counter (track, playback, aiortc's sender, DTMF, the recorder) comes out the same; and
anything that changes what goes out (barge-in, a new prompt, DTMF, a tap, a failing
recording) takes effect at once."""

from __future__ import annotations

import asyncio
import errno
from array import array

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from media import analysis, lean
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.sinks.recorder import CallRecorder
from media.sources.prompt import Prompt, PromptSource
from tests.helpers import native_rtp_core, until
from tests.media_call import TIMEOUT, FrameGate, call_pair

@pytest.fixture(autouse=True)
def _native():
    native_rtp_core()


def _prompt(hz: float, seconds: float) -> Prompt:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    prompt = Prompt.from_pcm((np.sin(2 * np.pi * hz * t) * 12000).astype(np.int16), name=f"{hz:g} Hz")
    prompt.encode()
    return prompt


class Ears:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def close(self) -> None:
        pass

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames.append(pcm.copy())

    def tone_s(self, hz: float) -> float:
        return analysis.tone_seconds(np.concatenate(self.frames).astype(np.float32) / 32768, SAMPLE_RATE, hz)


def _stereo_ogg(tmp_path) -> CallRecorder:
    return CallRecorder(tmp_path / "rec", wav=False, stereo=False, ogg=False, stereo_ogg=True)


def _recorded(recorder: CallRecorder, heard: Ears):
    """call_pair's before_connect: ``recorder`` on the business, ``heard`` at the user."""
    def before(business, user):
        recorder.attach(business)
        user.add_sink(heard)
    return before


def _sender(peer):
    return peer._pc.getTransceivers()[0].sender


@pytest.mark.parametrize("runway", [0, lean.RUNWAY_FRAMES])
async def test_a_prompt_through_the_lane_is_heard_recorded_and_counted_as_frame_by_frame(
        tmp_path, monkeypatch, runway):
    monkeypatch.setattr(lean, "RUNWAY", runway)
    heard, recorder = Ears(), _stereo_ogg(tmp_path)
    async with call_pair(_recorded(recorder, heard)) as (business, user):
        gate = FrameGate()
        user.add_sink(gate)
        await gate.reached(5)
        prompt = _prompt(1000, 1.5)
        playback = business.play(PromptSource(prompt))
        seconds = await asyncio.wait_for(playback.done, TIMEOUT)
        await gate.reached(gate.frames + 15)  # (silence after it: the lane's other runway)
        sender = business.outbound.lean
        track = business.outbound
        sender.interrupt()  # (everything sent so far, into the counters)
        stats = track.stats
        assert playback.frames == playback.packets == len(prompt.packets)
        assert seconds == pytest.approx(len(prompt.packets) * 0.02)
        assert stats.frames == stats.passthrough_frames + stats.silent_frames + stats.encoded_frames
        assert stats.passthrough_frames == len(prompt.packets) and stats.encoded_frames == 0
        assert stats._intervals == stats.frames - 1 == sum(stats._hist)
        assert stats.underruns <= stats.late_frames <= stats.frames  # (a stall of the machine may make some)
        assert sender.packets == stats.frames == sender.dtmf.rtp_sent
        assert _sender(business)._RTCRtpSender__packet_count == sender.packets
        assert _sender(business)._RTCRtpSender__rtp_timestamp == (sender._ts_origin + track.sent_pts) & 0xFFFFFFFF
        assert track.sent_pts == (stats.frames - 1) * FRAME_SAMPLES
        assert recorder.business.frames == stats.frames
        if runway:
            assert sender.lane_frames > stats.frames * 0.8, (sender.lane_frames, stats.frames)
        else:
            assert sender.lane_frames == 0
        assert stats.ahead_frames == sender.lane_frames  # (the track's statistics say it too)
        assert (await business.get_stats())["pacing"]["ahead_frames"] >= sender.lane_frames
        # what the far side counted is what we sent (up to what is still in flight)
        sent = stats.frames
        await until(lambda: user.received.frames >= sent, TIMEOUT)
        # the sequence numbers ran on without a gap or a repeat across the runways
        received = await user.get_stats()
        assert received["packets_lost"] == 0 and received["packets_received"] >= sent
    recorder.close()
    assert heard.tone_s(1000) == pytest.approx(1.5, abs=0.1)
    (left, right), rate = analysis.read_channels(recorder.paths["stereo_ogg"])
    assert analysis.tone_seconds(right, rate, 1000) == pytest.approx(1.5, abs=0.1)
    assert analysis.tone_seconds(left, rate, 1000) == 0


async def test_barge_in_a_new_prompt_and_dtmf_stop_the_runway_at_once(tmp_path):
    async with call_pair() as (business, user):
        sender, track = business.outbound.lean, business.outbound
        digits: list[str] = []
        user.on_dtmf(lambda event: digits.append(event.digit))
        gate = FrameGate()
        user.add_sink(gate)
        await gate.reached(3)
        # silence runs on the lane; a prompt queued now starts with the next frame
        await until(lambda: sender._runway is not None, TIMEOUT)
        silent = track.stats.silent_frames
        playback = business.play(PromptSource(_prompt(1000, 3.0)))
        assert sender._runway is None and sender._lane.left == 0
        assert track.stats.silent_frames >= silent
        await until(lambda: playback.frames > 3 and sender._runway is not None, TIMEOUT)
        # barge-in: the playback ends now, counted to the frame that went out
        business.clear()
        assert sender._runway is None and sender._lane.left == 0
        assert playback.finished and playback.frames == playback.packets
        assert await playback.done == pytest.approx(playback.frames * 0.02)
        frames = track.stats.frames
        assert frames == track.stats.passthrough_frames + track.stats.silent_frames
        # DTMF while silence runs ahead: the events go out in place of it
        await until(lambda: sender._runway is not None, TIMEOUT)
        sending = asyncio.ensure_future(business.send_dtmf("12#", duration_ms=100, gap_ms=60))
        await asyncio.sleep(0)  # (it queues the digits before its first wait)
        assert sender.dtmf.sending and sender._runway is None and sender._lane.left == 0
        await asyncio.wait_for(sending, TIMEOUT)
        await until(lambda: len(digits) >= 3, TIMEOUT)
        assert digits == ["1", "2", "#"]


async def test_a_recording_that_fails_on_the_lane_stops_the_recording_never_the_audio(tmp_path):
    heard, recorder = Ears(), _stereo_ogg(tmp_path)
    async with call_pair(_recorded(recorder, heard)) as (business, user):
        sender = business.outbound.lean
        writer = recorder._stereo_ogg._file
        real = writer.write_packets
        calls = []

        def full_disk(*args, **kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        writer.write_packets = full_disk
        playback = business.play(PromptSource(_prompt(1000, 2.0)))
        await asyncio.wait_for(playback.done, TIMEOUT)
        await until(lambda: recorder.error is not None, TIMEOUT)
        assert sender.lane_frames > 50
        assert "No space left" in recorder.error["reason"]
    recorder.close()
    assert heard.tone_s(1000) == pytest.approx(2.0, abs=0.1)


async def test_a_tap_that_needs_every_frame_takes_the_frames_back_from_the_lane():
    async with call_pair() as (business, user):
        sender = business.outbound.lean
        await until(lambda: sender._runway is not None, TIMEOUT)
        tapped = Ears()
        business.add_outbound_sink(tapped)  # (a PCM tap: no lane_ring)
        assert sender._runway is None
        lane_frames = sender.lane_frames
        playback = business.play(PromptSource(_prompt(1000, 0.6)))
        await asyncio.wait_for(playback.done, TIMEOUT)
        assert sender.lane_frames == lane_frames and sender._runway is None
        assert tapped.tone_s(1000) == pytest.approx(0.6, abs=0.04)
        business.remove_outbound_sink(tapped)
        await until(lambda: sender.lane_frames > lane_frames, TIMEOUT)


def test_the_lane_refuses_bad_arguments_and_a_closed_lane_sends_nothing():
    import socket

    from media import rtpcore

    core = rtpcore.core
    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        b.setblocking(False)
        header = bytes([0x80, 111]) + bytes(10)
        with pytest.raises(ValueError):
            core.Lane(a.fileno(), core.sockaddr(b.getsockname()), 0, b"\x80", 10, 1e-4, 100)
        lane = core.Lane(a.fileno(), core.sockaddr(b.getsockname()), 0, header, 10, 1e-4, 100)
        with pytest.raises(ValueError):
            lane.load((b"x",), 1, 1, False, 0, 0, 0.0, None)
        with pytest.raises(TypeError):
            lane.load([b"x"], 0, 1, False, 0, 0, 0.0, None)
        # a payload too long for a packet ends the runway before it (timestamp: origin 100 + pts 0)
        assert lane.load((b"a", b"b" * 5000, b"c"), 0, 3, False, 7, 0, 0.0, None) == 1
        assert lane.send(0.02, 0.0, 3, 0) == 1
        data = b.recv(2048)
        assert data[12:] == b"a" and data[2:4] == (7).to_bytes(2, "big") and data[4:8] == (100).to_bytes(4, "big")
        hist = bytearray(40)
        taken = lane.take(hist)
        assert taken[0] == 1 and taken[11] == 8 and int.from_bytes(hist[4 * 9:4 * 10], "little") == 1
        with pytest.raises(ValueError):
            lane.take(bytearray(8))
        assert lane.load((b"s",), 0, 4, True, 8, 960, 0.02, None) == 4
        lane.close()
        assert lane.closed and lane.left == 0 and lane.send(0.04, 0.0, 1, 0) == 0
        with pytest.raises(RuntimeError):
            lane.load((b"s",), 0, 4, True, 8, 960, 0.02, None)
    finally:
        a.close()
        b.close()


async def test_a_source_not_known_ahead_is_asked_once_and_sent_frame_by_frame():
    from media.sources.tone import ToneSource

    async with call_pair() as (business, user):
        sender, track = business.outbound.lean, business.outbound
        heard = Ears()
        user.add_sink(heard)
        await until(lambda: sender._runway is not None, TIMEOUT)
        asked = []
        runway = track.runway

        def counting(limit):
            found = runway(limit)
            asked.append(found)
            return found

        track.runway = counting
        playback = business.play(ToneSource(1000, 0.6))  # (the lane's silence settled: counted)
        lane_frames = sender.lane_frames
        at_end = []
        playback.done.add_done_callback(lambda _: at_end.append(sender.lane_frames))
        await asyncio.wait_for(playback.done, TIMEOUT)
        # its first frame (not started yet), then once; after it, only silence is asked for
        assert asked[:2] == [None, None] and all(a is not None for a in asked[2:]), asked
        assert at_end == [lane_frames]  # (every frame of the tone went frame by frame)
        await until(lambda: sender.lane_frames > lane_frames, TIMEOUT)  # silence again, ahead
    assert heard.tone_s(1000) == pytest.approx(0.6, abs=0.04)


@pytest.mark.parametrize("value,runway", [("0", 0), ("off", 0), ("1", lean.RUNWAY_FRAMES), (None, lean.RUNWAY_FRAMES)])
def test_the_lane_is_one_switch_by_environment(value, runway):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WACALL_RTP_LANE"}
    if value is not None:
        env["WACALL_RTP_LANE"] = value
    out = subprocess.run([sys.executable, "-c", "from media import lean; print(lean.RUNWAY)"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) == runway


class _BrokenTap:
    """Content with the lane (nothing per frame), then raises when told what went."""

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in
        self.frames = 0
        self.closed = False

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames += 1

    def lane_ring(self):
        if self.fail_in == "lane_ring" and self.frames:
            raise RuntimeError("lane_ring broke")
        return None

    def lane_sent(self, n, level, error) -> None:
        self.frames += n
        if self.fail_in == "lane_sent":
            raise RuntimeError("lane_sent broke")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("fail_in", ["lane_sent", "lane_ring"])
async def test_a_tap_failing_on_the_lane_is_detached_and_the_audio_goes_on(fail_in, caplog):
    heard = Ears()
    async with call_pair(lambda business, user: user.add_sink(heard)) as (business, user):
        sender, track = business.outbound.lean, business.outbound
        tap = _BrokenTap(fail_in)
        business.add_outbound_sink(tap)
        await until(lambda: tap not in track.sinks, TIMEOUT)
        assert tap.closed and track.sinks.faults == 1
        playback = business.play(PromptSource(_prompt(1000, 1.0)))
        await asyncio.wait_for(playback.done, TIMEOUT)
        await until(lambda: sender.lane_frames > 50, TIMEOUT)
    assert heard.tone_s(1000) == pytest.approx(1.0, abs=0.1)
    assert f"{fail_in} broke" in caplog.text


async def test_a_lane_whose_socket_fails_hands_the_call_back_to_the_python_path():
    import socket

    from media import rtpcore

    heard = Ears()
    async with call_pair(lambda business, user: user.add_sink(heard)) as (business, user):
        sender = business.outbound.lean
        await until(lambda: sender._runway is not None, TIMEOUT)
        sender.interrupt()
        # a lane whose every sendto fails (an IPv6 address for an IPv4 socket)
        bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            native = sender._native
            sender._lane.close()
            sender._lane = rtpcore.core.Lane(bad.fileno(), rtpcore.core.sockaddr(("::1", 9)), native[2],
                                             bytes(sender._header), len(business.outbound.stats._hist), 1e-4,
                                             sender._ts_origin)
        finally:
            bad.close()
        playback = business.play(PromptSource(_prompt(1000, 1.0)))
        await asyncio.wait_for(playback.done, TIMEOUT)
        assert sender._lane is None and sender._native is None  # (it gave up on the C route)
        gate = FrameGate()
        user.add_sink(gate)
        await gate.reached(10)
    assert heard.tone_s(1000) == pytest.approx(1.0, abs=0.1)


async def test_a_pacing_window_starts_after_the_frames_sent_ahead_are_counted():
    from media.session import LocalMediaSession

    async with call_pair() as (business, user):
        sender, track = business.outbound.lean, business.outbound
        await until(lambda: sender._runway is not None and sender._lane.left < lean.RUNWAY_FRAMES - 1, TIMEOUT)
        session = LocalMediaSession.__new__(LocalMediaSession)
        session.peer = business  # (the session around this peer)
        before = sender.packets + lean.RUNWAY_FRAMES - sender._lane.left
        await session.reset_pacing()
        # what was sent ahead is counted before the window (the stats start at 0)
        assert sender.packets == before and track.stats.frames == 0
        await until(lambda: sender._runway is not None and sender._lane.left < lean.RUNWAY_FRAMES - 1, TIMEOUT)
        sender.interrupt()
        assert track.stats.frames == sender.packets - before > 0


def _udp_pair():
    import socket

    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    b.setblocking(False)
    return a, b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.15), st.integers(1, 3)), min_size=1, max_size=10),
       st.lists(st.integers(1, 200), min_size=1, max_size=20),
       st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.booleans())
def test_the_lane_sends_and_paces_as_the_track_does_frame_by_frame(ticks, sizes, seq0, ts0, repeat):
    """The C lane against the Python path it replaces: the same datagrams (header patched
    as send_rtp patches it, the runway's payloads in order) and the same pacing
    statistics as OutboundAudioTrack.paced() gives for the same ticks."""
    from media import rtpcore
    from media.track import PACING_BIN_S, OutboundAudioTrack

    core = rtpcore.core
    a, b = _udp_pair()
    try:
        header = bytes([0x90, 111]) + bytes(10) + bytes([0xBE, 0xDE, 0, 1, 0x10, 0x33, 0, 0])
        packets = tuple(bytes([i % 256]) * n for i, n in enumerate(sizes))
        reference = OutboundAudioTrack()
        bins = len(reference.stats._hist)
        lane = core.Lane(a.fileno(), core.sockaddr(b.getsockname()), 0, header, bins, PACING_BIN_S, ts0)
        t0 = 100.0
        reference.paced(t0, 0.0)  # (the first frame: the Python path's, as in a call)
        count = len(packets) if not repeat else 7
        assert lane.load(packets, 0, count, repeat, seq0, 0, t0, None) == count
        expected, due, i, last = [], t0, 0, t0
        now = t0
        for late, frames in ticks:
            due += frames * 0.02
            now = max(due + late, now)  # (the clock does not go back)
            late = now - due
            sent = lane.send(now, late, frames, 0)
            assert sent == min(frames, count - i)
            if sent:
                last = now
            for k in range(sent):
                reference.paced(now, late - k * 0.02)
                payload = packets[0] if repeat else packets[i]
                expected.append(header[:2] + ((seq0 + i) & 0xFFFF).to_bytes(2, "big")
                                + ((ts0 + 960 * i) & 0xFFFFFFFF).to_bytes(4, "big") + header[8:] + payload)
                i += 1
        hist = array("I", bytes(4 * bins))
        taken = lane.take(hist)
        got = []
        while True:
            try:
                got.append(b.recv(4096))
            except BlockingIOError:
                break
        assert got == expected
        stats = reference.stats
        assert taken[0] == i and taken[4] == stats.late_frames and taken[5] == stats.underruns
        assert taken[6] == pytest.approx(stats.max_late_ms) and taken[7] == pytest.approx(stats.max_interval_ms)
        assert list(hist) == list(stats._hist)
        assert taken[11] == (seq0 + i) & 0xFFFF and lane.left == count - i
        if i:
            assert taken[8] == last and taken[9] == (packets[0] if repeat else packets[i - 1])
        lane.close()
    finally:
        a.close()
        b.close()
