"""WhatsApp's SDP rules: reading an SDP, shaping ours, and checking anyone's.

WhatsApp (Meta's relay) is strict about the SDP a business sends:

* audio only, Opus at 48 kHz (PCMA/PCMU only when enabled in the call settings),
  ``telephone-event`` at 8000 Hz only, 20 ms packets;
* exactly one ``a=fingerprint`` and it must be ``sha-256`` (aiortc writes sha-256,
  sha-384 and sha-512 lines: the extra two are refused);
* every ICE candidate inside the SDP: the API has no trickle channel;
* one SSRC for the business audio.

Meta's side is ICE-lite (``a=ice-lite`` at session level) and only takes the controlled
role. This module is plain text work, shared by the gateway (shaping our offers and
answers) and the sandbox (refusing what Meta would refuse).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

CRLF = "\r\n"

#: The only fingerprint hash WhatsApp accepts.
FINGERPRINT_ALGORITHM = "sha-256"
#: Clock rate of telephone-event (RFC 4733) on WhatsApp.
DTMF_CLOCK_RATE = 8000
PTIME_MS = 20


class SdpError(ValueError):
    """An SDP that cannot be parsed or breaks WhatsApp's rules."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(slots=True)
class Codec:
    payload_type: int
    name: str
    clock_rate: int
    channels: int = 1


@dataclass(slots=True)
class MediaSection:
    kind: str
    port: int
    protocol: str
    formats: list[int]
    codecs: dict[int, Codec] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ssrcs: set[int] = field(default_factory=set)
    direction: str | None = None
    ptime: int | None = None
    mid: str | None = None

    def codec_names(self) -> list[str]:
        return [self.codecs[pt].name.lower() for pt in self.formats if pt in self.codecs]


@dataclass(slots=True)
class SessionSummary:
    """What the rules care about in one SDP."""

    ice_lite: bool
    fingerprints: list[tuple[str, str]]
    setup: str | None
    ice_ufrag: str | None
    ice_pwd: str | None
    media: list[MediaSection]

    @property
    def audio(self) -> MediaSection | None:
        return next((m for m in self.media if m.kind == "audio"), None)

    def all_fingerprints(self) -> list[tuple[str, str]]:
        return self.fingerprints + [fp for m in self.media for fp in m.fingerprints]

    def setup_role(self) -> str | None:
        audio = self.audio
        return (audio.setup if audio and audio.setup else None) or self.setup


_RTPMAP = re.compile(r"^(\d+) ([^/\s]+)/(\d+)(?:/(\d+))?$")


def parse(sdp: str) -> SessionSummary:
    """Parse the parts of an SDP the WhatsApp rules need. Raises :class:`SdpError`."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise SdpError("SDP is empty")
    lines = [line.strip() for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines[0].startswith("v=0"):
        raise SdpError("SDP must start with v=0")
    session = SessionSummary(False, [], None, None, None, [])
    current: MediaSection | None = None
    for number, line in enumerate(lines, 1):
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"line {number} is not 'x=value': {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise SdpError(f"malformed m= line: {line[:60]!r}")
            try:
                formats = [int(f) for f in parts[3:]]
            except ValueError:
                formats = []  # non-RTP media (e.g. a data channel)
            current = MediaSection(parts[0], int(parts[1].split("/")[0]), parts[2], formats)
            session.media.append(current)
            continue
        if kind != "a":
            continue
        name, _, arg = value.partition(":")
        target = current
        if name == "ice-lite":
            session.ice_lite = True
        elif name == "fingerprint":
            algo, _, digest = arg.partition(" ")
            fp = (algo.strip().lower(), digest.strip())
            (target.fingerprints if target else session.fingerprints).append(fp)
        elif name == "setup":
            if target:
                target.setup = arg.strip()
            else:
                session.setup = arg.strip()
        elif name == "ice-ufrag":
            if target:
                target.ice_ufrag = arg
            else:
                session.ice_ufrag = arg
        elif name == "ice-pwd":
            if target:
                target.ice_pwd = arg
            else:
                session.ice_pwd = arg
        elif target is None:
            continue
        elif name == "rtpmap":
            match = _RTPMAP.match(arg.strip())
            if not match:
                raise SdpError(f"malformed rtpmap: {arg[:60]!r}")
            pt, codec, rate, channels = match.groups()
            target.codecs[int(pt)] = Codec(int(pt), codec, int(rate), int(channels or 1))
        elif name == "candidate":
            target.candidates.append(arg)
        elif name == "ssrc":
            ssrc = arg.split(" ", 1)[0]
            if ssrc.isdigit():
                target.ssrcs.add(int(ssrc))
        elif name in ("sendrecv", "sendonly", "recvonly", "inactive"):
            target.direction = name
        elif name == "ptime" and arg.strip().isdigit():
            target.ptime = int(arg)
        elif name == "mid":
            target.mid = arg
    return session


def _is_fingerprint(line: str) -> bool:
    return line.lower().startswith("a=fingerprint:")


def _lines(sdp: str) -> list[str]:
    return [line for line in sdp.replace("\r\n", "\n").split("\n") if line]


def _join(lines: list[str]) -> str:
    return CRLF.join(lines) + CRLF


def keep_sha256_fingerprint(sdp: str) -> str:
    """Drop every ``a=fingerprint`` line whose hash is not sha-256.

    aiortc writes sha-256, sha-384 and sha-512; WhatsApp refuses the extra lines.
    """
    out = []
    for line in _lines(sdp):
        if _is_fingerprint(line):
            algo = line.split(":", 1)[1].split(" ", 1)[0].strip().lower()
            if algo != FINGERPRINT_ALGORITHM:
                continue
        out.append(line)
    return _join(out)


def add_ptime(sdp: str, ptime: int = PTIME_MS) -> str:
    """Add ``a=ptime`` to audio sections that lack it (WhatsApp expects 20 ms)."""
    out: list[str] = []
    in_audio = has_ptime = False

    def close_section() -> None:
        if in_audio and not has_ptime:
            out.append(f"a=ptime:{ptime}")

    for line in _lines(sdp):
        if line.startswith("m="):
            close_section()
            in_audio, has_ptime = line.startswith("m=audio"), False
        elif line.startswith("a=ptime:"):
            has_ptime = True
        out.append(line)
    close_section()
    return _join(out)


def mark_ice_lite(sdp: str) -> str:
    """Declare the SDP's owner an ICE-lite agent (session-level ``a=ice-lite``),
    as WhatsApp's relay does. Used by the sandbox's simulated phones."""
    lines = _lines(sdp)
    if any(line == "a=ice-lite" for line in lines):
        return _join(lines)
    first_media = next((i for i, line in enumerate(lines) if line.startswith("m=")), len(lines))
    # Session attributes come after t=; insert right before the first m= line.
    lines.insert(first_media, "a=ice-lite")
    return _join(lines)


def _ip_version(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None  # an mDNS name or garbage: not ours to rewrite


def _candidate_fields(line: str) -> list[str] | None:
    """The fields of an ``a=candidate:`` line (``[foundation, component, transport,
    priority, address, port, "typ", type, ...]``), or ``None`` for another line."""
    if not line.startswith("a=candidate:"):
        return None
    fields = line[len("a=candidate:") :].split()
    if len(fields) < 8 or fields[6] != "typ" or not fields[5].isdigit():
        return None
    return fields


def host_candidates(sdp: str) -> list[tuple[str, int]]:
    """``(address, port)`` of every ``typ host`` candidate, in SDP order."""
    out = []
    for line in _lines(sdp):
        fields = _candidate_fields(line)
        if fields and fields[7] == "host":
            out.append((fields[4], int(fields[5])))
    return out


def advertise_address(sdp: str, address: str) -> str:
    """Put ``address`` (an IP) in place of the bound address of our host candidates, as
    seen from outside a 1:1 NAT: same port, ``typ host``.

    Only host candidates of the same IP version are rewritten (an IPv4 address leaves
    IPv6 candidates alone and vice versa), as are ``c=`` lines that named one of the
    rewritten addresses (the default candidate). Server-reflexive and relay candidates,
    ports and everything else are untouched. Raises ``ValueError`` if ``address`` is
    not an IP address.
    """
    version = ipaddress.ip_address(address).version
    net_type = f"IP{version}"
    lines = _lines(sdp)
    replaced: set[str] = set()
    out: list[str] = []
    for line in lines:
        fields = _candidate_fields(line)
        if fields and fields[7] == "host" and _ip_version(fields[4]) == version:
            replaced.add(fields[4])
            fields[4] = address
            line = "a=candidate:" + " ".join(fields)
        out.append(line)
    for i, line in enumerate(out):
        if line.startswith("c="):
            parts = line[2:].split()
            if len(parts) == 3 and parts[0] == "IN" and parts[2] in replaced:
                out[i] = f"c=IN {net_type} {address}"
    return _join(out)


def for_whatsapp(sdp: str) -> str:
    """Shape an SDP produced by aiortc (with gathering complete) the way WhatsApp wants."""
    return add_ptime(keep_sha256_fingerprint(sdp))


#: Payload type of telephone-event/8000 in Meta's samples, and the one we offer.
TELEPHONE_EVENT_PT = 126


def telephone_event_pt(sdp: str) -> int | None:
    """The payload type of ``telephone-event/8000`` (RFC 4733 DTMF) on the audio
    m-line of ``sdp``, or ``None`` when it is not negotiated there. Raises
    :class:`SdpError` if the SDP cannot be parsed."""
    audio = parse(sdp).audio
    if audio is None:
        return None
    for pt in audio.formats:
        codec = audio.codecs.get(pt)
        if codec and codec.name.lower() == "telephone-event" and codec.clock_rate == DTMF_CLOCK_RATE:
            return pt
    return None


def add_telephone_event(sdp: str, pt: int = TELEPHONE_EVENT_PT) -> str:
    """Offer RFC 4733 DTMF: add ``telephone-event/8000`` to the audio m-line.

    The payload type is appended after the existing formats (Opus stays first), with
    ``a=rtpmap:<pt> telephone-event/8000`` and ``a=fmtp:<pt> 0-15`` written after the
    section's last ``a=rtpmap``/``a=fmtp``/``a=rtcp-fb`` line. ``pt`` is used unless the
    section already uses it, in which case the highest free dynamic type (127…96) is
    taken. An SDP whose audio already carries telephone-event/8000, or that has no
    audio section, is returned unchanged (line ends normalised to CRLF).
    """
    lines = _lines(sdp)
    start = next((i for i, line in enumerate(lines) if line.startswith("m=audio ")), None)
    if start is None:
        return _join(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    fields = lines[start].split()
    used = {int(f) for f in fields[3:] if f.isdigit()}
    for line in lines[start + 1 : end]:
        if not line.startswith("a=rtpmap:"):
            continue
        match = _RTPMAP.match(line[len("a=rtpmap:") :].strip())
        if match:
            used.add(int(match.group(1)))
            if match.group(2).lower() == "telephone-event" and int(match.group(3)) == DTMF_CLOCK_RATE:
                return _join(lines)
    if pt in used:
        pt = next((p for p in range(127, 95, -1) if p not in used), -1)
        if pt < 0:
            raise SdpError("no free dynamic payload type for telephone-event")
    codec_lines = [
        i for i in range(start + 1, end) if lines[i].startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))
    ]
    insert_at = codec_lines[-1] + 1 if codec_lines else end
    lines[insert_at:insert_at] = [f"a=rtpmap:{pt} telephone-event/{DTMF_CLOCK_RATE}", f"a=fmtp:{pt} 0-15"]
    lines[start] = " ".join(fields + [str(pt)])
    return _join(lines)


def whatsapp_problems(
    sdp: str,
    *,
    role: str,
    allowed_codecs: tuple[str, ...] = ("opus",),
    require_candidates: bool = True,
) -> list[str]:
    """Everything in ``sdp`` that WhatsApp's relay would refuse, as readable sentences.

    ``role`` is ``"offer"`` (a business-initiated call's offer: ``a=setup:actpass``) or
    ``"answer"`` (an inbound call's answer: ``a=setup:active``). An empty list means the
    SDP is acceptable.
    """
    try:
        summary = parse(sdp)
    except SdpError as exc:
        return exc.problems
    problems: list[str] = []
    audio_sections = [m for m in summary.media if m.kind == "audio"]
    others = [m.kind for m in summary.media if m.kind != "audio"]
    if not audio_sections:
        return ["no audio m= section"]
    if len(audio_sections) > 1:
        problems.append(f"{len(audio_sections)} audio sections; exactly one is allowed")
    if others:
        problems.append(f"only audio is allowed, found {', '.join(others)}")
    audio = audio_sections[0]
    names = audio.codec_names()
    audio_codecs = [n for n in names if n != "telephone-event"]
    if "opus" not in audio_codecs:
        problems.append("Opus is missing from the audio codecs")
    unsupported = sorted({n for n in audio_codecs if n not in allowed_codecs})
    if unsupported:
        problems.append(f"unsupported audio codecs: {', '.join(unsupported)}")
    for pt in audio.formats:
        codec = audio.codecs.get(pt)
        if codec is None:
            if pt >= 96:
                problems.append(f"dynamic payload type {pt} has no rtpmap")
            continue
        name = codec.name.lower()
        if name == "opus" and codec.clock_rate != 48000:
            problems.append(f"Opus must be 48000 Hz, found {codec.clock_rate}")
        if name == "telephone-event" and codec.clock_rate != DTMF_CLOCK_RATE:
            problems.append(f"telephone-event must be 8000 Hz, found {codec.clock_rate}")
    if audio.ptime is not None and audio.ptime != PTIME_MS:
        problems.append(f"ptime must be {PTIME_MS} ms, found {audio.ptime}")
    fingerprints = summary.all_fingerprints()
    if not fingerprints:
        problems.append("no a=fingerprint")
    else:
        bad = sorted({algo for algo, _ in fingerprints if algo != FINGERPRINT_ALGORITHM})
        if bad:
            problems.append(f"only a sha-256 fingerprint is accepted, found {', '.join(bad)}")
        elif len(fingerprints) > 1:
            problems.append(f"exactly one fingerprint is accepted, found {len(fingerprints)}")
    if require_candidates and not audio.candidates:
        problems.append("no ICE candidates in the SDP (WhatsApp has no trickle channel)")
    if not (audio.ice_ufrag or summary.ice_ufrag) or not (audio.ice_pwd or summary.ice_pwd):
        problems.append("missing a=ice-ufrag or a=ice-pwd")
    setup = summary.setup_role()
    wanted = {"offer": ("actpass",), "answer": ("active", "passive")}[role]
    if setup not in wanted:
        problems.append(f"a=setup must be {' or '.join(wanted)} in an {role}, found {setup}")
    if len(audio.ssrcs) > 1:
        problems.append(f"one SSRC is allowed for audio, found {len(audio.ssrcs)}")
    if audio.direction == "inactive":
        problems.append("audio is inactive")
    return problems
