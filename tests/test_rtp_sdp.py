"""media.rtp.sdp: plain-RTP audio offer/answer."""

from __future__ import annotations

import pytest

from media.rtp.sdp import (
    AudioRejected,
    MalformedSdp,
    NoCommonCodec,
    RtpSdpError,
    answer_offer,
    build_offer,
    parse_answer,
    parse_sdp,
)

ALL = ("PCMU", "PCMA", "G722", "opus")

# What a typical SIP phone offers (Opus on 107, telephone-event on 101 and 110).
PHONE_OFFER = """v=0
o=- 3849 3849 IN IP4 192.0.2.10
s=phone
c=IN IP4 192.0.2.10
t=0 0
m=audio 5004 RTP/AVP {pts}
a=rtpmap:107 opus/48000/2
a=fmtp:107 useinbandfec=1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:9 G722/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=rtpmap:110 telephone-event/48000
a=ptime:20
a=sendrecv
"""


def phone_offer(*pts: int) -> str:
    return PHONE_OFFER.format(pts=" ".join(map(str, pts)))


def test_offer_lists_codecs_in_order_with_dtmf():
    sdp = build_offer("198.51.100.1", 40000, ["G722", "PCMU", "opus"], session_id=7)
    assert "m=audio 40000 RTP/AVP 9 0 111 101 102\r\n" in sdp
    assert "c=IN IP4 198.51.100.1\r\n" in sdp
    assert "a=rtpmap:111 opus/48000/2\r\n" in sdp
    assert "a=rtpmap:101 telephone-event/8000\r\n" in sdp and "a=rtpmap:102 telephone-event/48000\r\n" in sdp
    assert "a=ptime:20\r\n" in sdp and "a=sendrecv\r\n" in sdp
    parsed = parse_sdp(sdp)
    assert [f.name for f in parsed.formats] == ["G722", "PCMU", "opus", "telephone-event", "telephone-event"]
    no_dtmf = build_offer("198.51.100.1", 40000, ["PCMA"], dtmf=False)
    assert "m=audio 40000 RTP/AVP 8\r\n" in no_dtmf and "telephone-event" not in no_dtmf


@pytest.mark.parametrize(
    "offer_pts, ours, codec, pt, dtmf_pt, dtmf_rate",
    [
        ((0, 8, 9, 107, 101, 110), ALL, "PCMU", 0, 101, 8000),
        ((8, 0, 101), ALL, "PCMA", 8, 101, 8000),
        ((9, 0, 101), ALL, "G722", 9, 101, 8000),
        ((107, 0, 101, 110), ALL, "opus", 107, 110, 48000),  # te rate matched to Opus
        ((107, 0, 101), ALL, "opus", 107, 101, 8000),  # else te/8000
        ((107, 9, 8, 101), ("PCMA",), "PCMA", 8, 101, 8000),  # first of the offerer's we allow
        ((0,), ALL, "PCMU", 0, None, None),  # no telephone-event offered
    ],
)
def test_answer_matrix(offer_pts, ours, codec, pt, dtmf_pt, dtmf_rate):
    answer, remote = answer_offer(phone_offer(*offer_pts), "198.51.100.1", 40002, ours)
    assert (remote.codec.name, remote.codec.payload_type) == (codec, pt)
    assert (remote.dtmf_pt, remote.dtmf_rate) == (dtmf_pt, dtmf_rate)
    assert (remote.address, remote.port, remote.direction, remote.hold) == ("192.0.2.10", 5004, "sendrecv", False)
    expected_pts = " ".join(str(p) for p in (pt, dtmf_pt) if p is not None)
    assert f"m=audio 40002 RTP/AVP {expected_pts}\r\n" in answer
    # The offerer reads our answer back to the same codec and DTMF PT.
    back = parse_answer(answer, phone_offer(*offer_pts))
    assert (back.codec.name, back.codec.payload_type, back.dtmf_pt) == (codec, pt, dtmf_pt)
    assert (back.address, back.port) == ("198.51.100.1", 40002)


@pytest.mark.parametrize("codec", ALL)
def test_offer_answer_between_us(codec):
    offer = build_offer("127.0.0.1", 40000, [codec, *[c for c in ALL if c != codec]])
    answer, remote = answer_offer(offer, "127.0.0.1", 40010)
    assert remote.codec.name == codec
    back = parse_answer(answer, offer)
    assert back.codec.name == codec and back.dtmf_pt == remote.dtmf_pt is not None
    assert back.codec.payload_type == remote.codec.payload_type


def test_hold_and_directions():
    held = phone_offer(0, 101).replace("a=sendrecv", "a=sendonly")
    answer, remote = answer_offer(held, "127.0.0.1", 40000)
    assert "a=recvonly\r\n" in answer and remote.hold and remote.sends and not remote.receives
    inactive = phone_offer(0).replace("a=sendrecv", "a=inactive")
    _, remote = answer_offer(inactive, "127.0.0.1", 40000)
    assert remote.hold and not remote.sends and not remote.receives
    old_style = phone_offer(0).replace("c=IN IP4 192.0.2.10", "c=IN IP4 0.0.0.0")
    answer, remote = answer_offer(old_style, "127.0.0.1", 40000)
    assert remote.hold and not remote.receives and "a=recvonly" in answer
    muxed = phone_offer(0) + "a=rtcp-mux\n"
    assert answer_offer(muxed, "127.0.0.1", 40000)[1].rtcp_mux


def test_no_common_codec_and_rejections():
    gsm = phone_offer(3, 101).replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:3 GSM/8000")
    with pytest.raises(NoCommonCodec) as err:
        answer_offer(gsm, "127.0.0.1", 40000)
    assert "3 GSM/8000" in str(err.value) and isinstance(err.value, RtpSdpError)
    with pytest.raises(NoCommonCodec):
        answer_offer(phone_offer(107, 101), "127.0.0.1", 40000, ("PCMU",))
    with pytest.raises(NoCommonCodec):  # SRTP is not plain RTP
        answer_offer(phone_offer(0).replace("RTP/AVP", "RTP/SAVP"), "127.0.0.1", 40000)
    with pytest.raises(AudioRejected):
        answer_offer(phone_offer(0).replace("m=audio 5004", "m=audio 0"), "127.0.0.1", 40000)
    offer = build_offer("127.0.0.1", 40000, ["PCMU"])
    with pytest.raises(NoCommonCodec):  # they answered with something we did not offer
        parse_answer(phone_offer(8), offer)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "v=0\r\ns=x\r\nt=0 0\r\n",  # no m=audio
        "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio abc RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 0 300\r\n",
        "v=0\r\nm=audio 5000 RTP/AVP 0\r\n",  # no c=
        "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 96\r\na=rtpmap:96 opus\r\n",
        "v=0\r\nc=IN IP4\r\nm=audio 5000 RTP/AVP 0\r\n",
        "v=0\r\nthis is not sdp\r\n",
    ],
)
def test_malformed(text):
    with pytest.raises(MalformedSdp):
        answer_offer(text, "127.0.0.1", 40000)
