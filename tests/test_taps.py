"""media.taps (the inbound RTP tap) and the aiortc internals the toolkit relies on."""

from __future__ import annotations

import asyncio
import inspect

import aiortc.rtcdtlstransport
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import pytest

from media.frames import FRAME_SAMPLES
from media.sources.tone import ToneSource
from media_call import TIMEOUT, FrameGate, call_pair


def test_aiortc_internals_are_still_there():
    """If this fails after an aiortc upgrade, media/taps.py and media/track.py need
    revisiting: the RTP tap (Ogg pass-through, arrival-time alignment) or pre-encoded
    packets would silently stop working."""
    # The transport calls the receiver's handler through the instance, per packet.
    assert "await receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)" in inspect.getsource(
        aiortc.rtcdtlstransport.RTCDtlsTransport._handle_rtp_data
    )
    assert list(inspect.signature(aiortc.rtcrtpreceiver.RTCRtpReceiver._handle_rtp_packet).parameters) == [
        "self", "packet", "arrival_time_ms",
    ]
    # The negotiated codecs by payload type (name-mangled private attribute).
    assert "self.__codecs[codec.payloadType] = codec" in inspect.getsource(aiortc.rtcrtpreceiver.RTCRtpReceiver.receive)
    # A track may return packets, which the sender packs without encoding.
    source = inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender._next_encoded_frame)
    assert "self.__encoder.pack(data)" in source
    # The decoder stamps frames with the mapped RTP timestamp.
    assert "encoded_frame.timestamp = self.__timestamp_mapper.map(" in inspect.getsource(
        aiortc.rtcrtpreceiver.RTCRtpReceiver._handle_rtp_packet
    )


async def test_tap_sees_every_packet_with_its_timeline_and_arrival_time():
    arrivals = []
    async with call_pair() as (business, user):
        assert business.rtp_tap.installed
        business.rtp_tap.add_listener(arrivals.append)
        decoded: list[tuple[int, float | None]] = []

        class Probe:
            def write(self, pcm, rate, channels=1):
                pts = business.received.pts
                decoded.append((pts, business.rtp_tap.arrival(pts)))

            def close(self):
                pass

        gate = FrameGate()
        business.add_sink(Probe())
        business.add_sink(gate)
        said = user.play(ToneSource(600, 0.4))
        await asyncio.wait_for(said.done, TIMEOUT)
        await gate.more(10)
        business.rtp_tap.remove_listener(arrivals.append)
        count = len(arrivals)
        await gate.more(5)
        assert len(arrivals) == count  # removed: no more calls
    pts = [a.pts for a in arrivals]
    assert all(b - a == FRAME_SAMPLES for a, b in zip(pts, pts[1:]))
    assert all(a.payload and a.at > 0 for a in arrivals)
    # Each decoded frame is found by its timestamp; its packet arrived before it was
    # decoded (aiortc's jitter buffer holds ~4 packets).
    loop_now = asyncio.get_running_loop().time()
    found = [(p, t) for p, t in decoded if t is not None]
    assert len(found) >= len(decoded) - 1
    assert all(t <= loop_now for _, t in found)
    by_pts = {a.pts: a.at for a in arrivals}
    assert all(by_pts[p] == pytest.approx(t) for p, t in found if p in by_pts)
