"""CPU cost of the plain-RTP codecs (media.rtp.codecs), per 20 ms frame, 48 kHz in/out.

    .venv/bin/python bench/rtp_codecs.py [frames]

Encode = 48 kHz frame → payload (resampling included); decode = payload → 48 kHz
frame. Also: a G.722 coder in pure Python/numpy would be a per-sample loop (ADPCM is
backward-adaptive); the FFmpeg one is what media.rtp uses.
"""

from __future__ import annotations

import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from media.rtp.codecs import AUDIO_CODECS, make_decoder, make_encoder


def main(frames: int = 2000) -> None:
    n = np.arange(frames * 960)
    pcm = np.round(0.3 * 32767 * (np.sin(2 * np.pi * 440 * n / 48000) + 0.3 * np.sin(2 * np.pi * 1300 * n / 48000)) / 1.3)
    pcm = pcm.astype(np.int16).reshape(frames, 960)
    print(f"{'codec':8} {'encode µs':>10} {'decode µs':>10} {'conceal µs':>11} {'bytes':>6}")
    for name, codec in AUDIO_CODECS.items():
        enc, dec = make_encoder(codec), make_decoder(codec)
        for i in range(20):  # warm up
            dec.decode(enc.encode(pcm[i]))
        t_enc = t_dec = t_con = float("inf")
        for _ in range(5):  # best of 5: the machine may be busy
            t = time.perf_counter()
            payloads = [enc.encode(frame) for frame in pcm]
            t_enc = min(t_enc, (time.perf_counter() - t) / frames * 1e6)
            t = time.perf_counter()
            for p in payloads:
                dec.decode(p)
            t_dec = min(t_dec, (time.perf_counter() - t) / frames * 1e6)
            t = time.perf_counter()
            for _ in range(200):
                dec.conceal()
            t_con = min(t_con, (time.perf_counter() - t) / 200 * 1e6)
        size = int(np.mean([len(p) for p in payloads]))
        print(f"{codec.name:8} {t_enc:10.1f} {t_dec:10.1f} {t_con:11.1f} {size:6d}")


async def latency(codec: str, trials: int = 10) -> list[float]:
    """Two RtpEndpoints on 127.0.0.1: the loop time from the first tone frame read by
    the sender's tick to the first frame carrying it delivered by the receiver's
    playout (jitter buffer start delay included), in ms."""
    import asyncio

    from media.rtp import RtpEndpoint

    out = []
    for _ in range(trials):
        loop = asyncio.get_running_loop()
        a, b = RtpEndpoint(codecs=[codec], rtcp=False), RtpEndpoint(codecs=[codec], rtcp=False)
        await a.open()
        await b.open()
        a.set_remote_answer(b.accept_offer(a.create_offer()))
        heard = loop.create_future()
        start = {"t": None}

        class Burst:
            sample_rate, channels = 48000, 1

            def __init__(self):
                self.n = 0

            def read(self):
                self.n += 1
                if self.n < 25:
                    return np.zeros(960, np.int16)
                if start["t"] is None:
                    start["t"] = loop.time()
                return np.full(960, 8000, np.int16) * np.sign(np.sin(np.arange(960) / 4)).astype(np.int16)

            def close(self):
                pass

        class Ear:
            def write(self, pcm, rate, channels=1):
                if start["t"] is not None and not heard.done() and np.abs(pcm.astype(np.int32)).max() > 2000:
                    heard.set_result(loop.time() - start["t"])

            def close(self):
                pass

        a.play(Burst())
        b.add_sink(Ear())
        out.append(await asyncio.wait_for(heard, 10) * 1000)
        a.close()
        b.close()
    return out


if __name__ == "__main__":
    import asyncio

    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
    for name in ("PCMU", "G722", "opus"):
        ms = sorted(asyncio.run(latency(name)))
        print(f"latency {name:5} tick→playout over loopback: median {ms[len(ms) // 2]:.1f} ms, "
              f"min {ms[0]:.1f}, max {ms[-1]:.1f} (n={len(ms)})")
