"""WhatsApp's SDP rules, checked against real-shaped SDPs in fixtures/sdp/ and live aiortc output."""

from pathlib import Path

import pytest

from media import sdp
from media.peer import MediaPeer, PeerConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sdp"


def load(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode()


def test_aiortc_raw_offer_breaks_the_fingerprint_rule_and_for_whatsapp_fixes_it():
    raw = load("aiortc-offer-raw.sdp")
    assert sdp.whatsapp_problems(raw, role="offer") == [
        "only a sha-256 fingerprint is accepted, found sha-384, sha-512"
    ]
    fixed = sdp.for_whatsapp(raw)
    assert sdp.whatsapp_problems(fixed, role="offer") == []
    summary = sdp.parse(fixed)
    assert [algo for algo, _ in summary.all_fingerprints()] == ["sha-256"]
    assert summary.audio.ptime == 20
    # everything else is kept, in order, with CRLF line ends
    assert fixed == load("wacall-offer.sdp")


def test_wacall_offer_fixture_follows_every_rule():
    offer = load("wacall-offer.sdp")
    assert sdp.whatsapp_problems(offer, role="offer") == []
    summary = sdp.parse(offer)
    audio = summary.audio
    assert audio.codec_names() == ["opus"]
    assert audio.codecs[96].clock_rate == 48000
    assert len(audio.candidates) == 2
    assert len(audio.ssrcs) == 1
    assert summary.setup_role() == "actpass"
    assert not summary.ice_lite


@pytest.mark.parametrize(
    "name, problem",
    [
        ("bad-offer-sha384.sdp", "only a sha-256 fingerprint is accepted, found sha-384"),
        ("bad-offer-no-candidates.sdp", "no ICE candidates in the SDP (WhatsApp has no trickle channel)"),
        ("bad-offer-no-opus.sdp", "Opus is missing from the audio codecs"),
        ("bad-offer-video.sdp", "only audio is allowed, found video"),
        ("bad-offer-malformed.sdp", "line 4 is not 'x=value': 'this is not sdp'"),
    ],
)
def test_offers_whatsapp_refuses(name, problem):
    assert problem in sdp.whatsapp_problems(load(name), role="offer")


def test_offer_rules_individually():
    offer = load("wacall-offer.sdp")
    assert "a=setup must be actpass in an offer, found active" in sdp.whatsapp_problems(
        offer.replace("a=setup:actpass", "a=setup:active"), role="offer")
    assert "ptime must be 20 ms, found 40" in sdp.whatsapp_problems(
        offer.replace("a=ptime:20", "a=ptime:40"), role="offer")
    two_ssrcs = offer.replace("a=rtpmap:96", "a=ssrc:11 cname:x\r\na=rtpmap:96")
    assert "one SSRC is allowed for audio, found 2" in sdp.whatsapp_problems(two_ssrcs, role="offer")
    with_pcmu = offer.replace("SAVPF 96", "SAVPF 96 0").replace(
        "a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=rtpmap:0 PCMU/8000")
    assert "unsupported audio codecs: pcmu" in sdp.whatsapp_problems(with_pcmu, role="offer")
    assert sdp.whatsapp_problems(with_pcmu, role="offer", allowed_codecs=("opus", "pcmu")) == []
    dtmf48 = offer.replace("SAVPF 96", "SAVPF 96 110").replace(
        "a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=rtpmap:110 telephone-event/48000")
    assert "telephone-event must be 8000 Hz, found 48000" in sdp.whatsapp_problems(dtmf48, role="offer")
    assert sdp.whatsapp_problems("", role="offer") == ["SDP is empty"]


def test_meta_answers_parse_as_ice_lite_dtls_client():
    for name in ("meta-answer-bic.sdp", "meta-answer-bic-extra-payloads.sdp", "meta-answer-bic-no-candidates.sdp"):
        summary = sdp.parse(load(name))
        assert summary.ice_lite, name
        assert summary.setup_role() == "active", name
        assert summary.audio.ice_ufrag.endswith("/1"), name  # Meta's ufrag carries a '/'
    summary = sdp.parse(load("meta-answer-bic.sdp"))
    assert len(summary.audio.candidates) == 2
    assert sdp.whatsapp_problems(load("meta-answer-bic.sdp"), role="answer") == []


def test_meta_uic_offer_is_acceptable_offer_shape():
    summary = sdp.parse(load("meta-offer-uic.sdp"))
    assert summary.ice_lite
    assert summary.audio.codec_names() == ["opus", "telephone-event"]
    assert summary.audio.codecs[126].clock_rate == 8000
    assert sdp.whatsapp_problems(load("meta-offer-uic.sdp"), role="offer") == []


def test_mark_ice_lite_is_session_level_and_idempotent():
    answer = load("wacall-offer.sdp").replace("a=setup:actpass", "a=setup:active")
    marked = sdp.mark_ice_lite(answer)
    lines = marked.split("\r\n")
    assert lines.index("a=ice-lite") < next(i for i, line in enumerate(lines) if line.startswith("m="))
    assert sdp.mark_ice_lite(marked) == marked
    assert sdp.parse(marked).ice_lite


async def test_live_aiortc_offer_follows_the_rules():
    peer = MediaPeer(PeerConfig(host_addresses=["127.0.0.1"]))
    try:
        offer = await peer.create_offer()
    finally:
        await peer.close()
    assert sdp.whatsapp_problems(offer, role="offer") == []
    summary = sdp.parse(offer)
    assert summary.audio.codec_names() == ["opus", "telephone-event"]  # RFC 4733 DTMF, 8000 Hz
    assert [c.split()[4] for c in summary.audio.candidates] == ["127.0.0.1"]
    assert summary.audio.ptime == 20
    assert len(summary.audio.ssrcs) == 1
    assert summary.setup_role() == "actpass"


async def test_live_offer_without_candidates_is_caught():
    peer = MediaPeer(PeerConfig(host_addresses=[]))
    try:
        offer = await peer.create_offer()
    finally:
        await peer.close()
    assert "no ICE candidates in the SDP (WhatsApp has no trickle channel)" in sdp.whatsapp_problems(
        offer, role="offer")


@pytest.mark.parametrize(
    "name", ["meta-answer-bic.sdp", "meta-answer-bic-extra-payloads.sdp", "meta-answer-bic-no-candidates.sdp"]
)
async def test_every_meta_answer_variant_applies_to_our_offer(name):
    """aiortc accepts each answer shape Meta sends (ICE-lite, DTLS client, extra payloads)."""
    peer = MediaPeer(PeerConfig(host_addresses=["127.0.0.1"]))
    try:
        await peer.create_offer()
        await peer.apply_answer(load(name))
        transceiver = peer._pc.getTransceivers()[0]
        assert transceiver.sender.transport.transport.role == "controlling"
        from aiortc.sdp import SessionDescription

        assert SessionDescription.parse(load(name)).media[0].ice.iceLite
    finally:
        await peer.close()
