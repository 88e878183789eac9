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
        business.rtp_tap.want_arrivals()
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
    # The estimate is the packet's own arrival, or earlier when later packets show it
    # was stamped late (a busy loop); never later.
    by_pts = {a.pts: a.at for a in arrivals}
    assert all(by_pts[p] - 0.2 < t <= by_pts[p] for p, t in found if p in by_pts)


def test_arrival_times_stamped_late_in_a_burst_are_pulled_back():
    """A busy event loop stamps a backlog of packets at once; a real pause in sending
    makes every later packet late too. Only the second is a gap."""
    from aiortc.rtp import RtpPacket

    from media.taps import RtpTap

    tap = RtpTap()
    tap._opus_types[111] = True  # what install() learns from the negotiated codecs
    early = RtpPacket(payload_type=111, sequence_number=0, timestamp=5000, payload=b"\xf8\xff\xfe")
    tap._on_packet(early, 99.0)
    assert tap.packets == 1 and tap.arrival(0) is None  # nobody asked: nothing kept
    tap = RtpTap()
    tap._opus_types[111] = True
    tap.want_arrivals()
    t = 100.0
    schedule = [(i, t + 0.02 * i) for i in range(10)]  # on time
    schedule += [(i, t + 0.02 * 14 + 0.001 * (i - 10)) for i in range(10, 15)]  # a 5-packet backlog
    schedule += [(i, t + 0.02 * i) for i in range(15, 20)]  # on time again
    schedule += [(i, t + 0.02 * i + 1.0) for i in range(20, 30)]  # the sender paused 1 s
    for i, at in schedule:
        tap._on_packet(RtpPacket(payload_type=111, sequence_number=i, timestamp=5000 + 960 * i, payload=b"\xf8\xff\xfe"), at)
    assert tap.packets == 30
    # The backlog reads as on time ...
    for i in range(10, 15):
        assert tap.arrival(960 * i) == pytest.approx(t + 0.02 * i, abs=0.002)
    # ... the pause does not.
    assert tap.arrival(960 * 20) == pytest.approx(t + 0.02 * 20 + 1.0)
    assert tap.arrival(960 * 19) == pytest.approx(t + 0.02 * 19)
    assert tap.arrival(None) is None and tap.arrival(960 * 99) is None
