"""Plain RTP for SIP legs: codecs, SDP offer/answer, an endpoint, and a bridge to a call.

* :mod:`.codecs` — PCMU, PCMA, G.722, Opus (+ telephone-event), 48 kHz in and out;
* :mod:`.sdp` — one ``m=audio`` over RTP/AVP: offers, answers, hold, typed errors;
* :mod:`.endpoint` — :class:`RtpEndpoint`: UDP socket, symmetric RTP, jitter buffer,
  RFC 4733, RTCP sender reports, stats;
* :mod:`.bridge` — :class:`RtpBridge`: a :class:`~media.peer.MediaPeer` ⇄ an endpoint,
  with the bot bridges' lifecycle.

``media`` never imports ``gateway``: SIP signalling lives in ``gateway/sip/``.
"""

from .bridge import RtpBridge
from .codecs import (
    AUDIO_CODECS,
    G722,
    OPUS,
    PCMA,
    PCMU,
    TELEPHONE_EVENT,
    RtpCodec,
    make_decoder,
    make_encoder,
)
from .endpoint import RtpEndpoint, RtpPlayout, RtpStats
from .sdp import (
    DEFAULT_CODECS,
    AudioRejected,
    MalformedSdp,
    NoCommonCodec,
    RemoteMedia,
    RtpSdpError,
    answer_offer,
    build_offer,
    parse_answer,
    parse_sdp,
)

__all__ = [
    "AUDIO_CODECS",
    "DEFAULT_CODECS",
    "G722",
    "OPUS",
    "PCMA",
    "PCMU",
    "TELEPHONE_EVENT",
    "AudioRejected",
    "MalformedSdp",
    "NoCommonCodec",
    "RemoteMedia",
    "RtpBridge",
    "RtpCodec",
    "RtpEndpoint",
    "RtpPlayout",
    "RtpSdpError",
    "RtpStats",
    "answer_offer",
    "build_offer",
    "make_decoder",
    "make_encoder",
    "parse_answer",
    "parse_sdp",
]
