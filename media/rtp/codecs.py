"""Plain-RTP audio codecs for SIP legs: the table, and one encoder/decoder pair per codec.

Every codec hides behind the same two small classes, working on the gateway's native
audio (20 ms frames of 48 kHz mono int16, :mod:`media.frames`):

* :class:`Encoder` — ``encode(pcm48) -> bytes``: one 20 ms frame → one RTP payload;
* :class:`Decoder` — ``decode(payload) -> pcm48`` (any whole number of 20/10 ms, as the
  far side packs it) and ``conceal() -> pcm48`` (20 ms for a lost packet).

=========  ==  =========  ==========  ================================================
codec      PT  RTP clock  audio rate  implementation
=========  ==  =========  ==========  ================================================
PCMU        0      8000        8000  numpy tables (:mod:`media.g711`) + 48k⇄8k FIR
PCMA        8      8000        8000  numpy tables (:mod:`media.g711`) + 48k⇄8k FIR
G722        9      8000       16000  PyAV/FFmpeg ``g722`` (64 kbit/s) + 48k⇄16k FIR
opus       dyn    48000       48000  libopus (:mod:`media.libopus`), 2 channels in
                                     SDP (RFC 7587), mono on the wire
=========  ==  =========  ==========  ================================================

G.722's RTP clock is 8000 although it carries 16 kHz audio (RFC 3551 §4.5.2): a 20 ms
packet is 160 bytes and advances the timestamp by 160. G.722 is backward-adaptive ADPCM
(every sample's quantiser depends on the previous one), so numpy cannot vectorise it: a
pure Python/numpy coder runs a per-sample loop of ~50 operations per sub-band (1-2 ms
per frame); FFmpeg's C coder costs ~45 µs to encode and ~20 µs to decode a frame
(``bench/rtp_codecs.py``).

Opus is there for pass-through: when the SIP side negotiates Opus at 20 ms, WhatsApp's
payloads go out as they came and the SIP side's payloads are played without re-encoding
(see :mod:`media.rtp.bridge`); the encoder/decoder here serve everything else.

``telephone-event`` (RFC 4733) is in the table too (:data:`TELEPHONE_EVENT`, dynamic PT,
8000 Hz, or 48000 Hz when it rides along Opus); it has no encoder or decoder: events
are built and read by :mod:`media.rtp.endpoint` with :mod:`media.dtmf`.
"""

from __future__ import annotations

import abc
import fractions
from dataclasses import dataclass, replace

import av
import numpy as np

from .. import g711
from ..bridges.resample import Decimator, Interpolator
from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from ..jitterbuffer import opus_samples
from ..opus import DEFAULT_SETTINGS, OpusEncoder, OpusSettings

__all__ = [
    "AUDIO_CODECS",
    "CODECS",
    "G722",
    "OPUS",
    "PCMA",
    "PCMU",
    "TELEPHONE_EVENT",
    "Decoder",
    "Encoder",
    "RtpCodec",
    "codec_by_name",
    "make_decoder",
    "make_encoder",
]


@dataclass(frozen=True, slots=True)
class RtpCodec:
    """One RTP payload format.

    Attributes:
        name: the SDP encoding name (``a=rtpmap``), as we write it.
        payload_type: static PT (0, 8, 9) or the dynamic one we offer by default (set to
            the negotiated one with :meth:`with_pt`).
        clock_rate: the RTP timestamp clock (what SDP's rtpmap says).
        channels: SDP channel count (Opus: 2, per RFC 7587; audio is mono anyway).
        sample_rate: the rate of the audio inside the payload.
        static: whether the payload type is static (RFC 3551).
        fmtp: the ``a=fmtp`` parameters we offer, or ``None``.
    """

    name: str
    payload_type: int
    clock_rate: int
    channels: int = 1
    sample_rate: int = 8000
    static: bool = False
    fmtp: str | None = None

    @property
    def key(self) -> str:
        """Lower-case name, for lookups (SDP encoding names are case-insensitive)."""
        return self.name.lower()

    @property
    def ticks_per_frame(self) -> int:
        """RTP timestamp advance of one 20 ms packet."""
        return self.clock_rate // 50

    def with_pt(self, payload_type: int) -> RtpCodec:
        return self if payload_type == self.payload_type else replace(self, payload_type=payload_type)

    @property
    def rtpmap(self) -> str:
        return f"{self.name}/{self.clock_rate}" + (f"/{self.channels}" if self.channels != 1 else "")


PCMU = RtpCodec("PCMU", 0, 8000, sample_rate=8000, static=True)
PCMA = RtpCodec("PCMA", 8, 8000, sample_rate=8000, static=True)
G722 = RtpCodec("G722", 9, 8000, sample_rate=16000, static=True)
OPUS = RtpCodec("opus", 111, 48000, channels=2, sample_rate=48000, fmtp="minptime=20;useinbandfec=0")
TELEPHONE_EVENT = RtpCodec("telephone-event", 101, 8000, sample_rate=8000, fmtp="0-15")

#: Audio codecs by lower-case name.
AUDIO_CODECS: dict[str, RtpCodec] = {c.key: c for c in (PCMU, PCMA, G722, OPUS)}
#: Everything in the table, by lower-case name.
CODECS: dict[str, RtpCodec] = {**AUDIO_CODECS, TELEPHONE_EVENT.key: TELEPHONE_EVENT}


def codec_by_name(name: str) -> RtpCodec:
    """The table entry for ``name`` (case-insensitive). ``ValueError`` if unknown."""
    try:
        return AUDIO_CODECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown RTP audio codec {name!r} (known: {', '.join(c.name for c in AUDIO_CODECS.values())})") from None


# -- interface -------------------------------------------------------------------------


class Encoder(abc.ABC):
    """One 20 ms frame of 48 kHz mono int16 in, one RTP payload out."""

    codec: RtpCodec

    @abc.abstractmethod
    def encode(self, pcm48: np.ndarray) -> bytes: ...

    def silence(self) -> bytes:
        """The payload of a silent frame (cached where the codec allows)."""
        return self.encode(np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE))


class Decoder(abc.ABC):
    """RTP payloads in, 48 kHz mono int16 out."""

    codec: RtpCodec

    @abc.abstractmethod
    def decode(self, payload: bytes) -> np.ndarray:
        """The audio of one payload (empty array when it cannot be decoded)."""

    @abc.abstractmethod
    def conceal(self) -> np.ndarray:
        """20 ms standing in for a lost packet."""

    def samples(self, payload: bytes) -> int:
        """RTP clock ticks (= timestamp advance) the payload covers."""
        return len(payload)


# -- G.711 -----------------------------------------------------------------------------


class _G711Encoder(Encoder):
    def __init__(self, codec: RtpCodec, table: np.ndarray) -> None:
        self.codec = codec
        self._table = table
        self._dec = Decimator(SAMPLE_RATE // 8000)
        self._silence = bytes([table[0]]) * 160

    def encode(self, pcm48: np.ndarray) -> bytes:
        return self._table[self._dec.process(pcm48).view(np.uint16)].tobytes()

    def silence(self) -> bytes:
        return self._silence


class _G711Decoder(Decoder):
    def __init__(self, codec: RtpCodec, table: np.ndarray) -> None:
        self.codec = codec
        self._table = table
        self._interp = Interpolator(SAMPLE_RATE // 8000)
        self._zeros = np.zeros(160, dtype=PCM_DTYPE)

    def decode(self, payload: bytes) -> np.ndarray:
        return self._interp.process(self._table[np.frombuffer(payload, dtype=np.uint8)])

    def conceal(self) -> np.ndarray:
        return self._interp.process(self._zeros)


# -- G.722 -----------------------------------------------------------------------------

_G722_FRAME = 320  # 20 ms at 16 kHz
_G722_TIME_BASE = fractions.Fraction(1, 16000)


class _G722Encoder(Encoder):
    codec = G722

    def __init__(self) -> None:
        ctx = av.CodecContext.create("g722", "w")
        ctx.sample_rate = 16000
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.time_base = _G722_TIME_BASE
        ctx.open()
        self._ctx = ctx
        frame = av.AudioFrame(format="s16", layout="mono", samples=_G722_FRAME)
        frame.sample_rate = 16000
        frame.time_base = _G722_TIME_BASE
        self._frame = frame
        self._input = np.frombuffer(frame.planes[0], dtype=PCM_DTYPE, count=_G722_FRAME)
        self._dec = Decimator(SAMPLE_RATE // 16000)
        self._pts = 0

    def encode(self, pcm48: np.ndarray) -> bytes:
        self._input[:] = self._dec.process(pcm48)
        self._frame.pts = self._pts
        self._pts += _G722_FRAME
        packets = self._ctx.encode(self._frame)
        return bytes(packets[0]) if packets else b""


class _G722Decoder(Decoder):
    codec = G722

    def __init__(self) -> None:
        ctx = av.CodecContext.create("g722", "r")
        ctx.sample_rate = 16000
        ctx.layout = "mono"
        self._ctx = ctx
        self._interp = Interpolator(SAMPLE_RATE // 16000)
        self._zeros = np.zeros(_G722_FRAME, dtype=PCM_DTYPE)
        self.errors = 0

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            frames = self._ctx.decode(av.Packet(payload))
        except (av.FFmpegError, ValueError):
            self.errors += 1
            return self._zeros[:0]
        if not frames:
            return self._zeros[:0]
        pcm = np.concatenate([np.frombuffer(f.planes[0], dtype=PCM_DTYPE, count=f.samples) for f in frames]) \
            if len(frames) > 1 else np.frombuffer(frames[0].planes[0], dtype=PCM_DTYPE, count=frames[0].samples)
        return self._interp.process(pcm)

    def conceal(self) -> np.ndarray:
        return self._interp.process(self._zeros)


# -- Opus ------------------------------------------------------------------------------


class _OpusEncoder(Encoder):
    def __init__(self, codec: RtpCodec, settings: OpusSettings = DEFAULT_SETTINGS) -> None:
        self.codec = codec
        self._encoder = OpusEncoder(settings)
        self._silence: bytes | None = None

    def encode(self, pcm48: np.ndarray) -> bytes:
        packet = self._encoder.encode(pcm48)
        return bytes(packet) if packet is not None else b""

    def silence(self) -> bytes:
        if self._silence is None:
            from ..opus import silence_packet

            self._silence = silence_packet(self._encoder.settings)
        return self._silence


class _OpusDecoder(Decoder):
    def __init__(self, codec: RtpCodec) -> None:
        from ..receiver import OpusDecoder

        self.codec = codec
        self._decoder = OpusDecoder()
        self._empty = np.zeros(0, dtype=PCM_DTYPE)

    def decode(self, payload: bytes) -> np.ndarray:
        pcm = self._decoder.decode(payload)
        return self._empty if pcm is None else pcm

    def conceal(self) -> np.ndarray:
        return self._decoder.conceal()

    def samples(self, payload: bytes) -> int:
        return opus_samples(payload, FRAME_SAMPLES)


# -- factories -------------------------------------------------------------------------


def make_encoder(codec: RtpCodec, *, opus: OpusSettings = DEFAULT_SETTINGS) -> Encoder:
    """A new encoder for ``codec`` (state per call: resampler history, ADPCM state)."""
    key = codec.key
    if key == "pcmu":
        return _G711Encoder(codec, g711.ULAW_ENCODE)
    if key == "pcma":
        return _G711Encoder(codec, g711.ALAW_ENCODE)
    if key == "g722":
        return _G722Encoder()
    if key == "opus":
        return _OpusEncoder(codec, opus)
    raise ValueError(f"no encoder for {codec.name}")


def make_decoder(codec: RtpCodec) -> Decoder:
    """A new decoder for ``codec``."""
    key = codec.key
    if key == "pcmu":
        return _G711Decoder(codec, g711.ULAW_DECODE)
    if key == "pcma":
        return _G711Decoder(codec, g711.ALAW_DECODE)
    if key == "g722":
        return _G722Decoder()
    if key == "opus":
        return _OpusDecoder(codec)
    raise ValueError(f"no decoder for {codec.name}")
