"""SDP offer/answer for one plain-RTP audio stream (RFC 3264, RFC 4566), nothing more.

A SIP leg's media is one ``m=audio`` line over ``RTP/AVP``: no ICE, no DTLS, no SRTP,
no bundling. aiortc's ``SessionDescription`` is built around WebRTC (it expects
fingerprints, ICE credentials, mids), so this module has its own small parser.

::

    offer = build_offer("203.0.113.7", 40000, ["PCMU", "PCMA", "G722", "opus"])
    answer, media = answer_offer(remote_offer, "203.0.113.7", 40000)   # we answer
    media = parse_answer(remote_answer, offer)                          # they answered

Rules:

* offers list the codecs in our preference order (static PTs 0/8/9, Opus on a dynamic
  PT), then ``telephone-event/8000`` (and ``telephone-event/48000`` when Opus is
  offered), ``a=ptime:20``, a direction (``sendrecv``), ``c=`` our address;
* answering picks the **first codec in the offerer's order** that we support (and
  allow), echoes the offerer's PT for it, and keeps ``telephone-event`` when the offer
  has one at the chosen codec's clock rate, else at 8000 Hz, echoing its PT;
* an answer's first format (that we offered) is the codec; ``telephone-event`` is
  found by rate the same way;
* hold: ``a=sendonly``/``a=inactive``, or ``c=0.0.0.0`` (RFC 2543 style) —
  :attr:`RemoteMedia.sends` / :attr:`RemoteMedia.receives` say what the far side does;
* ``a=rtcp-mux`` and ``a=rtcp`` are read, never required.

Errors are :class:`RtpSdpError` subclasses: :class:`MalformedSdp` (not SDP, no audio
line, bad port or payload type), :class:`NoCommonCodec` (nothing we can decode; the SIP
leg answers ``488 Not Acceptable Here``), :class:`AudioRejected` (the far side set the
audio port to 0).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .codecs import AUDIO_CODECS, TELEPHONE_EVENT, RtpCodec, codec_by_name

__all__ = [
    "DEFAULT_CODECS",
    "AudioRejected",
    "MalformedSdp",
    "NoCommonCodec",
    "RemoteMedia",
    "RtpFormat",
    "RtpSdpError",
    "SdpAudio",
    "answer_offer",
    "build_offer",
    "parse_answer",
    "parse_sdp",
]

#: Our default preference: G.711 first (every SIP phone and IVR has it), then wideband.
DEFAULT_CODECS = ("PCMU", "PCMA", "G722", "opus")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
_TE48_PT = 102
_session_ids = itertools.count(int.from_bytes(os.urandom(3), "big"))


class RtpSdpError(ValueError):
    """An SDP cannot be used for a plain-RTP audio leg. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"unusable SDP: {self.reason}"


class MalformedSdp(RtpSdpError):
    """Not SDP, or no usable ``m=audio`` line (bad port, payload type, rtpmap)."""


class NoCommonCodec(RtpSdpError):
    """The offer (or answer) has no audio codec we support. ``offered`` lists the far
    side's formats (``"PT name/rate"``)."""

    def __init__(self, offered: Sequence[str], supported: Sequence[str]) -> None:
        self.offered = list(offered)
        self.supported = list(supported)
        super().__init__(f"no common audio codec (offered {', '.join(offered) or 'none'}; we support {', '.join(supported)})")


class AudioRejected(RtpSdpError):
    """The far side answered the audio stream with port 0."""


@dataclass(frozen=True, slots=True)
class RtpFormat:
    """One payload type of an ``m=`` line with what ``a=rtpmap``/``a=fmtp`` say."""

    payload_type: int
    name: str
    clock_rate: int
    channels: int = 1
    fmtp: str | None = None

    def __str__(self) -> str:
        return f"{self.payload_type} {self.name}/{self.clock_rate}"


# RFC 3551 static audio payload types we may see without an rtpmap.
_STATIC = {0: ("PCMU", 8000), 3: ("GSM", 8000), 4: ("G723", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000),
           18: ("G729", 8000)}


@dataclass(slots=True)
class SdpAudio:
    """The parts of an SDP a plain-RTP audio leg reads."""

    address: str
    port: int
    formats: list[RtpFormat]
    direction: str = "sendrecv"
    ptime: int | None = None
    rtcp_mux: bool = False
    rtcp_port: int | None = None
    session_version: int = 0
    protocol: str = "RTP/AVP"


@dataclass(slots=True)
class RemoteMedia:
    """What offer/answer settled, from our side: send ``codec`` to ``address:port``.

    Attributes:
        codec: the audio codec, with the payload type both sides use.
        dtmf_pt / dtmf_rate: telephone-event's PT and clock rate, or ``None``.
        direction: the far side's direction attribute as it wrote it.
        hold: the far side put us on hold (``sendonly``/``inactive``, or ``c=0.0.0.0``).
        sends / receives: whether the far side sends RTP / wants ours.
        ptime: the far side's ``a=ptime`` if any (we always send 20 ms).
        offered: the far side's formats (for logs).
    """

    codec: RtpCodec
    address: str
    port: int
    dtmf_pt: int | None = None
    dtmf_rate: int | None = None
    direction: str = "sendrecv"
    hold: bool = False
    ptime: int | None = None
    rtcp_mux: bool = False
    offered: list[str] = field(default_factory=list)

    @property
    def sends(self) -> bool:
        return self.direction in ("sendrecv", "sendonly")

    @property
    def receives(self) -> bool:
        return self.direction in ("sendrecv", "recvonly") and not self.hold


# -- parsing ---------------------------------------------------------------------------

_RTPMAP = re.compile(r"^(\d+)\s+([A-Za-z0-9_.\-]+)/(\d+)(?:/(\d+))?\s*$")


def parse_sdp(text: str) -> SdpAudio:
    """The first ``m=audio`` of ``text``. Raises :class:`MalformedSdp`."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedSdp("empty SDP")
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines[0].startswith("v="):
        raise MalformedSdp("does not start with v=")
    session_addr: str | None = None
    session_dir: str | None = None
    session_version = 0
    media: dict | None = None
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise MalformedSdp(f"not an SDP line: {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            if media is not None:
                break  # only the first audio stream counts
            parts = value.split()
            if parts and parts[0] == "audio":
                if len(parts) < 4:
                    raise MalformedSdp(f"short m= line: {line!r}")
                try:
                    port = int(parts[1].split("/")[0])
                    pts = [int(p) for p in parts[3:]]
                except ValueError:
                    raise MalformedSdp(f"bad port or payload type in {line!r}") from None
                if not 0 <= port <= 65535 or any(not 0 <= p <= 127 for p in pts):
                    raise MalformedSdp(f"port or payload type out of range in {line!r}")
                media = {"port": port, "pts": pts, "proto": parts[2], "rtpmap": {}, "fmtp": {}, "addr": None,
                         "dir": None, "ptime": None, "mux": False, "rtcp": None}
            continue
        if kind == "o" and media is None:
            parts = value.split()
            if len(parts) >= 3 and parts[2].isdigit():
                session_version = int(parts[2])
        elif kind == "c":
            parts = value.split()
            if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                raise MalformedSdp(f"bad c= line: {line!r}")
            addr = parts[2].split("/")[0]
            if media is None:
                session_addr = addr
            else:
                media["addr"] = addr
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in _DIRECTIONS:
                if media is None:
                    session_dir = name
                else:
                    media["dir"] = name
            elif media is None:
                continue
            elif name == "rtpmap":
                m = _RTPMAP.match(arg)
                if m is None:
                    raise MalformedSdp(f"bad rtpmap: {line!r}")
                media["rtpmap"][int(m[1])] = (m[2], int(m[3]), int(m[4] or 1))
            elif name == "fmtp":
                pt, _, params = arg.partition(" ")
                if pt.isdigit():
                    media["fmtp"][int(pt)] = params.strip()
            elif name == "ptime":
                try:
                    media["ptime"] = int(float(arg))
                except ValueError:
                    pass
            elif name == "rtcp-mux":
                media["mux"] = True
            elif name == "rtcp":
                head = arg.split()[0] if arg.split() else ""
                media["rtcp"] = int(head) if head.isdigit() else None
    if media is None:
        raise MalformedSdp("no m=audio line")
    addr = media["addr"] or session_addr
    if addr is None:
        raise MalformedSdp("no c= line for the audio stream")
    formats = []
    for pt in media["pts"]:
        if pt in media["rtpmap"]:
            name, rate, channels = media["rtpmap"][pt]
        elif pt in _STATIC:
            name, rate = _STATIC[pt]
            channels = 1
        else:
            continue  # a dynamic PT without rtpmap: unusable, skip
        formats.append(RtpFormat(pt, name, rate, channels, media["fmtp"].get(pt)))
    return SdpAudio(addr, media["port"], formats, media["dir"] or session_dir or "sendrecv", media["ptime"],
                    media["mux"], media["rtcp"], session_version, media["proto"])


# -- building --------------------------------------------------------------------------


def _codecs(codecs: Iterable[str | RtpCodec]) -> list[RtpCodec]:
    out = [c if isinstance(c, RtpCodec) else codec_by_name(c) for c in codecs]
    if not out:
        raise ValueError("at least one codec is needed")
    return out


def _render(address: str, port: int, formats: list[tuple[RtpCodec, int]], direction: str,
            session_id: int | None, version: int, ptime: int = 20) -> str:
    family = "IP6" if ":" in address else "IP4"
    sid = session_id if session_id is not None else next(_session_ids)
    lines = [
        "v=0",
        f"o=wacall {sid} {version} IN {family} {address}",
        "s=wacall",
        f"c=IN {family} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(str(pt) for _, pt in formats)}",
    ]
    for codec, pt in formats:
        lines.append(f"a=rtpmap:{pt} {codec.rtpmap}")
        if codec.fmtp:
            lines.append(f"a=fmtp:{pt} {codec.fmtp}")
    lines.append(f"a=ptime:{ptime}")
    lines.append(f"a={direction}")
    return "\r\n".join(lines) + "\r\n"


def build_offer(address: str, port: int, codecs: Iterable[str | RtpCodec] = DEFAULT_CODECS, *, dtmf: bool = True,
                direction: str = "sendrecv", session_id: int | None = None, version: int = 0) -> str:
    """Our offer: ``codecs`` in preference order, telephone-event (8000, and 48000 when
    Opus is offered) unless ``dtmf`` is false, ``a=ptime:20``, ``direction``."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}")
    chosen = _codecs(codecs)
    formats = [(c, c.payload_type) for c in chosen]
    if dtmf:
        formats.append((TELEPHONE_EVENT, TELEPHONE_EVENT.payload_type))
        if any(c.key == "opus" for c in chosen):
            te48 = RtpCodec("telephone-event", _TE48_PT, 48000, sample_rate=48000, fmtp="0-15")
            formats.append((te48, _TE48_PT))
    return _render(address, port, formats, direction, session_id, version)


def _pick_dtmf(formats: list[RtpFormat], rate: int) -> RtpFormat | None:
    events = [f for f in formats if f.name.lower() == "telephone-event"]
    for want in (rate, 8000):
        for f in events:
            if f.clock_rate == want:
                return f
    return None


def _supported(fmt: RtpFormat, allowed: dict[str, RtpCodec]) -> RtpCodec | None:
    codec = allowed.get(fmt.name.lower())
    if codec is None or fmt.clock_rate != codec.clock_rate:
        return None
    if codec.key == "opus" and fmt.channels not in (1, 2):
        return None
    return codec.with_pt(fmt.payload_type)


def _remote(sdp: SdpAudio, codec: RtpCodec, dtmf: RtpFormat | None) -> RemoteMedia:
    hold = sdp.address in ("0.0.0.0", "::") or sdp.direction in ("sendonly", "inactive")
    return RemoteMedia(codec, sdp.address, sdp.port, dtmf.payload_type if dtmf else None,
                       dtmf.clock_rate if dtmf else None, sdp.direction, hold, sdp.ptime, sdp.rtcp_mux,
                       [str(f) for f in sdp.formats])


def answer_offer(offer: str, address: str, port: int, codecs: Iterable[str | RtpCodec] = DEFAULT_CODECS, *,
                 dtmf: bool = True, session_id: int | None = None, version: int = 0) -> tuple[str, RemoteMedia]:
    """Answer the far side's offer: ``(answer_sdp, remote_media)``.

    Raises:
        MalformedSdp: the offer is not usable SDP.
        NoCommonCodec: nothing in the offer is among ``codecs``.
    """
    sdp = parse_sdp(offer)
    if sdp.port == 0:
        raise AudioRejected("the offer's audio stream has port 0")
    if "SAVP" in sdp.protocol or sdp.protocol.startswith("UDP/TLS"):
        raise NoCommonCodec([f"{sdp.protocol} (encrypted media)"], ["RTP/AVP"])
    allowed = {c.key: c for c in _codecs(codecs)}
    chosen: RtpCodec | None = None
    for fmt in sdp.formats:
        chosen = _supported(fmt, allowed)
        if chosen is not None:
            break
    if chosen is None:
        raise NoCommonCodec([str(f) for f in sdp.formats], [c.name for c in allowed.values()])
    te = _pick_dtmf(sdp.formats, chosen.clock_rate) if dtmf else None
    formats: list[tuple[RtpCodec, int]] = [(chosen, chosen.payload_type)]
    if te is not None:
        formats.append((RtpCodec("telephone-event", te.payload_type, te.clock_rate, sample_rate=te.clock_rate,
                                 fmtp=te.fmtp or "0-15"), te.payload_type))
    direction = _REVERSE[sdp.direction]
    if sdp.address in ("0.0.0.0", "::") and direction == "sendrecv":
        direction = "recvonly"
    answer = _render(address, port, formats, direction, session_id, version)
    return answer, _remote(sdp, chosen, te)


def parse_answer(answer: str, offer: str | None = None, codecs: Iterable[str | RtpCodec] = DEFAULT_CODECS) -> RemoteMedia:
    """The far side's answer to our ``offer`` (its text; or ``codecs`` when not given).

    Raises:
        MalformedSdp: not usable SDP.
        AudioRejected: the audio port is 0.
        NoCommonCodec: the answer names no codec we offered.
    """
    sdp = parse_sdp(answer)
    if sdp.port == 0:
        raise AudioRejected("the answer rejected the audio stream (port 0)")
    if offer is not None:
        ours = parse_sdp(offer)
        allowed = {f.name.lower(): codec for f in ours.formats if (codec := AUDIO_CODECS.get(f.name.lower()))}
    else:
        allowed = {c.key: c for c in _codecs(codecs)}
    chosen = None
    for fmt in sdp.formats:
        chosen = _supported(fmt, allowed)
        if chosen is not None:
            break
    if chosen is None:
        raise NoCommonCodec([str(f) for f in sdp.formats], [c.name for c in allowed.values()])
    return _remote(sdp, chosen, _pick_dtmf(sdp.formats, chosen.clock_rate))
