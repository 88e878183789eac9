"""What the Opus encoder's complexity costs and buys (``WACALL_OPUS_COMPLEXITY``).

Encodes the same voice at each complexity (20 ms frames, the gateway's ``audio``
application at ``--bitrate``), at 16 kHz (a bot's voice) and 48 kHz (tones, SIP
parties), and prints per frame: CPU µs, bytes, and the decoded waveform's SNR
against the input (aligned by the encoder's lookahead).

    python bench/encoder_cost.py [--wav speech.wav] [--bitrate 32000]

The voice is ``--wav`` (any rate, mono or not), else espeak-ng's if it is installed,
else a synthetic voiced signal (a glottal pulse train at a gliding pitch through three
formant resonators).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media import libopus  # noqa: E402
from media.analysis import read_audio  # noqa: E402

SENTENCE = ("Your appointment is confirmed for Tuesday at three in the afternoon. "
            "Press one to speak to an agent, or stay on the line.")


def synthetic_voice(rate: int, seconds: float = 6.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.4 * t)  # Hz, gliding
    phase = np.cumsum(pitch / rate)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per period
    x = pulses
    for formant, width in ((700, 110), (1220, 120), (2600, 160)):  # an /a/
        r = np.exp(-np.pi * width / rate)
        a1, a2 = -2 * r * np.cos(2 * np.pi * formant / rate), r * r
        y = np.zeros_like(x)
        for i in range(2, x.size):  # (a few seconds: fine for a benchmark)
            y[i] = x[i] - a1 * y[i - 1] - a2 * y[i - 2]
        x = y
    x *= np.where((t % 1.5) < 1.1, 1.0, 0.0)  # words and pauses
    return np.round(0.3 * 32767 * x / np.max(np.abs(x))).astype(np.int16)


def at_rate(path: str, rate: int) -> np.ndarray:
    """The file as int16 mono at ``rate`` (PyAV's resampler)."""
    x, native = read_audio(path)
    frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
    frame.sample_rate = native
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16)


def voice(rate: int, wav: str | None) -> tuple[np.ndarray, str]:
    if wav:
        return at_rate(wav, rate), wav
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "voice.wav"
            subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True)
            return at_rate(str(path), rate), "espeak-ng's voice"
    return synthetic_voice(rate), "a synthetic voiced signal"


def measure(pcm: np.ndarray, rate: int, complexity: int, bitrate: int) -> tuple[float, float, float]:
    encoder = libopus.Encoder(rate, 1, application="audio", bitrate=bitrate, complexity=complexity)
    decoder = libopus.Decoder(rate, 1)
    n = encoder.frame
    frames = [pcm[i:i + n] for i in range(0, pcm.size - n + 1, n)]
    packets = [encoder.encode(f) for f in frames]
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for f in frames:
            encoder.encode(f)
        best = min(best, time.process_time() - start)
    out = np.concatenate([decoder.decode(p) for p in packets]).astype(np.float64)
    d = encoder.delay
    ref = np.concatenate(frames).astype(np.float64)[: out.size - d]
    err = ref - out[d : d + ref.size]
    snr = 10 * np.log10(np.sum(ref * ref) / max(np.sum(err * err), 1e-9))
    return best / len(frames) * 1e6, float(np.mean([len(p) for p in packets])), float(snr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wav")
    parser.add_argument("--bitrate", type=int, default=32_000)
    parser.add_argument("--complexity", type=int, nargs="+", default=[0, 1, 2, 3, 5, 8, 10])
    args = parser.parse_args()
    if not libopus.available():
        sys.exit("libopus is not available here")
    for rate in (16_000, 48_000):
        pcm, what = voice(rate, args.wav)
        print(f"{rate // 1000} kHz, {pcm.size / rate:.1f} s of {what}, {args.bitrate // 1000} kbit/s:")
        for complexity in args.complexity:
            us, size, snr = measure(pcm, rate, complexity, args.bitrate)
            print(f"  complexity {complexity:2d}: {us:6.1f} µs/frame  {size:5.0f} B/frame  SNR {snr:5.1f} dB")


if __name__ == "__main__":
    main()
