"""DTMF: RFC 4733 packets in and out of real aiortc peers, in-band tones, and the SDP."""

import asyncio
import inspect
from pathlib import Path

import numpy as np
import pytest
from aiortc.rtp import RtpPacket

from media import analysis, sdp
from media.dtmf import (
    DTMF_DIGITS,
    DtmfError,
    DtmfEvent,
    DtmfToneSource,
    GoertzelDtmfDetector,
    PeerDtmf,
    Rfc4733Decoder,
    aiortc_problems,
    pack_event,
    unpack_event,
)
from media.peer import MediaPeer, PeerConfig
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource
from tests.helpers import until

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sdp"
TIMEOUT = 20
ALL = "1234567890*#ABCD"
RATE = 48_000


def load(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode()


def loopback(**kwargs) -> PeerConfig:
    return PeerConfig(host_addresses=["127.0.0.1"], **kwargs)


# -- helpers -----------------------------------------------------------------------------


class Digits:
    """Collects a peer's DtmfEvents; ``wait(n)`` until n have arrived."""

    def __init__(self, peer: MediaPeer):
        self.events: list[DtmfEvent] = []
        self._waiters: list[tuple[int, asyncio.Future]] = []
        peer.on_dtmf(self._add)

    def _add(self, event: DtmfEvent) -> None:
        self.events.append(event)
        for count, fut in self._waiters:
            if len(self.events) >= count and not fut.done():
                fut.set_result(None)

    @property
    def digits(self) -> str:
        return "".join(e.digit for e in self.events)

    async def wait(self, count: int) -> str:
        if len(self.events) < count:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((count, fut))
            await asyncio.wait_for(fut, TIMEOUT)
        return self.digits


class FrameCounter:
    """A sink counting frames; ``more(n)`` waits for n more (audio in flight arrived)."""

    def __init__(self):
        self.frames = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def write(self, pcm, sample_rate, channels=1):
        self.frames += 1
        for target, fut in self._waiters:
            if self.frames >= target and not fut.done():
                fut.set_result(None)

    def close(self):
        pass

    async def more(self, count: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self.frames + count, fut))
        await asyncio.wait_for(fut, TIMEOUT)


class Marked:
    """Wraps a source; ``reached`` resolves once ``at_frame`` frames were read."""

    def __init__(self, source, at_frame: int):
        self.source, self.at_frame, self.count = source, at_frame, 0
        self.sample_rate, self.channels = source.sample_rate, source.channels
        self.reached = asyncio.get_running_loop().create_future()

    def read(self):
        frame = self.source.read()
        self.count += 1
        if self.count >= self.at_frame and not self.reached.done():
            self.reached.set_result(None)
        return frame

    def close(self):
        self.source.close()


class RtpTap:
    """Records every RTP packet a peer receives (parsed by aiortc), before our hook."""

    def __init__(self, peer: MediaPeer):
        dtmf = peer._dtmf  # (every received RTP packet, decrypted, passes it first: either RTP path)
        inner, inner_parsed = dtmf.incoming, dtmf.incoming_parsed
        self.packets: list[RtpPacket] = []

        def tap(data):
            self.packets.append(RtpPacket.parse(data))
            return inner(data)

        def tap_parsed(data, packet):  # (the lean path's, where the C core parsed it)
            self.packets.append(RtpPacket.parse(data))
            return inner_parsed(data, packet)

        dtmf.incoming, dtmf.incoming_parsed = tap, tap_parsed


async def connect(a_config=None, b_config=None) -> tuple[MediaPeer, MediaPeer]:
    """A offers, B answers like the sandbox phone (ICE-lite), media up on both."""
    a = MediaPeer(a_config or loopback(), label="a")
    b = MediaPeer(b_config or loopback(), label="b")
    try:
        offer = await a.create_offer()
        answer = sdp.mark_ice_lite(await b.accept_offer(offer))
        await a.apply_answer(answer)
        await asyncio.wait_for(asyncio.gather(a.media_up(), b.media_up()), TIMEOUT)
    except BaseException:
        await asyncio.gather(a.close(), b.close())
        raise
    return a, b


def dtmf_groups(packets: list[RtpPacket], pt: int) -> list[list[RtpPacket]]:
    groups: list[list[RtpPacket]] = []
    for p in packets:
        if p.payload_type == pt:
            if not groups or groups[-1][-1].timestamp != p.timestamp:
                groups.append([])
            groups[-1].append(p)
    return groups


def check_stream(packets: list[RtpPacket], digits: str, duration_ms: int, dtmf_pt: int = 126) -> None:
    """One SSRC, gap-free sequence numbers shared by audio and DTMF, and each event
    well formed on the audio clock."""
    assert len({p.ssrc for p in packets}) == 1
    seqs = [p.sequence_number for p in packets]
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), "sequence numbers must not jump"
    groups = dtmf_groups(packets, dtmf_pt)
    assert "".join(DTMF_DIGITS[unpack_event(g[0].payload).event] for g in groups) == digits
    n = -(-duration_ms // 20)
    ticks = 160  # 20 ms at 8 kHz
    index = {id(p): i for i, p in enumerate(packets)}
    for group in groups:
        events = [unpack_event(p.payload) for p in group]
        assert [p.marker for p in group] == [1] + [0] * (len(group) - 1)
        assert [e.end for e in events] == [False] * (n - 1) + [True] * 3
        assert [e.duration for e in events] == [ticks * (k + 1) for k in range(n - 1)] + [ticks * n] * 3
        assert {e.volume for e in events} == {10}
        first, last = index[id(group[0])], index[id(group[-1])]
        assert last - first == len(group) - 1  # no audio inside an event
        before, after = packets[first - 1], packets[last + 1]
        assert before.payload_type != dtmf_pt and after.payload_type != dtmf_pt
        # The event takes the audio timestamp it replaced; audio resumes on its clock.
        assert (group[0].timestamp - before.timestamp) % 2**32 == 960
        assert (after.timestamp - group[0].timestamp) % 2**32 == 960 * len(group)


# -- RFC 4733 payload and decoder ------------------------------------------------------------


def test_payload_round_trip():
    for code in range(16):
        for end in (False, True):
            payload = pack_event(code, end=end, volume=10, duration=480)
            assert len(payload) == 4
            event = unpack_event(payload)
            assert (event.event, event.end, event.volume, event.duration) == (code, end, 10, 480)
            assert event.digit == DTMF_DIGITS[code]
    assert pack_event(11, end=True, volume=63, duration=0xFFFF) == bytes([11, 0x80 | 63, 0xFF, 0xFF])
    assert unpack_event(bytes([16, 0x0A, 0, 160])).digit is None  # flash: not a DTMF digit
    with pytest.raises(ValueError):
        unpack_event(b"\x01\x02")
    with pytest.raises(ValueError):
        pack_event(1, duration=0x10000)


def event_packets(code: int, ts: int, packets: int = 5, ends: int = 3):
    """(timestamp, payload) of an event as a sender sends it: updates then end packets."""
    out = [(ts, pack_event(code, duration=160 * (k + 1))) for k in range(packets - 1)]
    out += [(ts, pack_event(code, end=True, duration=160 * packets))] * ends
    return out


def test_decoder_reports_each_event_once_with_its_duration():
    decoder = Rfc4733Decoder()
    reported = []
    now = 100.0
    for i, code in enumerate(range(16)):
        for ts, payload in event_packets(code, 1000 + 4800 * i):
            now += 0.02
            reported += decoder.feed(payload, timestamp=ts, now=now, ssrc=7)
    assert "".join(e.digit for e in reported) == DTMF_DIGITS
    assert {e.duration_ms for e in reported} == {100}
    assert {e.source for e in reported} == {"rfc4733"}
    assert all(a.at < b.at for a, b in zip(reported, reported[1:]))
    # Late duplicates of any event already reported change nothing.
    for ts, payload in event_packets(3, 1000 + 4800 * 3):
        assert decoder.feed(payload, timestamp=ts, now=now, ssrc=7) == []
    assert decoder.expire(now + 10) == [] and decoder.flush() == []


def test_decoder_same_digit_twice_is_two_events():
    decoder = Rfc4733Decoder()
    out = []
    for ts in (0, 9600):
        for t, payload in event_packets(5, ts):
            out += decoder.feed(payload, timestamp=t, now=1.0)
    assert [e.digit for e in out] == ["5", "5"]


def test_decoder_lost_end_packets_reported_on_next_event():
    decoder = Rfc4733Decoder()
    out = []
    for ts, payload in event_packets(1, 0, ends=0):  # all 3 end packets lost
        out += decoder.feed(payload, timestamp=ts, now=1.0)
    assert out == []
    for ts, payload in event_packets(2, 9600):
        out += decoder.feed(payload, timestamp=ts, now=2.0)
    assert [(e.digit, e.duration_ms) for e in out] == [("1", 80), ("2", 100)]


def test_decoder_lost_end_packets_reported_after_timeout():
    decoder = Rfc4733Decoder(timeout_s=0.5)
    for ts, payload in event_packets(9, 0, ends=0):
        assert decoder.feed(payload, timestamp=ts, now=10.0) == []
    assert decoder.deadline == pytest.approx(10.5)
    assert decoder.expire(10.4) == []
    [event] = decoder.expire(10.5)
    assert (event.digit, event.duration_ms, event.at) == ("9", 80, 10.0)
    assert decoder.deadline is None
    # A straggler of that event arriving later is not a new digit.
    assert decoder.feed(pack_event(9, duration=800), timestamp=0, now=11.0) == []


def test_decoder_ignores_older_events_and_garbage():
    decoder = Rfc4733Decoder()
    out = []
    for ts, payload in event_packets(4, 50_000):
        out += decoder.feed(payload, timestamp=ts, now=1.0)
    # A packet of an event older than the last one (reordered across events).
    out += decoder.feed(pack_event(3, duration=160), timestamp=40_000, now=1.1)
    out += decoder.feed(b"\x01", timestamp=60_000, now=1.1)
    out += decoder.feed(pack_event(16, end=True, duration=160), timestamp=60_000, now=1.1)
    assert [e.digit for e in out] == ["4"]
    # A jump far back is the sender's timestamps restarting, not a late packet.
    for ts, payload in event_packets(9, 50_000 - (1 << 21)):
        out += decoder.feed(payload, timestamp=ts, now=3.0)
    assert [e.digit for e in out] == ["4", "9"]


def test_decoder_timestamps_wrap_around():
    decoder = Rfc4733Decoder()
    out = []
    for ts, payload in event_packets(6, 2**32 - 480) + event_packets(7, 480) + event_packets(8, 10):
        out += decoder.feed(payload, timestamp=ts, now=2.0)
    assert [e.digit for e in out] == ["6", "7"]  # 10 is just before 480: a late packet


# -- packet substitution and renumbering (PeerDtmf's hooks, fed crafted packets) -------------

SSRC = 0x1234ABCD


def rtp(seq: int, ts: int, pt: int = 96, ssrc: int = SSRC, payload: bytes = b"opus") -> bytes:
    return RtpPacket(payload_type=pt, marker=1, sequence_number=seq, timestamp=ts, ssrc=ssrc,
                     payload=payload).serialize()


async def test_send_substitutes_audio_packets_in_place():
    dtmf = PeerDtmf("unit")
    dtmf.pt, dtmf._sender, dtmf._ssrc = 126, object(), SSRC.to_bytes(4, "big")
    out: list[bytes] = []

    async def transport_send(data):
        out.append(data)

    ended = asyncio.get_running_loop().create_future()
    sending = asyncio.ensure_future(dtmf.send("7", 40, 20, ended))
    await asyncio.sleep(0)  # one turn: the task queues its packets and waits
    rtcp = bytes([0x80, 200]) + bytes(26)
    await dtmf._hooked_send_rtp(transport_send, rtcp)  # RTCP and other SSRCs: untouched
    await dtmf._hooked_send_rtp(transport_send, rtp(50, 0, ssrc=99))
    for i in range(7):
        await dtmf._hooked_send_rtp(transport_send, rtp(100 + i, 5000 + 960 * i))
    await asyncio.wait_for(sending, TIMEOUT)
    # Retransmissions: a substituted sequence number is never resent as audio.
    await dtmf._hooked_send_rtp(transport_send, rtp(101, 5960))
    await dtmf._hooked_send_rtp(transport_send, rtp(99, 4040))
    assert out[:2] == [rtcp, rtp(50, 0, ssrc=99)]
    packets = [RtpPacket.parse(d) for d in out[2:]]
    assert [p.sequence_number for p in packets] == [100, 101, 102, 103, 104, 105, 106, 99]
    assert [p.payload_type for p in packets] == [126] * 4 + [96] * 4
    assert [p.marker for p in packets[:4]] == [1, 0, 0, 0]
    assert {p.timestamp for p in packets[:4]} == {5000} and {p.ssrc for p in packets} == {SSRC}
    events = [unpack_event(p.payload) for p in packets[:4]]
    assert [(e.event, e.end, e.duration) for e in events] == [(7, False, 160)] + [(7, True, 320)] * 3
    assert out[6:9] == [rtp(104, 5000 + 960 * 4), rtp(105, 5000 + 960 * 5), rtp(106, 5000 + 960 * 6)]


async def test_cancelled_send_still_ends_the_event_in_progress():
    dtmf = PeerDtmf("unit")
    dtmf.pt, dtmf._sender, dtmf._ssrc = 126, object(), SSRC.to_bytes(4, "big")
    out: list[RtpPacket] = []

    async def transport_send(data):
        out.append(RtpPacket.parse(data))

    ended = asyncio.get_running_loop().create_future()
    sending = asyncio.ensure_future(dtmf.send("12", 100, 40, ended))
    await asyncio.sleep(0)
    for i in range(2):  # first two packets of "1" are out
        await dtmf._hooked_send_rtp(transport_send, rtp(i, 960 * i))
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    for i in range(2, 12):
        await dtmf._hooked_send_rtp(transport_send, rtp(i, 960 * i))
    events = [unpack_event(p.payload) for p in out if p.payload_type == 126]
    assert [(e.event, e.end) for e in events] == [(1, False)] * 4 + [(1, True)] * 3  # no "2"
    assert [p.payload_type for p in out[7:]] == [96] * 5


async def test_receive_takes_events_out_of_the_audio_sequence_space():
    dtmf = PeerDtmf("unit")
    digits = []
    dtmf.subscribe(digits.append)
    forwarded: list[int] = []

    async def aiortc_handle(data, arrival_time_ms):
        forwarded.append(RtpPacket.parse(data).sequence_number)

    def event(seq, end=False):
        return rtp(seq, 9600, pt=126, payload=pack_event(4, end=end, duration=160 * (seq - 11)))

    # DTMF on 12-14 (PT 126 though nothing was negotiated); 14 arrives after audio 15.
    for data in (rtp(10, 0), rtp(11, 960), event(12), event(13, True), rtp(15, 9600 + 3 * 960),
                 event(14, True), rtp(16, 9600 + 4 * 960), rtp(9, 0)):
        await dtmf._hooked_handle_rtp_data(aiortc_handle, data, 0)
    # Audio renumbered as if the events were not there; the late event leaves one gap,
    # the late audio packet keeps its number: no duplicates.
    assert forwarded == [10, 11, 13, 14, 9]
    assert [(e.digit, e.duration_ms) for e in digits] == [("4", 40)]
    dtmf.close()


# -- SDP -------------------------------------------------------------------------------------


def test_add_telephone_event_keeps_opus_first_and_the_rules():
    offer = load("wacall-offer.sdp")
    shaped = sdp.add_telephone_event(offer)
    assert "m=audio 41822 UDP/TLS/RTP/SAVPF 96 126\r\n" in shaped
    assert "a=rtpmap:96 opus/48000/2\r\na=rtpmap:126 telephone-event/8000\r\na=fmtp:126 0-15\r\n" in shaped
    summary = sdp.parse(shaped)
    assert summary.audio.codec_names() == ["opus", "telephone-event"]
    assert sdp.whatsapp_problems(shaped, role="offer") == []
    assert sdp.telephone_event_pt(shaped) == 126
    assert sdp.add_telephone_event(shaped) == shaped  # idempotent
    assert sdp.telephone_event_pt(offer) is None


def test_add_telephone_event_avoids_a_taken_payload_type():
    offer = load("wacall-offer.sdp").replace("SAVPF 96", "SAVPF 96 126").replace(
        "a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=rtpmap:126 PCMU/8000")
    shaped = sdp.add_telephone_event(offer)
    assert "SAVPF 96 126 127\r\n" in shaped
    assert sdp.telephone_event_pt(shaped) == 127
    assert sdp.add_telephone_event(load("bad-offer-video.sdp")).count("telephone-event") == 1


def test_telephone_event_pt_of_meta_sdps():
    assert sdp.telephone_event_pt(load("meta-offer-uic.sdp")) == 126
    assert sdp.telephone_event_pt(load("meta-answer-bic.sdp")) is None
    # telephone-event/48000 on 110 is not the one: 8000 Hz only.
    assert sdp.telephone_event_pt(load("meta-answer-bic-extra-payloads.sdp")) == 126


async def test_live_offer_carries_telephone_event():
    peer = MediaPeer(loopback())
    try:
        offer = await peer.create_offer()
    finally:
        await peer.close()
    audio = sdp.parse(offer).audio
    assert audio.codec_names() == ["opus", "telephone-event"]
    assert audio.formats[-1] == 126 and audio.codecs[126].clock_rate == 8000
    assert "a=fmtp:126 0-15" in offer
    assert sdp.whatsapp_problems(offer, role="offer") == []


@pytest.mark.parametrize(
    "name, pt",
    [
        ("meta-answer-bic.sdp", None),
        ("meta-answer-bic-extra-payloads.sdp", 126),
        ("meta-answer-bic-no-candidates.sdp", None),
    ],
)
async def test_meta_answers_apply_and_set_the_dtmf_payload_type(name, pt):
    peer = MediaPeer(loopback())
    try:
        with pytest.raises(DtmfError, match="before the remote description"):
            await peer.send_dtmf("1")
        await peer.create_offer()
        await peer.apply_answer(load(name))
        assert peer.dtmf_payload_type == pt
        if pt is None:
            with pytest.raises(DtmfError, match="did not negotiate telephone-event/8000"):
                await peer.send_dtmf("1")
        with pytest.raises(ValueError, match="not DTMF digits"):
            await peer.send_dtmf("12x")
        with pytest.raises(ValueError):
            await peer.send_dtmf("1", duration_ms=10)
    finally:
        await peer.close()


async def test_answers_carry_telephone_event_only_when_offered():
    peer = MediaPeer(loopback())
    try:
        answer = await peer.accept_offer(load("meta-offer-uic.sdp"))
        assert peer.dtmf_payload_type == 126
        assert sdp.telephone_event_pt(answer) == 126
        assert sdp.parse(answer).audio.formats == [111, 126]
        assert sdp.whatsapp_problems(answer, role="answer") == []
    finally:
        await peer.close()
    offer = load("meta-offer-uic.sdp").replace("SAVPF 111 126", "SAVPF 111").replace(
        "a=rtpmap:126 telephone-event/8000\r\n", "")
    peer = MediaPeer(loopback())
    try:
        answer = await peer.accept_offer(offer)
        assert peer.dtmf_payload_type is None
        assert "telephone-event" not in answer
    finally:
        await peer.close()


# -- aiortc internals -------------------------------------------------------------------------


def test_aiortc_internals_we_rely_on_are_still_there():
    """If this fails, aiortc changed how RTP flows through RTCDtlsTransport: media/dtmf.py
    must be revisited (see its module docstring)."""
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtcrtpsender import RTCRtpSender

    assert aiortc_problems() == []
    # Called through ``self.``, so a wrapper set on the instance is what runs.
    assert "await self._handle_rtp_data(data, arrival_time_ms=arrival_time_ms)" in inspect.getsource(
        RTCDtlsTransport._recv_next)
    run_rtp = inspect.getsource(RTCRtpSender._run_rtp)
    assert "await self.transport._send_rtp(packet_bytes)" in run_rtp
    assert "packet.ssrc = self._ssrc" in run_rtp
    # One packet per encoded audio frame: a substituted packet is a 20 ms slot.
    assert "for i, payload in enumerate(enc_frame.payloads)" in run_rtp


# -- real calls ----------------------------------------------------------------------------------


async def test_rfc4733_both_directions_with_audio_around(tmp_path):
    a_heard, b_heard = FrameCounter(), FrameCounter()
    a, b = await connect()
    try:
        assert a.dtmf_payload_type == b.dtmf_payload_type == 126
        a_tap, b_tap = RtpTap(a), RtpTap(b)
        a_digits, b_digits = Digits(a), Digits(b)
        a_wav, b_wav = WavSink(tmp_path / "a.wav"), WavSink(tmp_path / "b.wav")
        for peer, counter, wav in ((a, a_heard, a_wav), (b, b_heard, b_wav)):
            peer.add_sink(counter)
            peer.add_sink(wav)
        # Each side plays a tone that outlasts its DTMF; digits start once it plays.
        a_tone, b_tone = Marked(ToneSource(1000, 4.0), 10), Marked(ToneSource(600, 5.0), 10)
        a_play, b_play = a.play(a_tone), b.play(b_tone)
        await asyncio.wait_for(asyncio.gather(a_tone.reached, b_tone.reached), TIMEOUT)
        await asyncio.wait_for(asyncio.gather(
            a.send_dtmf(ALL, duration_ms=60, gap_ms=40),
            b.send_dtmf(ALL, duration_ms=100, gap_ms=60),
        ), TIMEOUT)
        assert await b_digits.wait(16) == ALL
        assert await a_digits.wait(16) == ALL
        await asyncio.wait_for(asyncio.gather(a_play.done, b_play.done), TIMEOUT)
        await asyncio.gather(a_heard.more(10), b_heard.more(10))
        assert a._dtmf.rtp_sent > 0 and b._dtmf.rtp_received > 0  # the hooks are live
    finally:
        await asyncio.gather(a.close(), b.close())

    assert {(e.duration_ms, e.source) for e in b_digits.events} == {(60, "rfc4733")}
    assert {(e.duration_ms, e.source) for e in a_digits.events} == {(100, "rfc4733")}
    assert len(b_digits.events) == len(a_digits.events) == 16  # nothing reported twice
    check_stream(b_tap.packets, ALL, 60)
    check_stream(a_tap.packets, ALL, 100)
    # The audio went on around the digits: each side heard all of the other's tone but
    # the 20 ms packets the events replaced (between digits and after the last one:
    # aiortc's receiver sees no sequence gap), and never its own.
    for path, freq, other, played, dtmf_s in (
        (tmp_path / "b.wav", 1000, 600, 4.0, 16 * 5 * 0.02),
        (tmp_path / "a.wav", 600, 1000, 5.0, 16 * 7 * 0.02),
    ):
        x, rate = analysis.read_audio(path)
        assert analysis.tone_seconds(x, rate, freq) == pytest.approx(played - dtmf_s, abs=0.1), path
        assert len(analysis.tone_segments(x, rate, freq)) == 1, path
        assert analysis.tone_seconds(x, rate, other) == 0


async def test_default_timing_and_cancel_finishes_the_event_in_progress():
    a, b = await connect()
    try:
        tap, digits = RtpTap(b), Digits(b)
        await a.send_dtmf("5")  # 160 ms, 80 ms gap
        assert await digits.wait(1) == "5"
        assert digits.events[0].duration_ms == 160
        sending = asyncio.ensure_future(a.send_dtmf("123"))
        await digits.wait(2)  # "1" reported on its first end packet: cancel mid-sequence
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await a.send_dtmf("9", duration_ms=40, gap_ms=0)
        got = await digits.wait(3 if digits.digits.endswith("9") else 4)
        # the digit is reported on its first end packet: the other two arrive after it
        await until(lambda: [unpack_event(p.payload).end for p in dtmf_groups(tap.packets, 126)[-1]][-3:]
                    == [True] * 3, TIMEOUT)
    finally:
        await asyncio.gather(a.close(), b.close())
    assert got in ("519", "5129")  # "2" only if it had started: never cut short
    groups = dtmf_groups(tap.packets, 126)
    assert len(groups) == len(got)
    for group in groups:  # every event that started ended properly, 3 end packets
        assert [unpack_event(p.payload).end for p in group][-3:] == [True] * 3
    seqs = [p.sequence_number for p in tap.packets]
    assert all((y - x) % 65536 == 1 for x, y in zip(seqs, seqs[1:]))


async def test_receives_on_126_when_the_answer_left_telephone_event_out():
    """WhatsApp sends telephone-event/8000 on PT 126 even without it in its SDP."""
    a = MediaPeer(loopback(), label="a")
    b = MediaPeer(loopback(), label="b")
    try:
        offer = await a.create_offer()
        answer = sdp.mark_ice_lite(await b.accept_offer(offer))
        stripped = answer.replace(" 96 126\r\n", " 96\r\n").replace(
            "a=rtpmap:126 telephone-event/8000\r\na=fmtp:126 0-15\r\n", "")
        assert "telephone-event" not in stripped
        await a.apply_answer(stripped)
        await asyncio.wait_for(asyncio.gather(a.media_up(), b.media_up()), TIMEOUT)
        assert a.dtmf_payload_type is None and b.dtmf_payload_type == 126
        with pytest.raises(DtmfError, match="did not negotiate"):
            await a.send_dtmf("1")
        digits = Digits(a)
        await b.send_dtmf("#0", duration_ms=60, gap_ms=40)
        assert await digits.wait(2) == "#0"
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_send_fails_when_the_call_ends():
    a, b = await connect()
    sending = asyncio.ensure_future(a.send_dtmf(ALL))
    await asyncio.sleep(0)
    await a.close()
    with pytest.raises(DtmfError, match="ended"):
        await asyncio.wait_for(sending, TIMEOUT)
    with pytest.raises(DtmfError, match="ended"):
        await a.send_dtmf("1")
    await b.close()


# -- in-band -----------------------------------------------------------------------------------


def speech_like(seconds: float, rate: int = RATE, seed: int = 1) -> np.ndarray:
    """Voiced 'speech': a gliding pitch, harmonics shaped by moving formants (F1/F2
    sweep through 697-941 / 1209-1633 Hz), syllable envelope, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 50 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 3.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f1 = 650 + 250 * np.sin(2 * np.pi * 0.9 * t)
    f2 = 1400 + 500 * np.sin(2 * np.pi * 0.37 * t + 1)
    x = np.zeros_like(t)
    for k in range(1, 30):
        fk = k * f0
        amp = (np.exp(-((fk - f1) / 120) ** 2) + 0.7 * np.exp(-((fk - f2) / 150) ** 2) + 0.05) / k**0.5
        x += np.where(fk < 4000, amp, 0) * np.sin(k * phase)
    x *= 0.5 - 0.5 * np.cos(2 * np.pi * 3.7 * t)
    x += 0.01 * rng.standard_normal(t.size)
    return x / np.sqrt(np.mean(x**2)) * 10 ** (-18 / 20)


def detect(signal: np.ndarray, rate: int = RATE, channels: int = 1, chunk: int = 960,
           **kwargs) -> list[DtmfEvent]:
    sink = GoertzelDtmfDetector(**kwargs)
    pcm = np.clip(np.rint(signal * 32767), -32768, 32767).astype(np.int16)
    for start in range(0, pcm.size, chunk):
        sink.write(pcm[start : start + chunk], rate, channels)
    sink.close()
    return sink.events


def tones(source: DtmfToneSource) -> np.ndarray:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return np.concatenate(frames).astype(np.float64) / 32767


def test_tone_source_frames_and_levels():
    source = DtmfToneSource("1#", duration_ms=100, gap_ms=60)
    assert (source.sample_rate, source.channels) == (RATE, 1)
    frames = []
    while (frame := source.read()) is not None:
        assert frame.shape == (960,) and frame.dtype == np.int16
        frames.append(frame)
    assert len(frames) == 13 and source.read() is None  # 260 ms, padded to 280
    x = np.concatenate(frames).astype(np.float64) / 32768
    assert analysis.rms_dbfs(x[480:4320]) == pytest.approx(-10.0, abs=0.3)  # two -13 dBFS tones
    assert analysis.dominant_frequency(x[:4800], RATE) in (
        pytest.approx(697, abs=25), pytest.approx(1209, abs=25))
    with pytest.raises(ValueError):
        DtmfToneSource("1E")
    with pytest.raises(ValueError):
        DtmfToneSource("1", level_dbfs=-6)


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_goertzel_detects_every_digit(rate):
    events = detect(tones(DtmfToneSource(DTMF_DIGITS, sample_rate=rate)), rate, chunk=rate // 50)
    assert "".join(e.digit for e in events) == DTMF_DIGITS
    assert all(80 <= e.duration_ms <= 100 and e.source == "inband" for e in events)


def test_goertzel_stereo_odd_chunks_noise_and_twist():
    x = tones(DtmfToneSource("0*D7", duration_ms=60, gap_ms=50))
    noisy = x + 0.02 * np.random.default_rng(3).standard_normal(x.size)  # ~20 dB SNR
    stereo = np.repeat(noisy, 2)
    assert "".join(e.digit for e in detect(stereo, channels=2, chunk=2 * 333)) == "0*D7"
    # 6 dB of twist either way passes; 12 dB does not.
    t = np.arange(int(0.2 * RATE)) / RATE
    for col_db, expected in ((-6, "5"), (6, "5"), (-12, ""), (12, "")):
        x = 0.2 * np.sin(2 * np.pi * 770 * t) + 0.2 * 10 ** (col_db / 20) * np.sin(2 * np.pi * 1336 * t)
        assert "".join(e.digit for e in detect(x)) == expected, col_db


def test_goertzel_minimum_duration_and_gap():
    assert detect(tones(DtmfToneSource("1", duration_ms=20))) == []
    assert [e.digit for e in detect(tones(DtmfToneSource("11", duration_ms=100, gap_ms=60)))] == ["1", "1"]
    # A gap shorter than the minimum does not split a digit.
    assert [e.digit for e in detect(tones(DtmfToneSource("11", duration_ms=100, gap_ms=15)))] == ["1"]


def test_goertzel_no_false_digits():
    rng = np.random.default_rng(7)
    t = np.arange(2 * RATE) / RATE
    cases = {
        "speech": speech_like(8.0),
        "loud speech": speech_like(4.0, seed=2) * 4,
        "white noise": 0.3 * rng.standard_normal(2 * RATE),
        "same-group pair": 0.2 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 852 * t)),
        "chord": 0.1 * sum(np.sin(2 * np.pi * f * t) for f in (440, 554.37, 659.25, 880, 1108.7, 1318.5)),
        "quiet digit": 0.005 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)),
    }
    for freq in (697, 770, 852, 941, 1209, 1336, 1477, 1633, 1000):
        cases[f"{freq} Hz"] = 0.3 * np.sin(2 * np.pi * freq * t)
    for name, x in cases.items():
        assert detect(x) == [], name


@pytest.mark.parametrize("only_reader", [False, True])
async def test_inband_digits_through_a_call_and_no_false_digits(only_reader):
    """``only_reader``: the detector is the only sink reading audio, so the call's
    audio is decoded at its 8 kHz (else at 48 kHz for the other sink)."""
    a, b = await connect(b_config=loopback(inband_dtmf=True))
    try:
        digits, heard = Digits(b), FrameCounter()
        heard.needs_pcm = not only_reader
        b.add_sink(heard)
        rng = np.random.default_rng(11)

        class Samples:
            sample_rate, channels = RATE, 1

            def __init__(self, x):
                self.pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)
                self.pos = 0

            def read(self):
                if self.pos >= self.pcm.size:
                    return None
                self.pos += 960
                frame = self.pcm[self.pos - 960 : self.pos]
                return np.pad(frame, (0, 960 - frame.size))

            def close(self):
                pass

        a.play(DtmfToneSource("159#"))
        a.play(Samples(speech_like(2.0, seed=5)))
        a.play(Samples(0.2 * rng.standard_normal(RATE // 2)))
        a.play(ToneSource(697, 0.5, amplitude=0.4))
        last = a.play(ToneSource(1477, 0.5, amplitude=0.4))
        assert await digits.wait(4) == "159#"
        await asyncio.wait_for(last.done, TIMEOUT)
        await heard.more(15)
        assert b._receiver.decoder.rate == (8000 if only_reader else 48000)
    finally:
        await asyncio.gather(a.close(), b.close())  # close flushes the detector
    assert digits.digits == "159#"
    assert {e.source for e in digits.events} == {"inband"}
    assert all(60 <= e.duration_ms <= 120 for e in digits.events)
