"""The media boundary: what the gateway asks of one call's media, and what it hears back.

A :class:`MediaSession` is one party's media on a call (today: the WhatsApp user's,
over WebRTC). The gateway drives it with commands — negotiate (:meth:`offer`,
:meth:`answer`, :meth:`apply_answer`, :meth:`wait_up`), :meth:`play`, :meth:`record`,
:meth:`send_dtmf`, :meth:`start_bridge`, :meth:`stats`, :meth:`close` — and hears back
plain-data events through :meth:`subscribe`: :class:`MediaEnded`, :class:`Dtmf`,
:class:`Speech`, :class:`RecordingFailed`. Nothing outside :mod:`media` needs to hold a
peer, a track or an RTP tap: :class:`LocalMediaSession` keeps the
:class:`~media.peer.MediaPeer` in-process; :class:`media.pool.WorkerMediaSession` sends the
same commands to a media worker process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .dtmf import DtmfError
from .frames import Sink, Source
from .mix import Playback
from .peer import MediaPeer, PeerConfig, ReceiveStats
from .rtp.party import RtpParty
from .sinkset import SinkFault

__all__ = [
    "DtmfError", "Dtmf", "LocalMediaSession", "MediaEnded", "MediaEvent", "MediaSession", "RECORDING_FORMATS", "RecordSpec",
    "RecordingFailed", "Speech",
]

log = logging.getLogger(__name__)


# -- events (plain data) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaEnded:
    """The transport failed or closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str
    duration_ms: int
    source: str  # "rfc4733" or "inband"


@dataclass(frozen=True, slots=True)
class Speech:
    kind: str  # "start" or "stop"
    at_s: float
    level_dbfs: float


@dataclass(frozen=True, slots=True)
class RecordingFailed:
    """A recording (the QA recorder or a file sink) stopped early; audio goes on."""

    code: str
    reason: str


MediaEvent = MediaEnded | Dtmf | Speech | RecordingFailed


# -- commands ------------------------------------------------------------------------------


#: The recording formats (``WACALL_RECORDING_FORMAT``) and the files each makes, as
#: :class:`media.sinks.recorder.CallRecorder` keyword arguments: ``wav`` decodes the
#: user's audio for user.wav and stereo.wav (and keeps user.ogg as received); ``opus``
#: is stereo.ogg alone, both legs as they went over the wire, nothing decoded; ``both``
#: is all four.
RECORDING_FORMATS: dict[str, dict[str, bool]] = {
    "wav": {"wav": True, "stereo": True, "ogg": True, "stereo_ogg": False},
    "opus": {"wav": False, "stereo": False, "ogg": False, "stereo_ogg": True},
    "both": {"wav": True, "stereo": True, "ogg": True, "stereo_ogg": True},
}


@dataclass(frozen=True, slots=True)
class RecordSpec:
    """Record the call in ``directory``: the files of ``format`` (``wav``: user.wav,
    stereo.wav, user.ogg; ``opus``: stereo.ogg; ``both``; see
    :data:`RECORDING_FORMATS`) and the sidecar."""

    directory: str
    call_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "wav"


@runtime_checkable
class MediaSession(Protocol):
    received: ReceiveStats
    #: Resolves with a reason when the transport fails or closes.
    ended: asyncio.Future
    closed: bool

    async def offer(self) -> str: ...

    async def answer(self, offer: str) -> str: ...

    async def apply_answer(self, answer: str) -> None: ...

    async def wait_up(self, timeout: float | None = None) -> None: ...

    def play(self, source: Source) -> Playback: ...

    def record(self, spec: RecordSpec) -> dict[str, Path]: ...

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None: ...

    def subscribe(self, callback: Callable[[MediaEvent], None]) -> None: ...

    async def start_bridge(self, bridge, **kwargs: Any) -> Any: ...

    async def open_rtp(self, **options: Any) -> Any:
        """A plain-RTP party (a SIP leg's audio) with its port bound, not yet joined:
        :class:`media.rtp.party.RtpParty`'s commands."""
        ...

    def stats(self) -> dict: ...

    async def get_stats(self) -> dict: ...

    async def close(self, *, recording_meta: dict | None = None, media_stats: dict | None = None) -> None: ...


class LocalMediaSession:
    """A :class:`MediaSession` around an in-process :class:`~media.peer.MediaPeer`.

    Args:
        config: the peer's settings.
        label: for logs (no phone numbers in the clear).
        sinks: file or tap sinks that get the far side's audio from the start.
        speech: emit :class:`Speech` events (energy-based detector on the far side's audio).
    """

    def __init__(self, config: PeerConfig, *, label: str = "call", sinks: tuple[Sink, ...] = (),
                 speech: bool = False) -> None:
        self.peer = MediaPeer(config, label=label)
        #: The call this media belongs to (for log lines), set by the gateway.
        self.call_id: str | None = None
        self.received = self.peer.received
        self._callbacks: list[Callable[[MediaEvent], None]] = []
        self.recorder = None  # media.sinks.recorder.CallRecorder once record() ran
        for sink in sinks:
            self.peer.add_sink(sink)
        self.peer.on_dtmf(lambda e: self._emit(Dtmf(e.digit, e.duration_ms, e.source)))
        self.peer.on_sink_fault(self._on_sink_fault)
        if speech:
            from .sinks.meter import SpeechDetector

            self.peer.add_sink(SpeechDetector(
                on_event=lambda e: self._emit(Speech(e.kind, e.at_s, e.level_dbfs))))
        self.peer.ended.add_done_callback(self._on_ended)

    # -- events --------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[MediaEvent], None]) -> None:
        self._callbacks.append(callback)

    def _emit(self, event: MediaEvent) -> None:
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a subscriber never breaks the media
                log.exception("%s: media event handler failed", self.peer.label)

    def _on_ended(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            self._emit(MediaEnded(future.result()))

    def _on_sink_fault(self, fault: SinkFault) -> None:
        if self.recorder is not None and self.recorder.owns(fault.sink):
            return  # the recorder reports for itself
        if getattr(fault.sink, "path", None) is not None:  # a file recording passed in
            self._emit(RecordingFailed(fault.code, fault.reason))

    # -- negotiation ---------------------------------------------------------------------

    async def offer(self) -> str:
        return await self.peer.create_offer()

    async def answer(self, offer: str) -> str:
        return await self.peer.accept_offer(offer)

    async def apply_answer(self, answer: str) -> None:
        await self.peer.apply_answer(answer)

    async def wait_up(self, timeout: float | None = None) -> None:
        await self.peer.media_up(timeout)

    @property
    def ended(self) -> asyncio.Future:
        """Resolves with a reason when the transport fails or closes."""
        return self.peer.ended

    @property
    def closed(self) -> bool:
        return self.peer.closed

    # -- commands ------------------------------------------------------------------------

    def play(self, source: Source) -> Playback:
        return self.peer.play(source)

    def record(self, spec: RecordSpec) -> dict[str, Path]:
        """Start the QA recording; returns its files by kind. Files are 0600 in a 0700
        directory and stay playable if the process is killed."""
        from .sinks.recorder import CallRecorder

        recorder = CallRecorder(Path(spec.directory), call_id=spec.call_id, meta=dict(spec.meta),
                                **RECORDING_FORMATS[spec.format])
        recorder.on_error = lambda error: self._emit(RecordingFailed(error["code"], error["reason"]))
        recorder.attach(self.peer)
        self.recorder = recorder
        return dict(recorder.paths)

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """RFC 4733 digits on the audio stream; :class:`DtmfError` when the far side did
        not negotiate telephone-event or the media ended, ``ValueError`` for bad input."""
        await self.peer.send_dtmf(digits, duration_ms, gap_ms)

    async def start_bridge(self, bridge, **kwargs: Any):
        """Connect a voice-bot bridge (:mod:`media.bridges`) to this call's audio;
        returns the handle to follow it by (here: the bridge itself)."""
        await bridge.start(self.peer, **kwargs)
        return bridge

    async def open_rtp(self, **options: Any) -> RtpParty:
        """A plain-RTP party on this call (see :mod:`media.rtp.party`)."""
        return await RtpParty.open(self.peer, **options)

    def stats(self) -> dict:
        return self.peer.stats()

    async def get_stats(self) -> dict:
        return await self.peer.get_stats()

    async def reset_pacing(self) -> None:
        """Count the sends' pacing (``stats()["pacing"]``) from now on (a measurement window)."""
        track = self.peer.outbound
        track.settle()  # (frames a lean sender sent ahead belong to the window before)
        track.stats = type(track.stats)()

    async def close(self, *, recording_meta: dict | None = None, media_stats: dict | None = None) -> None:
        """Stop the media, finish the recording (with ``media_stats`` and
        ``recording_meta`` in its sidecar) and let go of every media object."""
        await self.peer.close()
        recorder = self.recorder
        if recorder is not None:
            recorder.meta.update(recording_meta or {})
            recorder.close(media_stats=media_stats)
        self.recorder = None
        self._callbacks = []
