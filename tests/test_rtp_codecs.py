"""media.rtp.codecs: every codec round-trips a tone (48 kHz in, 48 kHz out)."""

from __future__ import annotations

import numpy as np
import pytest

from media.frames import FRAME_SAMPLES
from media.rtp.codecs import (
    AUDIO_CODECS,
    G722,
    OPUS,
    PCMA,
    PCMU,
    codec_by_name,
    make_decoder,
    make_encoder,
)

SNR_DB = {"pcmu": 30.0, "pcma": 30.0, "g722": 25.0, "opus": 15.0}


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    n = np.arange(int(48000 * seconds))
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * n / 48000)).astype(np.int16)


def peak_hz(x: np.ndarray, rate: int = 48000) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[spectrum.argmax()])


def snr_db(x: np.ndarray, freq: float, rate: int = 48000) -> float:
    """Signal-to-everything-else: least-squares fit of a sine at ``freq`` (any phase)."""
    t = np.arange(x.size) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)], axis=1)
    y = x.astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    fit = basis @ coef
    noise = y - fit
    return 10 * np.log10(np.sum(fit**2) / max(np.sum(noise**2), 1e-9))


def round_trip(name: str, pcm: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    codec = AUDIO_CODECS[name]
    enc, dec = make_encoder(codec), make_decoder(codec)
    payloads = [enc.encode(pcm[i : i + FRAME_SAMPLES]) for i in range(0, pcm.size, FRAME_SAMPLES)]
    out = np.concatenate([dec.decode(p) for p in payloads])
    return payloads, out


@pytest.mark.parametrize("name", ["pcmu", "pcma", "g722", "opus"])
@pytest.mark.parametrize("freq", [1000.0, 440.0])
def test_tone_round_trip(name, freq):
    payloads, out = round_trip(name, tone(freq))
    assert out.size == 48000  # 50 frames of 20 ms, 48 kHz out
    steady = out[4800:]  # skip codec / filter start-up (100 ms)
    assert abs(peak_hz(steady) - freq) <= 20
    assert snr_db(steady, freq) >= SNR_DB[name], snr_db(steady, freq)
    sizes = {len(p) for p in payloads}
    if name in ("pcmu", "pcma", "g722"):
        assert sizes == {160}  # 20 ms at 8000 ticks (G.722: 16 kHz audio, 4 bits/sample)
    else:
        assert max(sizes) < 200


def test_table_and_silence():
    assert (PCMU.payload_type, PCMA.payload_type, G722.payload_type) == (0, 8, 9)
    assert G722.clock_rate == 8000 and G722.sample_rate == 16000 and G722.ticks_per_frame == 160
    assert OPUS.clock_rate == 48000 and OPUS.rtpmap == "opus/48000/2" and OPUS.ticks_per_frame == 960
    assert codec_by_name("pcmu") is PCMU
    with pytest.raises(ValueError):
        codec_by_name("GSM")
    assert make_encoder(PCMU).silence() == b"\xff" * 160
    assert make_encoder(PCMA).silence() == b"\xd5" * 160
    for codec in (PCMU, PCMA, G722, OPUS):
        dec = make_decoder(codec)
        assert dec.conceal().size == FRAME_SAMPLES
        assert not np.any(make_decoder(codec).decode(make_encoder(codec).silence())[:FRAME_SAMPLES] > 200)
