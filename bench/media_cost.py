"""CPU cost of the media toolkit per call-second.

Each scenario runs the per-frame work of one call leg for many 20 ms frames as fast as
it can (no real-time waiting) and divides the process CPU time by the simulated call
seconds. "calls/core" is how many concurrent calls one core could carry doing only
that piece of work (1000 ms / cost per call-second).

Playback scenarios drive ``OutboundAudioTrack.next_frame()``: what the track does every
20 ms once a frame is due (read the source, encode or pass through, build the
``av.Packet``). Recorder scenarios feed what the receive pump / outbound tap / RTP tap
feed in a call: decoded stereo frames (aiortc's Opus decoder output), the mono frames
sent, Opus payloads.

Not included: aiortc's own per-packet work (RTP, SRTP, ICE, DTLS), the Opus *decoding*
aiortc does for every received frame (shown separately as a reference), asyncio
scheduling. The "aiortc encoder" row is what aiortc does per frame when handed PCM
(its stereo 96 kbit/s encode, without the thread-pool hop it also makes).

Run: python bench/media_cost.py [--seconds 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media.frames import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from media.opus import OpusEncoder, encode_pcm  # noqa: E402
from media.sinks.meter import LevelMeter, SpeechDetector  # noqa: E402
from media.sinks.ogg import OggOpusPassthrough, OggOpusSink  # noqa: E402
from media.sinks.recorder import CallRecorder  # noqa: E402
from media.sinks.stereo import AlignedStereoRecorder  # noqa: E402
from media.sinks.wav import WavSink  # noqa: E402
from media.sources.file import FileSource  # noqa: E402
from media.sources.prompt import Prompt, PromptSource  # noqa: E402
from media.track import OutboundAudioTrack  # noqa: E402

FRAME_S = 0.02
PROMPT_S = 10.0


def speechlike(seconds: float, seed: int = 1) -> np.ndarray:
    """Voiced-speech-like test audio: harmonics of a wandering pitch, syllable envelope,
    a little noise, pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 130 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    envelope *= (np.sin(2 * np.pi * 0.2 * t) > -0.6)  # pauses
    x = x * envelope + rng.normal(0, 0.02, n)
    return (x / np.abs(x).max() * 0.5 * 32767).astype(np.int16)


def write_files(directory: Path, pcm: np.ndarray) -> dict[str, Path]:
    wav = directory / "prompt.wav"
    with WavSink(wav) as sink:
        for i in range(0, pcm.size, FRAME_SAMPLES):
            sink.write(pcm[i : i + FRAME_SAMPLES], SAMPLE_RATE)
    ogg = directory / "prompt.ogg"
    sink = OggOpusSink(ogg)
    for i in range(0, pcm.size, FRAME_SAMPLES):
        sink.write(pcm[i : i + FRAME_SAMPLES], SAMPLE_RATE)
    sink.close()
    return {"wav": wav, "ogg": ogg}


def cpu(fn, frames: int, repeat: int) -> float:
    """Best-of-``repeat`` CPU seconds per frame of ``fn(frames)``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn(frames)
        best = min(best, (time.process_time() - t0) / frames)
    return best


def playback(make_source):
    def run(frames: int) -> None:
        track = OutboundAudioTrack()
        track.play(make_source())
        for _ in range(frames):
            if not track.playing:
                track.play(make_source())
            track.next_frame()
        track.stop()

    return run


def idle(frames: int) -> None:
    track = OutboundAudioTrack()
    for _ in range(frames):
        track.next_frame()
    track.stop()


def aiortc_encoder(pcm: np.ndarray):
    from aiortc.codecs.opus import OpusEncoder as AiortcOpus

    def run(frames: int) -> None:
        enc = AiortcOpus()
        tb = fractions.Fraction(1, SAMPLE_RATE)
        for i in range(frames):
            j = (i * FRAME_SAMPLES) % (pcm.size - FRAME_SAMPLES)
            frame = av.AudioFrame.from_ndarray(pcm[j : j + FRAME_SAMPLES].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = i * FRAME_SAMPLES
            frame.time_base = tb
            enc.encode(frame)

    return run


def decoded_frames(pcm: np.ndarray, count: int = 500) -> list[np.ndarray]:
    """What the receive pump hands sinks: aiortc's decoder output, stereo s16."""
    out = []
    for i in range(count):
        j = (i * FRAME_SAMPLES) % (pcm.size - FRAME_SAMPLES)
        mono = pcm[j : j + FRAME_SAMPLES]
        out.append(np.repeat(mono, 2))
    return out


def aiortc_decoder(packets: list[bytes]):
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.jitterbuffer import JitterFrame

    def run(frames: int) -> None:
        dec = OpusDecoder()
        for i in range(frames):
            frame = dec.decode(JitterFrame(packets[i % len(packets)], i * FRAME_SAMPLES))
            frame[0].to_ndarray()

    return run


def sink_run(make_sink, frames_in: list[np.ndarray], channels: int = 2):
    def run(frames: int) -> None:
        sink = make_sink()
        n = len(frames_in)
        for i in range(frames):
            sink.write(frames_in[i % n], SAMPLE_RATE, channels)
        sink.close()

    return run


def stereo_run(path: Path, user: list[np.ndarray], business: list[np.ndarray]):
    def run(frames: int) -> None:
        now = [0.0]
        rec = AlignedStereoRecorder(path, clock=lambda: now[0])
        n = len(user)
        left, right = rec.left, rec.right
        for i in range(frames):
            now[0] = i * FRAME_S
            right.write_timed(business[i % n], SAMPLE_RATE, 1, i * FRAME_SAMPLES, now[0])
            left.write_timed(user[i % n], SAMPLE_RATE, 2, i * FRAME_SAMPLES, now[0] - 0.001)
        rec.close()

    return run


def passthrough_run(path: Path, packets: list[bytes]):
    def run(frames: int) -> None:
        sink = OggOpusPassthrough(path)
        n = len(packets)
        for i in range(frames):
            sink.add(i * FRAME_SAMPLES, packets[i % n])
        sink.close()

    return run


def call_recorder_run(directory: Path, user: list[np.ndarray], business: list[np.ndarray], packets: list[bytes]):
    """The whole per-call recorder as the gateway would use it: user.wav, stereo.wav
    (both legs) and user.ogg pass-through, fed what a peer feeds it."""

    def run(frames: int) -> None:
        now = [0.0]
        rec = CallRecorder(directory / "call", ogg=False, clock=lambda: now[0])
        ogg = OggOpusPassthrough(directory / "call" / "user.ogg")
        n, m = len(user), len(packets)
        for i in range(frames):
            now[0] = i * FRAME_S
            ogg.add(i * FRAME_SAMPLES, packets[i % m])
            rec.business.write(business[i % n], SAMPLE_RATE, 1)
            rec.user.write(user[i % n], SAMPLE_RATE, 2)
        ogg.close()
        rec.close()

    return run


async def main(seconds: float, repeat: int) -> None:
    frames = int(seconds / FRAME_S)
    pcm = speechlike(PROMPT_S)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_files(tmp, pcm)
        prompt = Prompt.from_file(files["ogg"])
        prompt.encode()
        packets = encode_pcm(pcm[: (pcm.size // FRAME_SAMPLES) * FRAME_SAMPLES])
        user = decoded_frames(pcm)
        business = [pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(500)]

        rows: list[tuple[str, float]] = []

        def add(name: str, fn) -> None:
            rows.append((name, cpu(fn, frames, repeat)))
            print(f"  measured {name}", file=sys.stderr)

        print(f"{frames} frames ({seconds:g} call-seconds) per scenario, best of {repeat}", file=sys.stderr)
        add("reference: aiortc encoder per frame (stereo 96k)", aiortc_encoder(pcm))
        add("reference: aiortc decoder per frame (receive)", aiortc_decoder(packets))
        add("reference: OpusEncoder alone (default settings)", lambda n: _encode_only(n, business))
        add("playback: idle (cached silence packet)", idle)
        add("playback: uncached file, WAV", playback(lambda: FileSource(files["wav"])))
        add("playback: uncached file, Ogg/Opus", playback(lambda: FileSource(files["ogg"])))
        add("playback: prompt cache, PCM (encoded per call)", playback(lambda: PromptSource(prompt, encoded=False)))
        add("playback: prompt cache, pre-encoded packets", playback(lambda: PromptSource(prompt, encoded=True)))
        add("record: user.wav (WavSink, stereo->mono)", sink_run(lambda: WavSink(tmp / "u.wav"), user))
        add("record: stereo.wav aligned (both legs)", stereo_run(tmp / "s.wav", user, business))
        add("record: user.ogg pass-through (RTP payloads)", passthrough_run(tmp / "p.ogg", packets))
        add("record: user.ogg encode (OggOpusSink)", sink_run(lambda: OggOpusSink(tmp / "e.ogg"), user))
        add("record: CallRecorder (wav + stereo + ogg pass-through)", call_recorder_run(tmp, user, business, packets))
        add("meter: LevelMeter", sink_run(LevelMeter, user))
        add("meter: SpeechDetector", sink_run(SpeechDetector, user))

    print()
    print(f"{'scenario':<52}{'us/frame':>10}{'ms CPU per call-s':>19}{'calls/core':>12}")
    for name, per_frame in rows:
        per_call_s = per_frame / FRAME_S * 1000  # ms of CPU per second of call
        print(f"{name:<52}{per_frame * 1e6:10.1f}{per_call_s:19.3f}{1000 / per_call_s:12.0f}")
    print()
    print("calls/core counts only the scenario's own work (see the module docstring).")


def _encode_only(frames: int, business: list[np.ndarray]) -> None:
    enc = OpusEncoder()
    n = len(business)
    for i in range(frames):
        enc.encode(business[i % n])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated call-seconds per scenario")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    asyncio.run(main(args.seconds, args.repeat))
