"""Per-call QA recordings: what the user said, both legs aligned, Ogg/Opus, a JSON sidecar.

One :class:`CallRecorder` per call, one directory per call (mode 0700, files 0600)::

    recorder = CallRecorder(recordings_dir / call_id, call_id=call_id)
    recorder.attach(peer)            # before media flows; taps both directions
    ...
    stats = await peer.get_stats()
    await peer.close()               # the recorder finalises its files here already
    recorder.close(media_stats=stats)  # adds the stats to the sidecar

Files (each optional):

* ``user.wav`` — the user's audio as decoded, mono 48 kHz, frames end to end.
* ``stereo.wav`` — left = user, right = business, both placed at the wall-clock time
  they were received / sent (:mod:`media.sinks.stereo`), so gaps stay where they were.
* ``user.ogg`` — the user's Opus packets exactly as received (pass-through, no
  decoding or re-encoding; timestamp gaps filled with silence packets), or, when no RTP
  tap is available, the decoded audio encoded again.
* ``stereo.ogg`` (``stereo_ogg=True``) — both legs as Opus, left = user as received,
  right = business as sent, aligned like stereo.wav in 20 ms slots
  (:mod:`media.sinks.stereo_opus`): nothing decoded or encoded, ~0.5 MB a minute.
  Alone, it is the cheapest full QA recording: the user's audio is not even decoded.
* ``recording.json`` — the sidecar: call id, start/end time (ISO 8601, UTC), durations
  and levels (RMS dBFS, peak) per leg (``null`` for the user when not all of their audio was
  decoded, as with stereo.ogg alone), the media stats passed to :meth:`close`, and
  ``complete`` (``false`` until the recorder closed; :func:`repair_directory` marks
  crashed recordings ``"recovered": true``).

Crash safety: the user's audio reaches user.wav and user.ogg every 100 ms (:data:`FLUSH_S`),
Ogg pages whole, user.wav's header updated every second (:data:`HEADER_S`: valid as it
stands, up to a second behind its data); a SIGKILL loses at most the last 100 ms there
once :func:`repair_directory` re-derived the header (stereo.wav: its 0.75 s alignment
window, its header updated with every commit). Run :func:`repair_directory` at
startup to fix up whatever a crash left (header lengths, torn Ogg pages, sidecars).
:func:`apply_retention` deletes the oldest call directories by age, count or size.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from ..frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from ..opus import DEFAULT_SETTINGS, OpusSettings
from ..receiver import NOT_DECODED
from ..sinkset import fault_code
from .meter import Levels
from ..recordings import ACTIVE, DIR_MODE, SIDECAR, iso, write_json, apply_retention, repair, repair_directory
from .ogg import OggOpusPassthrough, OggOpusSink
from .stereo import AlignedStereoRecorder
from .stereo_opus import AlignedOpusRecorder
from .wav import WavSink

__all__ = [
    "CallRecorder",
    "recording_paths",
    "SIDECAR",
    "apply_retention",
    "repair",
    "repair_directory",
]

log = logging.getLogger(__name__)


def _private_dir(path: Path) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
    os.chmod(path, DIR_MODE)


#: How much of the user's audio may sit in memory before it reaches the file (user.wav,
#: user.ogg): what a killed process loses. (stereo.wav lags by its alignment window,
#: up to ``max_delay_s + commit_s`` = 0.75 s, by design.) A write per 100 ms per file costs
#: a few microseconds.
FLUSH_S = 0.1
#: How often user.wav's header is brought up to date with its data (a ``pwrite``; the
#: data itself goes out every :data:`FLUSH_S`).
HEADER_S = 1.0

class _UserLeg:
    """Inbound sink: user.wav, the stereo left channel, levels, Ogg (encode mode).

    :attr:`needs_pcm` is ``False`` when none of those is made from the decoded audio
    (only user.ogg, passed through from RTP): the receive path may then skip decoding
    and hand :data:`media.receiver.NOT_DECODED` frames, which count towards
    ``user_seconds`` but not the user's levels."""

    def __init__(self, rec: CallRecorder) -> None:
        self._rec = rec
        self.frames = 0
        self.measured = 0  # frames in the user's levels (without stereo.wav, which measures them all)
        self.closed = False
        self._stage = 0  # which file write() was at: 0 user.wav, 1 stereo.wav, 2 user.ogg, 3 stereo.ogg
        self._acc: np.ndarray | None = None  # (for stereo frames; allocated by the first)
        self._mono: np.ndarray | None = None

    @property
    def needs_pcm(self) -> bool:
        rec = self._rec
        return not (self.closed or rec._finished) and (
            rec._wav is not None or rec._stereo is not None or rec._ogg_sink is not None
            or (rec._stereo_ogg is not None and rec._peer is None))

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        rec = self._rec
        if self.closed or rec._finished:
            return
        try:
            self._write(rec, pcm, sample_rate, channels)
        except Exception as exc:  # noqa: BLE001 - the recording stops, the call goes on
            rec._fail(exc, ("user.wav", "stereo.wav", "user.ogg", "stereo.ogg")[self._stage])

    def _write(self, rec: CallRecorder, pcm: np.ndarray, sample_rate: int, channels: int) -> None:
        self._stage = 0
        self.frames += 1
        if channels == 2 and pcm.size == 2 * FRAME_SAMPLES:
            # aiortc decodes to stereo (both sides equal for a mono stream): mix once
            # for every file instead of once per file.
            if self._acc is None:
                self._acc = np.empty(FRAME_SAMPLES, dtype=np.int32)
                self._mono = np.empty(FRAME_SAMPLES, dtype=np.int16)
            acc = self._acc
            np.add(pcm[0::2], pcm[1::2], out=acc, dtype=np.int32)
            np.right_shift(acc, 1, out=acc)
            np.copyto(self._mono, acc, casting="unsafe")
            pcm, channels = self._mono, 1
        if rec._wav is not None:
            rec._wav.write(pcm, sample_rate, channels)
        if rec._stereo is not None:
            self._stage = 1
            peer = rec._peer
            pts = at = None
            if peer is not None:
                pts = peer.received.pts
                at = peer.rtp_tap.arrival(pts)
                if at is None:
                    pts = None  # no packet timing: lay frames end to end instead
            rec._stereo.left.write_timed(pcm, sample_rate, channels, pts, at)
        elif pcm is not NOT_DECODED:
            rec._user_levels.accumulate(pcm)
            self.measured += 1
        self._stage = 2
        if rec._ogg_pending_auto:
            rec._resolve_ogg_mode()
        if rec._ogg_sink is not None:
            rec._ogg_sink.write(pcm, sample_rate, channels)
        if rec._stereo_ogg is not None and rec._peer is None and pcm is not NOT_DECODED:
            self._stage = 3  # (attached to a peer, stereo.ogg takes the user's packets)
            rec._stereo_ogg.left.write_pcm(pcm, None, None)

    def close(self) -> None:
        # The peer closes its sinks when it closes: the call is over, finish the files.
        self.closed = True
        self._rec._finish()


class _BusinessLeg:
    """Outbound tap: the stereo right channel and levels."""

    def __init__(self, rec: CallRecorder) -> None:
        self._rec = rec
        self.frames = 0

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        rec = self._rec
        if rec._finished:
            return
        self.frames += 1
        track = rec._peer.outbound if rec._peer is not None else None
        if rec._stereo_ogg is not None:
            try:
                leg = rec._stereo_ogg.right
                payload = track.sent_payload if track is not None else None
                if payload is not None:
                    leg.write_packet(payload, track.sent_pts, track.sent_at)
                elif channels == 1:
                    leg.write_pcm(pcm, track.sent_pts if track is not None else None,
                                  track.sent_at if track is not None else None)
            except Exception as exc:  # noqa: BLE001 - never into the send path
                rec._fail(exc, "stereo.ogg")
                return
        if rec._stereo is not None:
            try:
                if track is not None:
                    rec._stereo.right.write_timed(pcm, sample_rate, channels, track.sent_pts, track.sent_at,
                                                  track.sent_level)
                else:
                    rec._stereo.right.write_timed(pcm, sample_rate, channels, None, None)
            except Exception as exc:  # noqa: BLE001 - never into the send path
                rec._fail(exc, "stereo.wav")
        else:
            rec._business_levels.accumulate(pcm, track.sent_level if track is not None else None)

    def lane_ring(self):
        """For a lean sender sending ahead (:mod:`media.lean`): ``False`` when this leg
        needs each frame as it goes (PCM into stereo.wav, a leg that transcodes), else
        the ring it places our packets in itself, or ``None`` (nothing per frame: then
        :meth:`lane_sent` is all this leg needs)."""
        rec = self._rec
        if rec._finished:
            return None
        if rec._stereo is not None:
            return False
        return rec._stereo_ogg.right.lane_ring() if rec._stereo_ogg is not None else None

    def lane_sent(self, n: int, level: tuple[float, int], error: BaseException | None) -> None:
        """``n`` frames went out on a lean sender's lane, their packets placed in the
        ring (:meth:`lane_ring`) unless placing raised ``error``; ``level``: their
        ``(sum of squares, peak)``. As ``n`` calls of :meth:`write`."""
        rec = self._rec
        if rec._finished:
            return
        self.frames += n
        if error is not None:
            rec._fail(error, "stereo.ogg")
            return
        if rec._stereo is None:
            rec._business_levels.add_known(level, n * FRAME_SAMPLES)

    def close(self) -> None:
        pass


def recording_paths(directory: str | os.PathLike[str], *, wav: bool = True, stereo: bool = True,
                    ogg: bool = True, stereo_ogg: bool = False) -> dict[str, Path]:
    """The files a :class:`CallRecorder` in ``directory`` writes, by kind (known before
    it starts: a media worker process records, the gateway lists the files)."""
    directory = Path(directory)
    paths: dict[str, Path] = {}
    if wav:
        paths["user_wav"] = directory / "user.wav"
    if stereo:
        paths["stereo_wav"] = directory / "stereo.wav"
    if ogg:
        paths["user_ogg"] = directory / "user.ogg"
    if stereo_ogg:
        paths["stereo_ogg"] = directory / "stereo.ogg"
    paths["sidecar"] = directory / SIDECAR
    return paths


class CallRecorder:
    """The recordings of one call in ``directory`` (created, mode 0700).

    Args:
        directory: the call's own directory (e.g. ``<recordings>/<call id>``).
        call_id: written to the sidecar (default: the directory name).
        stereo / ogg / wav / stereo_ogg: which files to make (``stereo.wav``,
            ``user.ogg``, ``user.wav``, ``stereo.ogg``).
        ogg_mode: ``"auto"`` (pass-through when the peer's RTP tap delivers Opus, else
            encode), ``"passthrough"`` or ``"encode"``.
        opus: encoder settings for ``ogg_mode="encode"``.
        meta: extra JSON-able data for the sidecar.
        clock: monotonic clock for the stereo alignment (the event loop's by default).

    Without a peer, feed :attr:`user` (a Sink) and :attr:`business` (a Sink) directly.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        call_id: str | None = None,
        stereo: bool = True,
        ogg: bool = True,
        wav: bool = True,
        stereo_ogg: bool = False,
        ogg_mode: Literal["auto", "passthrough", "encode"] = "auto",
        opus: OpusSettings = DEFAULT_SETTINGS,
        meta: dict[str, Any] | None = None,
        clock=None,
    ) -> None:
        if ogg_mode not in ("auto", "passthrough", "encode"):
            raise ValueError(f"ogg_mode must be auto, passthrough or encode, got {ogg_mode!r}")
        self.directory = Path(directory)
        _private_dir(self.directory)
        self.call_id = call_id or self.directory.name
        self.meta = dict(meta or {})
        self.opus = opus
        self.started_at = time.time()
        self.ended_at: float | None = None
        self._peer = None
        self._finished = False
        self._closed = False
        self.media_stats: dict = {}
        #: Why the recording stopped early (``{"code": "disk_full" | "io_error" |
        #: "sink_error", "reason": ...}``), or ``None``.
        self.error: dict[str, str] | None = None
        #: Called once with :attr:`error` when the recording fails during the call.
        self.on_error: Callable[[dict[str, str]], None] | None = None
        self._user_levels = Levels()
        self._business_levels = Levels()

        self.paths = recording_paths(self.directory, wav=wav, stereo=stereo, ogg=ogg, stereo_ogg=stereo_ogg)
        self._wav: WavSink | None = None
        self._stereo: AlignedStereoRecorder | None = None
        self._ogg_pass: OggOpusPassthrough | None = None
        self._ogg_sink: OggOpusSink | None = None
        self._stereo_ogg: AlignedOpusRecorder | None = None
        self._ogg_pending_auto = False
        self.ogg_mode: str | None = None
        self._ogg_requested = ogg_mode if ogg else None
        comments = {"CALL_ID": self.call_id, "DATE": iso(self.started_at)}
        self._ogg_comments = comments
        if wav:
            self._wav = WavSink(self.paths["user_wav"], flush_interval_s=FLUSH_S, header_interval_s=HEADER_S)
        if stereo:
            self._stereo = AlignedStereoRecorder(self.paths["stereo_wav"], clock=clock)
        if stereo_ogg:
            self._stereo_ogg = AlignedOpusRecorder(self.paths["stereo_ogg"], clock=clock, settings=opus,
                                                   comments=comments)
        if ogg:
            if ogg_mode == "encode":
                self._start_ogg_encode()
            # pass-through needs a peer: decided in attach()
        self.user = _UserLeg(self)
        self.business = _BusinessLeg(self)
        ACTIVE.add(self.directory.resolve())
        self._write_sidecar()

    # -- wiring ------------------------------------------------------------------------

    def attach(self, peer) -> None:
        """Record ``peer`` (a :class:`media.peer.MediaPeer`): its received audio, what it
        sends (outbound tap) and, for pass-through Ogg, its RTP payloads."""
        if self._peer is not None:
            raise RuntimeError("this recorder is already attached")
        self._peer = peer
        if self._stereo is not None:
            peer.rtp_tap.want_arrivals()  # (stereo.wav places the user's frames by arrival)
        peer.add_sink(self.user)
        peer.add_outbound_sink(self.business)
        if self._stereo_ogg is not None:
            peer.rtp_tap.add_listener(self._stereo_ogg_listener)
        if self._ogg_requested in ("auto", "passthrough"):
            self._ogg_pass = OggOpusPassthrough(self.paths["user_ogg"], comments=self._ogg_comments,
                                                flush_interval_s=FLUSH_S)
            peer.rtp_tap.add_listener(self._ogg_listener)
            self.ogg_mode = "passthrough"
            self._ogg_pending_auto = self._ogg_requested == "auto"

    def _start_ogg_encode(self) -> None:
        self._ogg_sink = OggOpusSink(self.paths["user_ogg"], settings=self.opus, comments=self._ogg_comments,
                                     flush_interval_s=FLUSH_S)
        self.ogg_mode = "encode"

    def _resolve_ogg_mode(self) -> None:
        """``auto``: audio is being decoded; if no Opus packet came through the tap,
        there is nothing to pass through (another codec): encode instead."""
        self._ogg_pending_auto = False
        peer = self._peer
        if self._ogg_pass is not None and self._ogg_pass.packets_received == 0 and peer.rtp_tap.packets == 0:
            peer.rtp_tap.remove_listener(self._ogg_listener)
            self._ogg_pass.close()
            self._ogg_pass = None
            self._start_ogg_encode()

    def _ogg_listener(self, arrival) -> None:
        """RTP tap listener for pass-through Ogg; a write error fails the recording."""
        ogg = self._ogg_pass
        if ogg is None or self._finished:
            return
        try:
            ogg.add(arrival.pts, arrival.payload)
        except Exception as exc:  # noqa: BLE001 - never into the receive path
            self._fail(exc, "user.ogg")

    def _stereo_ogg_listener(self, arrival) -> None:
        """RTP tap listener: the user's packets into stereo.ogg's left channel."""
        stereo_ogg = self._stereo_ogg
        if stereo_ogg is None or self._finished:
            return
        try:
            stereo_ogg.left.write_packet(arrival.payload, arrival.pts, arrival.at)
        except Exception as exc:  # noqa: BLE001 - never into the receive path
            self._fail(exc, "stereo.ogg")

    def owns(self, sink: object) -> bool:
        """Whether ``sink`` (a peer sink, outbound tap or RTP listener) is part of this recorder."""
        return (sink is self.user or sink is self.business or sink == self._ogg_listener
                or sink == self._stereo_ogg_listener)

    def _detach(self) -> None:
        peer = self._peer
        if peer is None:
            return
        peer.remove_sink(self.user)
        peer.remove_outbound_sink(self.business)
        peer.rtp_tap.remove_listener(self._ogg_listener)
        peer.rtp_tap.remove_listener(self._stereo_ogg_listener)

    def _writers(self) -> list:
        return [w for w in (self._wav, self._stereo, self._ogg_pass, self._ogg_sink, self._stereo_ogg)
                if w is not None]

    def _fail(self, exc: BaseException, part: str) -> None:
        """A write failed (a full disk, an I/O error): stop recording for good, keep
        what was written playable (headers fixed, torn pages cut), tell ``on_error``.
        The call and its audio go on."""
        if self._finished:
            return
        self._finished = True
        settle = getattr(getattr(self._peer, "outbound", None), "settle", None)
        if settle is not None:
            settle()  # (a lean sender placing our packets in stereo.ogg stops now)
        self.ended_at = time.time()
        reason = f"{part}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        self.error = {"code": fault_code(exc), "reason": reason}
        if isinstance(exc, OSError):
            log.warning("recording of call %s stopped: %s", self.call_id, reason)
        else:
            log.error("recording of call %s stopped: %s", self.call_id, reason,
                      exc_info=(type(exc), exc, exc.__traceback__))
        self._detach()
        for writer in self._writers():
            writer.abort()
        ACTIVE.discard(self.directory.resolve())
        self._write_sidecar()  # may fail on a full disk: the files stand on their own
        if self.on_error is not None:
            try:
                self.on_error(self.error)
            except Exception:  # noqa: BLE001
                log.exception("recording error handler failed")

    # -- results -----------------------------------------------------------------------

    @property
    def t0(self) -> float | None:
        """Time zero of ``stereo.wav`` on the stereo clock (the event loop's), or ``None``
        without a stereo recording."""
        return self._stereo.t0 if self._stereo is not None else None

    @property
    def user_seconds(self) -> float:
        return self.user.frames * FRAME_MS / 1000

    @property
    def business_seconds(self) -> float:
        return self.business.frames * FRAME_MS / 1000

    def sidecar(self) -> dict:
        user_levels = self._stereo.left.levels if self._stereo is not None else self._user_levels
        business_levels = self._stereo.right.levels if self._stereo is not None else self._business_levels
        durations: dict[str, float | None] = {
            "user": round(self.user_seconds, 3),
            "business": round(self.business_seconds, 3),
        }
        if self._wav is not None:
            durations["user_wav"] = round(self._wav.duration_s, 3)
        if self._stereo is not None:
            durations["stereo_wav"] = round(self._stereo.duration_s, 3)
        ogg = self._ogg_pass or self._ogg_sink
        if ogg is not None:
            durations["user_ogg"] = round(ogg.duration_s, 3)
        if self._stereo_ogg is not None:
            durations["stereo_ogg"] = round(self._stereo_ogg.duration_s, 3)
        data: dict[str, Any] = {
            "call_id": self.call_id,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at) if self.ended_at else None,
            "complete": self._finished,
            "files": {k: p.name for k, p in self.paths.items() if k != "sidecar"},
            "ogg_mode": self.ogg_mode,
            "sample_rate": SAMPLE_RATE,
            "durations_s": durations,
            # (``None``: the user's audio was not all decoded to measure, as with stereo.ogg alone)
            "levels": {"user": user_levels.as_dict() if self._stereo is not None or self.user.measured == self.user.frames
                       else None, "business": business_levels.as_dict()},
            "media_stats": self.media_stats,
        }
        if self.error is not None:
            data["error"] = self.error
        if self._stereo is not None:
            data["alignment"] = {
                "user_first_s": _rel(self._stereo.left.first_at, self._stereo.t0),
                "business_first_s": _rel(self._stereo.right.first_at, self._stereo.t0),
                "user_resyncs": self._stereo.left.resyncs,
                "business_resyncs": self._stereo.right.resyncs,
            }
        stereo_ogg = self._stereo_ogg
        if stereo_ogg is not None:
            data["stereo_ogg"] = {
                leg.name: {"first_s": _rel(leg.first_at, stereo_ogg.t0), "packets": leg.packets,
                           "silence_filled": filled, "late": leg.late, "resyncs": leg.resyncs,
                           "dropped": leg.dropped, "transcoded": leg.transcoded,
                           "undecodable": leg.undecodable}
                for leg, filled in zip(stereo_ogg.legs, stereo_ogg.filled)}
        if self._ogg_pass is not None:
            data["ogg_passthrough"] = {
                "packets": self._ogg_pass.packets_received,
                "filled": self._ogg_pass.packets_filled,
                "dropped": self._ogg_pass.packets_dropped,
            }
        if self.meta:
            data["meta"] = self.meta
        return data

    def _write_sidecar(self) -> None:
        try:
            write_json(self.paths["sidecar"], self.sidecar())
        except OSError as exc:
            log.warning("cannot write the recording sidecar %s: %s", self.paths["sidecar"], exc.strerror or exc)

    # -- the end -----------------------------------------------------------------------

    def _finish(self) -> None:
        """Close every file (idempotent); the sidecar says ``complete``."""
        if self._finished:
            return
        self._finished = True
        self.ended_at = time.time()
        peer = self._peer
        if peer is not None:
            peer.remove_outbound_sink(self.business)
            peer.rtp_tap.remove_listener(self._ogg_listener)
            peer.rtp_tap.remove_listener(self._stereo_ogg_listener)
        for closer in self._writers():
            try:
                closer.close()
            except OSError as exc:  # the last flush hit a full disk: keep what is there
                closer.abort()
                if self.error is None:
                    self.error = {"code": fault_code(exc), "reason": f"{closer.path.name}: {exc.strerror or exc}"}
                    log.warning("recording of call %s: closing %s failed: %s", self.call_id,
                                closer.path.name, exc.strerror or exc)
        ACTIVE.discard(self.directory.resolve())
        self._write_sidecar()

    def close(self, media_stats: dict | None = None) -> dict:
        """Finish the recordings (if the peer has not already) and write the sidecar,
        with ``media_stats`` when given. May be called again to add stats. Returns the
        sidecar data."""
        if not self._closed and self._peer is not None and not self._peer.closed:
            self._peer.remove_sink(self.user)
        self._closed = True
        if media_stats is not None:
            self.media_stats = dict(media_stats)
        if not self._finished:
            self._finish()
        else:
            self._write_sidecar()
        return self.sidecar()

    async def __aenter__(self) -> CallRecorder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _rel(at: float | None, t0: float) -> float | None:
    return None if at is None else round(at - t0, 3)


