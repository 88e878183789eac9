"""Opus encoding for the outbound track, prompts and Ogg recordings (libopus).

aiortc encodes every outgoing frame itself: stereo at 96 kbit/s, through an
``av.AudioResampler`` and a thread-pool hop per frame. Here the outbound track encodes
on the event loop instead (one mono encoder per call, configured by
:class:`OpusSettings`, calling libopus directly) and hands on finished packets, which
the RTP path only packs. Pre-encoded prompts take the same route without any encoding.

Every packet carries ``pts`` in 1/48000 s units, which aiortc turns into the RTP
timestamp (``timestamp_origin + pts``); the track numbers packets by frame index, so
encoded PCM and pre-encoded prompt packets form one continuous timeline.
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass

import av
import numpy as np

from . import libopus
from .frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE

__all__ = ["DEFAULT_SETTINGS", "PROMPT_SETTINGS", "OpusSettings", "OpusEncoder", "encode_pcm", "silence_packet", "TIME_BASE"]

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: libopus' encoder lookahead at 48 kHz (the Ogg "pre-skip" of what it encodes);
#: ``lowdelay`` has 120 (see :attr:`OpusEncoder.delay`).
ENCODER_DELAY = 312


@dataclass(frozen=True, slots=True)
class OpusSettings:
    """How the gateway encodes Opus (mono, 48 kHz, 20 ms packets).

    ``bitrate`` in bit/s. ``complexity`` 0..10. ``application``: ``audio`` (CELT at
    these rates: full band, cheapest), ``voip`` (SILK/hybrid speech modes; in-band FEC
    possible) or ``lowdelay`` (CELT only, 2.5 ms less lookahead).

    The default, ``audio`` at complexity 5 and 32 kbit/s, costs about 60 µs of CPU per
    20 ms frame, against ~110 µs for ``voip`` at 10 (libopus' own default) and ~165 µs
    for aiortc's stereo 96 kbit/s encode (``bench/media_cost.py``). Prompts are
    pre-encoded once, so the prompt cache uses complexity 10 (:data:`PROMPT_SETTINGS`).

    ``fec_loss``: the packet loss (percent) to protect against with in-band FEC, 0 for
    none. Only the SILK and hybrid modes carry FEC, so only ``voip`` uses it: each
    packet then also holds a coarse copy of the one before, which a receiver that lost
    that one decodes instead of concealing (WhatsApp's offer says ``useinbandfec=1``).
    """

    bitrate: int = 32_000
    complexity: int = 5
    application: str = "audio"
    fec_loss: int = 0

    def __post_init__(self) -> None:
        if not 6_000 <= self.bitrate <= 510_000:
            raise ValueError(f"bitrate must be 6000..510000 bit/s, got {self.bitrate}")
        if not 0 <= self.complexity <= 10:
            raise ValueError(f"complexity must be 0..10, got {self.complexity}")
        if self.application not in ("voip", "audio", "lowdelay"):
            raise ValueError(f"application must be voip, audio or lowdelay, got {self.application!r}")
        if not 0 <= self.fec_loss <= 100:
            raise ValueError(f"fec_loss must be 0..100 %, got {self.fec_loss}")


DEFAULT_SETTINGS = OpusSettings()
#: For one-off encodes (prompts): the best quality at the same bitrate.
PROMPT_SETTINGS = OpusSettings(complexity=10)


class OpusEncoder:
    """A mono 48 kHz libopus encoder taking 20 ms int16 frames, one packet per frame.

    libopus is called directly (:class:`media.libopus.Encoder`: ~68 µs per frame here
    against ~107 µs through PyAV, which also runs every frame through a filter graph
    that cuts frames to the encoder's size) where it can be bound, else through PyAV
    (``pyav=True`` chooses it). Either way the input is copied into a buffer allocated
    once; the steady state allocates only the packet.
    """

    def __init__(self, settings: OpusSettings = DEFAULT_SETTINGS, *, pyav: bool = False) -> None:
        self.settings = settings
        self.frames = 0
        #: Samples of lookahead: decoded audio lags the input by this much.
        self.delay = 120 if settings.application == "lowdelay" else ENCODER_DELAY
        self._direct = None
        if libopus.available() and not pyav:
            try:
                self._direct = libopus.Encoder(SAMPLE_RATE, 1, application=settings.application,
                                               bitrate=settings.bitrate, complexity=settings.complexity,
                                               fec_loss=settings.fec_loss)
            except libopus.OpusError:  # (its settings did not take: PyAV encodes)
                self._direct = None
            else:
                self.delay = self._direct.delay
                return
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = settings.bitrate
        ctx.time_base = TIME_BASE
        options = {
            "application": settings.application,
            "compression_level": str(settings.complexity),
            "frame_duration": "20",
        }
        if settings.fec_loss:
            options.update(fec="1", packet_loss=str(settings.fec_loss))
        ctx.options = options
        ctx.thread_count = 1
        ctx.open()
        self._ctx = ctx
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = TIME_BASE
        self._frame = frame
        self._input = np.frombuffer(frame.planes[0], dtype=PCM_DTYPE, count=FRAME_SAMPLES)
        self._pts = 0

    def encode(self, pcm: np.ndarray) -> bytes | av.Packet | None:
        """Encode one 20 ms mono frame (960 int16 samples); returns its packet (``bytes``
        from libopus directly; an ``av.Packet`` through PyAV, whose ``pts`` is libopus'
        shifted by the encoder delay: callers that send it set their own)."""
        self.frames += 1
        direct = self._direct
        if direct is not None:
            return direct.encode(pcm)
        self._input[:] = pcm
        self._frame.pts = self._pts
        self._pts += FRAME_SAMPLES
        packets = self._ctx.encode(self._frame)
        return packets[0] if packets else None

    def flush(self) -> list[bytes | av.Packet]:
        """The packets still inside the encoder (its lookahead) at the end of a stream."""
        if self._direct is not None:
            return [self._direct.encode(np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE))]
        return list(self._ctx.encode(None))


def encode_pcm(pcm: np.ndarray, settings: OpusSettings = DEFAULT_SETTINGS) -> list[bytes]:
    """Encode mono 48 kHz int16 PCM (a whole number of 20 ms frames) to Opus packets.

    Returns one packet per frame *plus* the packet flushed out of the encoder's
    lookahead, so decoding every packet and dropping :data:`ENCODER_DELAY` samples at
    the start gives back all of ``pcm``.
    """
    if pcm.size % FRAME_SAMPLES:
        raise ValueError(f"{pcm.size} samples are not whole 20 ms frames")
    encoder = OpusEncoder(settings)
    out: list[bytes] = []
    for start in range(0, pcm.size, FRAME_SAMPLES):
        packet = encoder.encode(pcm[start : start + FRAME_SAMPLES])
        if packet is not None:
            out.append(bytes(packet))
    out.extend(bytes(p) for p in encoder.flush())
    return out


_SILENCE: dict[OpusSettings, bytes] = {}


def silence_packet(settings: OpusSettings = DEFAULT_SETTINGS) -> bytes:
    """A 20 ms Opus packet of digital silence (a few bytes), encoded once and cached.

    Used to fill timestamp gaps (lost packets, DTX) in pass-through Ogg recordings.
    """
    packet = _SILENCE.get(settings)
    if packet is None:
        encoder = OpusEncoder(settings)
        zeros = np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE)
        # The first packets still carry the encoder's start-up; a steady one is smaller.
        for _ in range(3):
            encoded = encoder.encode(zeros)
        packet = _SILENCE[settings] = bytes(encoded)
    return packet
