"""Issue 16: the far side's Opus is decoded only while a sink reads PCM.

The receiver asks ``pcm_wanted()`` (or ``pcm_rate()``) each tick; the peer answers from
its sinks (a sink reads PCM unless it says ``needs_pcm = False``: the recorder writing
only user.ogg from RTP; at 48 kHz unless every reader asks for less with ``pcm_rate``:
a bot at 16 kHz, the speech detector). Counted with the decoder's own counters;
real Opus, tones found by FFT."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from media import analysis, sdp as sdp_rules
from media.frames import SAMPLE_RATE
from media.peer import MediaPeer
from media.receiver import NOT_DECODED, OpusReceiver
from media.session import LocalMediaSession
from media.sinks.recorder import CallRecorder
from media.sources.tone import ToneSource
from media_call import LOOPBACK, TIMEOUT, FrameGate, tone_packets

FRAME_S = 0.02
T0 = 1000.0


def two_frames(a: bytes, b: bytes) -> bytes:
    """One 40 ms Opus packet (code 2) holding the frames of ``a`` and ``b``."""
    return bytes([(a[0] & 0xFC) | 2, len(a) - 1]) + a[1:] + b[1:]


def play_all(rx: OpusReceiver, limit: int = 10_000) -> None:
    now = rx.buffer.start_at
    while rx.play(now) and limit:
        now += FRAME_S
        limit -= 1


async def test_no_pcm_reader_no_decoding_frames_and_pts_go_on():
    wanted = [False]
    frames: list[tuple[np.ndarray, int | None]] = []
    rx = OpusReceiver(lambda pcm, pts: frames.append((pcm, pts)), pcm_wanted=lambda: wanted[0])
    packets = tone_packets(600, 1.0)
    for i, payload in enumerate(packets):
        rx.buffer.push(i, 960 * i, payload, T0 + FRAME_S * i)
    now = rx.buffer.start_at
    for _ in range(25):  # half a second: nobody reads PCM
        assert rx.play(now)
        now += FRAME_S
    assert rx.decoder is None or rx.decoder.packets == 0  # libopus never ran
    assert rx.frames_not_decoded == 25
    assert all(pcm is NOT_DECODED for pcm, _ in frames)
    assert [pts for _, pts in frames] == [960 * i for i in range(25)]  # the timeline goes on
    wanted[0] = True  # a PCM reader came: decoding resumes with the next packet
    while rx.play(now):
        now += FRAME_S
    decoded = [pcm for pcm, _ in frames[25:50]]
    assert rx.decoder.packets == 25 and rx.frames_not_decoded == 25
    assert [pts for _, pts in frames[25:50]] == [960 * i for i in range(25, 50)]
    tone = np.concatenate(decoded[3:]).astype(np.float32) / 32768  # (libopus settles in a frame or two)
    assert analysis.dominant_frequency(tone, SAMPLE_RATE) == pytest.approx(600, abs=5)
    assert analysis.tone_seconds(tone, SAMPLE_RATE, 600) >= 0.4
    rx.close()


async def test_without_pcm_wanted_every_frame_is_decoded_as_before():
    frames = []
    rx = OpusReceiver(lambda pcm, pts: frames.append(pcm.copy()))
    for i, payload in enumerate(tone_packets(600, 0.4)):
        rx.buffer.push(i, 960 * i, payload, T0 + FRAME_S * i)
    play_all(rx)
    assert rx.decoder.packets == 20 and rx.frames_not_decoded == 0
    tone = np.concatenate(frames[:20]).astype(np.float32) / 32768
    assert analysis.tone_seconds(tone, SAMPLE_RATE, 600) >= 0.3
    rx.close()


def _tone_share(frames: list[np.ndarray], rate: int, hz: float = 600) -> float:
    x = np.concatenate(frames).astype(np.float32) / 32768
    return analysis.tone_seconds(x, rate, hz) / (x.size / rate)


async def test_decoded_at_the_rate_the_readers_want_and_switched_mid_stream():
    """pcm_rate() says 16 kHz: libopus decodes straight to it (320-sample frames, the
    tone at 600 Hz, pts still in the stream's 48 kHz units); 48 kHz from a tick on:
    960-sample frames, the same tone, the decoder's counters go on; a lost packet is
    concealed at the rate of the moment."""
    rate = [16000]
    frames: list[tuple[np.ndarray, int | None]] = []
    rx = OpusReceiver(lambda pcm, pts: frames.append((pcm.copy(), pts)), pcm_rate=lambda: rate[0])
    packets = tone_packets(600, 1.6)
    for i, payload in enumerate(packets):
        if i != 30:  # (lost)
            rx.buffer.push(i, 960 * i, payload, T0 + FRAME_S * i)
    now = rx.buffer.start_at
    for _ in range(40):
        assert rx.play(now)
        now += FRAME_S
    assert {pcm.size for pcm, _ in frames} == {320}
    played = rx.buffer.stats
    assert rx.decoder.rate == 16000 and played.frames_concealed == rx.decoder.concealed == 1
    assert rx.decoder.packets == played.frames_played + played.frames_discarded  # (a discard is decoded too)
    low = [pcm for pcm, _ in frames[3:28]]
    assert analysis.dominant_frequency(np.concatenate(low).astype(np.float32) / 32768, 16000) == pytest.approx(600, abs=5)
    assert _tone_share(low, 16000) >= 0.95
    rate[0] = 48000
    while rx.play(now):
        now += FRAME_S
    pts = [p for _, p in frames]
    assert all(p % 960 == 0 for p in pts) and all(b > a for a, b in zip(pts, pts[1:]))
    assert pts[-1] >= 960 * (len(packets) - 1)  # (then libopus' concealment as the stream ended)
    assert {pcm.size for pcm, _ in frames[40:]} == {960}
    played = rx.buffer.stats
    assert rx.decoder.rate == 48000 and rx.decoder.packets == played.frames_played + played.frames_discarded
    assert _tone_share([pcm for pcm, _ in frames[43:75]], 48000) >= 0.95
    rate[0] = 0  # nobody reads: nothing decoded, whatever the rate was
    rx.close()


async def test_the_peer_decodes_at_the_highest_rate_its_readers_want():
    peer = MediaPeer(LOOPBACK, label="business")
    try:
        class Reader:
            def __init__(self, rate=None, needs=True):
                if rate is not None:
                    self.pcm_rate = rate
                self.needs_pcm = needs

            def write(self, pcm, sample_rate, channels=1):
                pass

            def close(self):
                pass

        assert peer._pcm_rate() == 0
        peer.add_sink(Reader(48000, needs=False))
        assert peer._pcm_rate() == 0
        peer.add_sink(Reader(8000))
        assert peer._pcm_rate() == 8000
        peer.add_sink(Reader(16000))
        assert peer._pcm_rate() == 16000
        peer.add_sink(Reader())  # says nothing: 48 kHz
        assert peer._pcm_rate() == 48000
    finally:
        await peer.close()


@pytest.mark.parametrize("rate", [None, 16000])
async def test_packets_longer_than_a_frame_are_still_decoded_and_cut(rate):
    """40 ms packets, nobody reading PCM (``None``: decoded all the same, to be cut) or a
    reader at 16 kHz: two 20 ms frames each, at the rate, on the stream's timeline."""
    frames = []
    wanted = {"pcm_wanted": lambda: False} if rate is None else {"pcm_rate": lambda: rate}
    rx = OpusReceiver(lambda pcm, pts: frames.append((pcm.copy(), pts)), **wanted)
    pk = tone_packets(600, 0.8)
    for k in range(len(pk) // 2):
        rx.buffer.push(k, 1920 * k, two_frames(pk[2 * k], pk[2 * k + 1]), T0 + 0.04 * k)
    play_all(rx)
    n = len(pk) // 2 * 2
    assert [p for _, p in frames[:n]] == [960 * i for i in range(n)]
    assert rx.decoder.packets >= n // 2  # a 40 ms packet: decoded, cut into two frames
    assert {pcm.size for pcm, _ in frames[:n]} == {960 if rate is None else 320}
    if rate is not None:
        assert _tone_share([pcm for pcm, _ in frames[3:n]], rate) >= 0.95
    rx.close()


async def test_a_call_recorded_to_ogg_only_decodes_nothing(tmp_path):
    """LocalMediaSession wiring: with only the Ogg pass-through recorder (and a sink that
    reads no PCM) nothing is decoded, user.ogg holds the user's tone; a PCM sink added
    mid-call makes the receiver decode again, and it hears the tone."""
    session = LocalMediaSession(LOOPBACK, label="business")
    user = MediaPeer(LOOPBACK, label="user")
    peer = session.peer
    recorder = CallRecorder(tmp_path / "rec", wav=False, stereo=False, ogg=True)
    recorder.attach(peer)
    counter = FrameGate(peer)
    counter.needs_pcm = False
    peer.add_sink(counter)
    try:
        offer = await session.offer()
        answer = sdp_rules.mark_ice_lite(await user.accept_offer(offer))
        await session.apply_answer(answer)
        await asyncio.wait_for(asyncio.gather(session.wait_up(TIMEOUT), user.media_up(TIMEOUT)), TIMEOUT)
        user.play(ToneSource(600, None))
        await counter.reached(50)
        rx = peer._receiver
        assert rx is not None and rx.pcm_rate is not None
        assert rx.decoder is None or rx.decoder.packets == 0
        assert rx.frames_not_decoded >= 50
        assert peer.received.frames >= 50  # frames counted (watchdogs) as before

        class Pcm:  # a sink that reads the audio
            def __init__(self):
                self.frames: list[np.ndarray] = []

            def write(self, pcm, sample_rate, channels=1):
                self.frames.append(pcm.copy())

            def close(self):
                pass

        reader = Pcm()
        gate = FrameGate()
        peer.add_sink(reader)
        peer.add_sink(gate)
        await gate.reached(40)
        assert rx.decoder is not None and rx.decoder.packets >= 39
        heard = np.concatenate(reader.frames[3:]).astype(np.float32) / 32768
        assert analysis.dominant_frequency(heard, SAMPLE_RATE) == pytest.approx(600, abs=5)
    finally:
        await session.close()
        await user.close()
    sidecar = recorder.close()
    assert sidecar["ogg_mode"] == "passthrough"
    x, rate = analysis.read_audio(tmp_path / "rec" / "user.ogg")
    assert analysis.dominant_frequency(x, rate) == pytest.approx(600, abs=2)
    assert analysis.tone_seconds(x, rate, 600) >= 1.5


def test_recorder_needs_pcm_only_for_files_made_from_pcm(tmp_path):
    full = CallRecorder(tmp_path / "full")
    assert full.user.needs_pcm
    ogg_only = CallRecorder(tmp_path / "ogg", wav=False, stereo=False)  # (pass-through: decided on attach)
    assert not ogg_only.user.needs_pcm
    encode = CallRecorder(tmp_path / "enc", wav=False, stereo=False, ogg_mode="encode")
    assert encode.user.needs_pcm  # encodes decoded audio again
    full.close()
    assert not full.user.needs_pcm  # finished
    for r in (ogg_only, encode):
        r.close()
