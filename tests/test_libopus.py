"""libopus called directly (media.libopus): decoding, concealment and in-band FEC, and
the receiver using FEC for a lost packet."""

from __future__ import annotations

import numpy as np
import pytest

from media import analysis, libopus
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.jitterbuffer import playout_buffer
from media.opus import OpusEncoder, OpusSettings
from media.receiver import OpusDecoder, OpusReceiver
from tests.media_call import tone_packets

pytestmark = pytest.mark.skipif(not libopus.available(), reason=libopus.library())

#: The frame where the tone changes from 600 Hz to 1 kHz (at 0.5 s), after libopus'
#: lookahead: most of its decoded samples are the new tone, none of the frame before.
SWITCH = 25
VOIP_FEC = OpusSettings(application="voip", complexity=10, fec_loss=20)


def _switching_tone(settings: OpusSettings) -> list[bytes]:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    x = (0.3 * 32767 * np.where(t < 0.5, np.sin(2 * np.pi * 600 * t), np.sin(2 * np.pi * 1000 * t)))
    x = x.astype(np.int16)
    enc = OpusEncoder(settings)
    return [bytes(enc.encode(x[i : i + FRAME_SAMPLES])) for i in range(0, x.size, FRAME_SAMPLES)]


def test_decodes_what_pyav_decodes_sample_for_sample():
    packets = tone_packets(600, 0.4) + tone_packets(1000, 0.2, OpusSettings(application="voip"))
    direct, pyav = libopus.Decoder(), OpusDecoder(pyav=True)
    for p in packets:
        ours, theirs = direct.decode(p), pyav.decode(p)
        assert ours.dtype == np.int16 and ours.shape == (FRAME_SAMPLES,)
        np.testing.assert_array_equal(ours, theirs)
    assert analysis.dominant_frequency(ours, SAMPLE_RATE) == pytest.approx(1000, abs=25)


def test_each_frame_is_a_new_array():
    dec = libopus.Decoder()
    a, b = (dec.decode(p) for p in tone_packets(600, 0.04))
    assert not np.shares_memory(a, b)
    a[:] = 0  # ours to change
    assert analysis.rms_dbfs(b) > -30


def test_a_40ms_packet_gives_40ms():
    a, b = tone_packets(600, 0.04)
    two = bytes([(a[0] & 0xFC) | 2, len(a) - 1]) + a[1:] + b[1:]
    pcm = libopus.Decoder().decode(two)
    assert pcm.shape == (2 * FRAME_SAMPLES,)
    assert analysis.dominant_frequency(pcm, SAMPLE_RATE) == pytest.approx(600, abs=25)


def test_a_bad_packet_raises_and_leaves_the_decoder_working():
    dec = libopus.Decoder()
    packets = tone_packets(600, 0.1)
    dec.decode(packets[0])
    with pytest.raises(libopus.OpusError) as err:
        dec.decode(b"\xff\xff\xff\xff\xff")  # code 3 with a bad frame count
    assert err.value.code < 0 and "libopus" in str(err.value)
    assert analysis.rms_dbfs(dec.decode(packets[1])) > -30


def test_in_band_fec_rebuilds_a_lost_packet_that_concealment_cannot():
    packets = _switching_tone(VOIP_FEC)
    assert libopus.has_fec(packets[SWITCH + 1]) is True
    assert libopus.has_fec(tone_packets(600, 0.1)[2]) is False  # CELT carries none
    rebuilt, concealed = libopus.Decoder(), libopus.Decoder()
    for p in packets[:SWITCH]:
        rebuilt.decode(p)
        concealed.decode(p)
    # packet SWITCH is lost; the next one is here
    fec = rebuilt.decode(packets[SWITCH + 1], fec=True)
    plc = concealed.conceal()
    assert fec.shape == plc.shape == (FRAME_SAMPLES,)
    assert analysis.dominant_frequency(fec, SAMPLE_RATE) == pytest.approx(1000, abs=25)
    assert analysis.dominant_frequency(plc, SAMPLE_RATE) == pytest.approx(600, abs=25)
    # both go on decoding the packet after the loss
    for dec in (rebuilt, concealed):
        assert analysis.dominant_frequency(dec.decode(packets[SWITCH + 1]), SAMPLE_RATE) == pytest.approx(1000, abs=25)


async def _play_with_one_lost(packets: list[bytes], lost: int, decoder: OpusDecoder | None = None):
    frames: list[np.ndarray] = []
    rx = OpusReceiver(lambda pcm, pts: frames.append(pcm.copy()), buffer=playout_buffer())
    if decoder is not None:
        rx.decoder = decoder
    t0 = 1000.0
    for k, p in enumerate(packets):
        if k != lost:
            rx.buffer.push(k, FRAME_SAMPLES * k, p, t0 + 0.02 * k)
    now = rx.buffer.start_at
    for _ in packets:  # one tick per slot, up to the last packet's
        assert rx.play(now)
        now += 0.02
    rx.close()
    return frames, rx


@pytest.mark.parametrize("pyav", [False, True])
async def test_the_receiver_uses_the_next_packets_fec_for_a_lost_one(pyav, rtp_core):
    packets = _switching_tone(VOIP_FEC)
    frames, rx = await _play_with_one_lost(packets, SWITCH, OpusDecoder(pyav=pyav))
    stats = rx.stats()
    assert len(frames) == len(packets)
    assert stats["frames_concealed"] == 1
    lost = frames[SWITCH]
    if pyav:  # PyAV cannot reach FEC: libopus' concealment carries the old tone on
        assert stats["frames_fec"] == 0
        assert analysis.dominant_frequency(lost, SAMPLE_RATE) == pytest.approx(600, abs=25)
    else:
        assert stats["frames_fec"] == 1
        assert analysis.dominant_frequency(lost, SAMPLE_RATE) == pytest.approx(1000, abs=25)


async def test_without_fec_in_the_stream_the_receiver_conceals(rtp_core):
    packets = tone_packets(600, 0.6)  # CELT: no FEC
    frames, rx = await _play_with_one_lost(packets, 10)
    assert rx.stats()["frames_concealed"] == 1 and rx.stats()["frames_fec"] == 0
    assert analysis.dominant_frequency(frames[10], SAMPLE_RATE) == pytest.approx(600, abs=25)


def test_the_library_is_named():
    assert libopus.library().startswith("libopus ")


@pytest.mark.parametrize("settings", [
    OpusSettings(), OpusSettings(application="voip", complexity=10),
    OpusSettings(application="voip", fec_loss=20), OpusSettings(application="lowdelay", bitrate=64_000),
], ids=["audio", "voip", "voip-fec", "lowdelay"])
def test_the_direct_encoder_writes_what_pyav_writes_byte_for_byte(settings):
    rng = np.random.default_rng(7)
    t = np.arange(FRAME_SAMPLES * 25) / SAMPLE_RATE
    pcm = (8000 * np.sin(2 * np.pi * 600 * t) + 300 * rng.standard_normal(t.size)).astype(np.int16)
    direct, pyav = OpusEncoder(settings), OpusEncoder(settings, pyav=True)
    assert direct._direct is not None and direct.delay == pyav.delay
    for i in range(0, pcm.size, FRAME_SAMPLES):
        ours = direct.encode(pcm[i : i + FRAME_SAMPLES])
        assert isinstance(ours, bytes) and ours == bytes(pyav.encode(pcm[i : i + FRAME_SAMPLES]))
    assert [bytes(p) for p in pyav.flush()] == direct.flush()


def test_the_encoder_round_trips_a_tone_and_refuses_a_wrong_frame():
    enc, dec = libopus.Encoder(), libopus.Decoder()
    t = np.arange(FRAME_SAMPLES * 10) / SAMPLE_RATE
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    out = np.concatenate([dec.decode(enc.encode(pcm[i : i + FRAME_SAMPLES]))
                          for i in range(0, pcm.size, FRAME_SAMPLES)])
    assert analysis.dominant_frequency(out[enc.delay :], SAMPLE_RATE) == pytest.approx(1000, abs=25)
    assert analysis.rms_dbfs(out[enc.delay + 960 :]) == pytest.approx(analysis.rms_dbfs(pcm), abs=1.5)
    with pytest.raises(ValueError):
        enc.encode(pcm[:100])
    with pytest.raises(ValueError):
        libopus.Encoder(application="music")


def test_a_16_khz_encoder_takes_16_khz_frames():
    enc, dec = libopus.Encoder(16_000), libopus.Decoder()  # decoded at 48 kHz
    assert enc.frame == 320
    t = np.arange(320 * 10) / 16_000
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    out = np.concatenate([dec.decode(enc.encode(pcm[i : i + 320])) for i in range(0, pcm.size, 320)])
    assert out.size == FRAME_SAMPLES * 10
    assert analysis.dominant_frequency(out[2000:], SAMPLE_RATE) == pytest.approx(1000, abs=25)


async def test_a_loss_in_a_stream_with_fec_keeps_a_frame_more_buffered(rtp_core):
    """The first loss whose successor is not here yet, in a stream that carries FEC,
    raises the playout buffer's floor so the next loss finds its successor buffered."""
    from media.receiver import FEC_MIN_DELAY_S

    packets = _switching_tone(VOIP_FEC)
    rx = OpusReceiver(lambda pcm, pts: None, buffer=playout_buffer())
    floor = rx.buffer.min_delay_s
    assert floor < FEC_MIN_DELAY_S
    t0 = 1000.0
    for k in range(SWITCH):
        rx.buffer.push(k, FRAME_SAMPLES * k, packets[k], t0 + 0.02 * k)
    now = rx.buffer.start_at
    for _ in range(SWITCH + 1):  # the last tick is packet SWITCH's slot: lost, nothing after it
        assert rx.play(now)
        now += 0.02
    assert rx.stats()["frames_concealed"] == 1 and rx.stats()["frames_fec"] == 0
    assert rx.buffer.min_delay_s == FEC_MIN_DELAY_S
    rx.close()

    plain = OpusReceiver(lambda pcm, pts: None, buffer=playout_buffer())  # CELT: no FEC
    celt = tone_packets(600, 0.2)
    for k in range(5):
        plain.buffer.push(k, FRAME_SAMPLES * k, celt[k], t0 + 0.02 * k)
    now = plain.buffer.start_at
    for _ in range(6):
        assert plain.play(now)
        now += 0.02
    assert plain.stats()["frames_concealed"] == 1 and plain.buffer.min_delay_s == floor
    plain.close()
