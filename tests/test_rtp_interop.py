"""Interop: FFmpeg's own RTP muxer (libavformat, through PyAV) sends G.711 to an
RtpEndpoint; the endpoint latches onto FFmpeg's source port and plays the tone."""

from __future__ import annotations

import av
import numpy as np
import pytest

from media import analysis
from media.lean import FrameTicker
from media.rtp import RtpEndpoint
from media.rtp.sdp import build_offer
from tests.helpers import TIMEOUT, ToneEars


@pytest.mark.parametrize("codec, ffmpeg_codec", [("PCMU", "pcm_mulaw"), ("PCMA", "pcm_alaw")])
async def test_ffmpeg_rtp_muxer_to_endpoint(codec, ffmpeg_codec):
    ep = RtpEndpoint(codecs=[codec], rtcp=False)
    ears = ToneEars(1000.0)
    await ep.open()
    # The "phone" claims port 9 (discard) in its SDP: only latching finds FFmpeg's port.
    ep.accept_offer(build_offer("127.0.0.1", 9, [codec], dtmf=False))
    ep.add_sink(ears)
    out = av.open(f"rtp://127.0.0.1:{ep.local_address[1]}", "w", format="rtp")
    stream = out.add_stream(ffmpeg_codec, rate=8000, layout="mono")
    n = {"i": 0}
    ticker = FrameTicker.current()

    def tick(now, late, frames):  # one 20 ms packet per tick, paced like a phone
        for _ in range(frames):
            t = (np.arange(160) + 160 * n["i"]) / 8000
            frame = av.AudioFrame.from_ndarray((0.3 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)[None, :],
                                               format="s16", layout="mono")
            frame.sample_rate = 8000
            frame.pts = 160 * n["i"]
            n["i"] += 1
            for packet in stream.encode(frame):
                out.mux(packet)

    ticker.add(tick)
    try:
        await ears.hears(1.0, timeout=TIMEOUT)
    finally:
        ticker.remove(tick)
        out.close()
        ep.close()
    assert ep.latched and ep.remote_addr[1] != 9
    assert ep.stats.packets_lost == 0 and ep.stats.packets_unknown_pt == 0
    assert abs(analysis.dominant_frequency(ears.audio[-24000:], 48000) - 1000) <= 20
