"""The business's outgoing audio: a paced track that never goes quiet.

WhatsApp hangs up on a business side that sends no media (20 s at call start, 30 s
mid-call), so from the moment media is up this track yields a 20 ms frame every 20 ms:
the current playback's audio, or silence when nothing plays.

Pacing uses a drift-free clock: frame *n* is due at ``start + n * 20 ms`` on the event
loop's monotonic clock, so small scheduling delays never accumulate. Lateness, underruns
(a frame more than one frame period late: the far side's jitter buffer ran dry) and the
jitter of the actual intervals between frames are counted in :class:`PacingStats`.

Encoding. By default the track encodes Opus itself, on the event loop (one mono
encoder per call, see :mod:`media.opus`), and returns ``av.Packet`` objects, which
aiortc packs into RTP without touching them. That saves aiortc's per-frame thread-pool
hop and its stereo 96 kbit/s encode, and lets pre-encoded prompts
(:class:`media.sources.prompt.PromptSource`) go out as stored packets: every packet's
``pts`` is ``frame index × 960``, so RTP timestamps are continuous whether a frame was
encoded here, replayed from a prompt cache, or is the cached silence packet sent while
nothing plays. ``OutboundAudioTrack(opus=None)`` (``PeerConfig(opus=None)``) restores
the old behaviour (PCM ``av.AudioFrame`` objects, encoded by aiortc; needed only for
non-Opus codecs).

Outbound taps. :meth:`OutboundAudioTrack.add_sink` registers sinks that get every frame
as it is sent (the PCM, also for pre-encoded packets), e.g. the business leg of a call
recording. ``sent_pts`` / ``sent_at`` describe the frame being tapped.
"""

from __future__ import annotations

import asyncio
import fractions
from array import array
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .clock import FRAME_S, FrameClock
from .frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, SILENT_FRAME, Sink, Source, silence
from .mix import Playback, PlayQueue
from .opus import DEFAULT_SETTINGS, OpusEncoder, OpusSettings, silence_packet
from .sinkset import SinkSet

__all__ = ["OutboundAudioTrack", "PacingStats", "Playback", "FRAME_S"]

_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
_SILENT = (0.0, 0)  # the level of a silent frame
#: Behind schedule by more than this many frames: resynchronise instead of bursting.
MAX_CATCH_UP_FRAMES = 5
#: Interval histogram: 0.1 ms bins up to 200 ms (the last bin takes anything longer).
PACING_BIN_S = 1e-4
_BINS = 2000


@dataclass(slots=True)
class PacingStats:
    frames: int = 0
    silent_frames: int = 0
    #: Frames encoded by the track (PCM from a source).
    encoded_frames: int = 0
    #: Frames sent as pre-encoded packets (prompt cache), without encoding.
    passthrough_frames: int = 0
    #: Of all frames, those a lean sender sent ahead in C (media.lean: a prompt's
    #: packets, silence), with no Python per frame.
    ahead_frames: int = 0
    late_frames: int = 0
    #: Frames sent more than one frame period after their due time.
    underruns: int = 0
    resyncs: int = 0
    max_late_ms: float = 0.0
    max_interval_ms: float = 0.0
    _hist: array = field(default_factory=lambda: array("I", bytes(4 * _BINS)), repr=False)
    _intervals: int = 0

    def _interval(self, seconds: float) -> None:
        b = int(seconds / PACING_BIN_S)
        self._hist[b if b < _BINS else _BINS - 1] += 1
        self._intervals += 1
        ms = seconds * 1000
        if ms > self.max_interval_ms:
            self.max_interval_ms = ms

    def interval_percentile_ms(self, p: float) -> float | None:
        """The ``p``-th percentile of the intervals between frames sent (0.1 ms bins)."""
        if not self._intervals:
            return None
        rank = max(1, int(np.ceil(p / 100 * self._intervals)))
        seen = 0
        for b, count in enumerate(self._hist):
            seen += count
            if seen >= rank:
                return round((b + 0.5) * PACING_BIN_S * 1000, 2)
        return round(self.max_interval_ms, 2)  # pragma: no cover

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "silent_frames": self.silent_frames,
            "encoded_frames": self.encoded_frames,
            "passthrough_frames": self.passthrough_frames,
            "ahead_frames": self.ahead_frames,
            "late_frames": self.late_frames,
            "underruns": self.underruns,
            "resyncs": self.resyncs,
            "max_late_ms": round(self.max_late_ms, 2),
            "interval_ms": {
                "p50": self.interval_percentile_ms(50),
                "p95": self.interval_percentile_ms(95),
                "max": round(self.max_interval_ms, 2) if self._intervals else None,
            },
        }


class OutboundAudioTrack(MediaStreamTrack):
    """An aiortc audio track fed by a queue of :class:`~media.frames.Source` objects.

    Args:
        opus: encoder settings; ``None`` sends PCM frames for aiortc to encode.
        passthrough: send pre-encoded packets of sources that have them (only with
            ``opus``); ``False`` encodes their PCM instead.
    """

    kind = "audio"

    def __init__(self, *, opus: OpusSettings | None = DEFAULT_SETTINGS, passthrough: bool = True) -> None:
        super().__init__()
        self.queue = PlayQueue()
        self.opus = opus
        self.passthrough = passthrough and opus is not None
        self._encoder: OpusEncoder | None = None
        self._silence_packet = silence_packet(opus) if opus is not None else None
        self._silence_packets = (self._silence_packet,)
        self._clock = FrameClock(resync_after_s=MAX_CATCH_UP_FRAMES * FRAME_S)
        self._index = 0
        self._last_sent: float | None = None
        self.stats = PacingStats()
        self._silence = silence()
        self._silence.flags.writeable = False
        #: Outbound taps; one that raises is detached (see media.sinkset), the send
        #: loop never sees the error. Set ``sinks.on_fault`` to hear about it.
        self.sinks = SinkSet("send")
        #: ``pts`` (samples at 48 kHz) and loop time of the frame being sent.
        self.sent_pts = 0
        self.sent_at = 0.0
        #: ``(sum of squares, peak)`` of the frame being tapped when known without a
        #: pass over it (a prompt's frame, silence), else ``None``.
        self.sent_level: tuple[float, int] | None = None
        #: The Opus payload of the frame being tapped (``None`` when aiortc encodes).
        self.sent_payload: bytes | None = None
        #: The lean RTP path's sender (:class:`media.lean.LeanSender`) once the peer set
        #: one up: then frames go out from the shared ticker, not through aiortc.
        self.lean = None

    # -- playback control -------------------------------------------------------------

    def play(self, source: Source) -> Playback:
        """Queue ``source`` after whatever is playing; returns its :class:`Playback`."""
        self.settle()
        return self.queue.play(source)

    def clear(self) -> None:
        """Stop the current playback and drop everything queued (barge-in): the next
        frame sent is silence."""
        self.settle()
        self.queue.clear()

    @property
    def playing(self) -> bool:
        return bool(self.queue)

    @property
    def started(self) -> bool:
        """True once the first frame went out (media is flowing)."""
        return self._clock.started

    # -- outbound taps ----------------------------------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Call ``sink.write(pcm, 48000, 1)`` with every frame sent, as it is sent.

        Sinks run on the event loop inside the pacing path: they must be cheap and must
        not modify or keep the frame (copy it). ``sent_pts``/``sent_at`` give the frame's
        position on the stream timeline and its loop time, ``sent_payload`` the Opus
        packet it goes out as."""
        self.settle()
        self.sinks.add(sink)

    def remove_sink(self, sink: Sink) -> None:
        self.settle()
        self.sinks.remove(sink)

    def settle(self) -> None:
        """What is queued or tapped changes (or a tap's state did): a lean sender
        sending ahead (:meth:`runway`) stops now and brings this track up to date."""
        if self.lean is not None:
            self.lean.interrupt()

    # -- aiortc side ------------------------------------------------------------------

    async def recv(self) -> av.Packet | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        lean = self.lean
        if lean is not None and lean.usable():
            # (aiortc asks for the first frame once DTLS is up: from here the process's
            # 20 ms ticker sends this track's frames; aiortc's send loop waits here)
            await lean.run()
            raise MediaStreamError
        await self._wait_for_slot()
        return self.next_frame()

    def stop(self) -> None:
        self.clear()  # (which stops a lean sender's runway)
        if self.lean is not None:
            self.lean.stop()
        super().stop()

    def release(self) -> None:
        """After :meth:`stop`: free the encoder and the taps (statistics stay)."""
        self.stop()
        self._encoder = None
        self.sinks.clear()
        self.sinks.on_fault = None

    def next_frame(self) -> av.Packet | av.AudioFrame:
        """Produce the next frame now (no pacing): what :meth:`recv` returns once the
        frame is due. Benchmarks drive this directly."""
        out = self._next()
        if isinstance(out, bytes):
            out = av.Packet(out)
        out.pts = self.sent_pts
        out.time_base = _TIME_BASE
        return out

    def next_payload(self) -> bytes:
        """The next frame's Opus payload, now (the lean RTP path; needs ``opus``)."""
        out = self._next()
        return out if isinstance(out, bytes) else bytes(out)

    def paced(self, now: float, late: float) -> None:
        """A frame goes out at ``now``, ``late`` seconds after it was due (the lean
        path's shared ticker paces; the statistics are the same as :meth:`recv`'s)."""
        if not self._clock.started:
            self._clock.begin(now)
        else:
            self._count_late(late)
            self.stats._interval(now - self._last_sent)
        self._last_sent = self.sent_at = now

    def runway(self, limit: int):
        """What the next frames (up to ``limit``) will be, known ahead, for a lean
        sender to send without asking per frame (:mod:`media.lean`): ``(packets,
        start, count, repeat, playback)`` — the playing prompt's next pre-encoded
        packets (``playback`` is its :class:`Playback`, already started), or the silence
        packet ``repeat``-ed while nothing is queued (``playback`` ``None``); else
        ``None`` (PCM to encode, a source that is not a prompt, the first frame of a
        playback, a stereo source...). Nothing is read: :meth:`lane_frames` accounts for
        what went out."""
        if not self.passthrough or not self._clock.started:
            return None
        queue = self.queue
        if not queue:
            return self._silence_packets, 0, limit, True, None
        playback = queue.current
        if playback is None or queue.head is not playback or playback.started_at is None:
            return None
        runway = getattr(playback.source, "runway", None)
        found = runway(limit) if runway is not None and playback.source.channels == 1 else None
        return None if found is None else (*found, False, playback)

    def lane_frames(self, n: int, playback: Playback | None, payload: bytes | None, at: float,
                    late_frames: int, underruns: int, max_late_ms: float, max_interval_ms: float) -> tuple[float, int]:
        """``n`` frames of a :meth:`runway` went out (the last at ``at``, as
        ``payload``): the track's counters, position and statistics as after ``n``
        frames paced and sent (the intervals' histogram was added already). Returns
        their ``(sum of squares, peak)``."""
        stats = self.stats
        self._index += n
        stats.frames += n
        stats.ahead_frames += n
        stats._intervals += n
        stats.late_frames += late_frames
        stats.underruns += underruns
        if max_late_ms > stats.max_late_ms:
            stats.max_late_ms = max_late_ms
        if max_interval_ms > stats.max_interval_ms:
            stats.max_interval_ms = max_interval_ms
        self.sent_pts = (self._index - 1) * FRAME_SAMPLES
        self._last_sent = self.sent_at = at
        self.sent_payload = payload
        queue = self.queue
        if playback is None:
            stats.silent_frames += n
            queue.packet = queue.level = None
            self.sent_level = _SILENT
            return _SILENT
        stats.passthrough_frames += n
        playback.frames += n
        playback.packets += n
        source = playback.source
        level = source.advance(n)
        queue.packet, queue.level = source.packet, source.level
        self.sent_level = source.level
        return level

    def _next(self) -> bytes | av.Packet | av.AudioFrame:
        pcm = self.queue.read()
        pts = self._index * FRAME_SAMPLES
        stats = self.stats
        out: bytes | av.Packet | av.AudioFrame
        level = self.queue.level
        if self.opus is None:
            if pcm is None:
                pcm, level = self._silence, _SILENT
                stats.silent_frames += 1
            out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            out.sample_rate = SAMPLE_RATE
        elif pcm is None or pcm is SILENT_FRAME:
            pcm, level = self._silence, _SILENT
            stats.silent_frames += 1
            out = self._silence_packet
        else:
            encoded = self.queue.packet
            if encoded is not None and self.passthrough:
                out = encoded
                stats.passthrough_frames += 1
                self.queue.current.packets += 1
            else:
                encoder = self._encoder
                if encoder is None:
                    encoder = self._encoder = OpusEncoder(self.opus)
                out = encoder.encode(pcm)
                stats.encoded_frames += 1
        self._index += 1
        stats.frames += 1
        self.sent_pts = pts
        self.sent_level = level
        if self.sinks:
            self.sent_payload = out if type(out) is bytes else bytes(out) if isinstance(out, av.Packet) else None
            self.sinks.write(pcm, SAMPLE_RATE, 1)
        return out

    async def _wait_for_slot(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        clock = self._clock
        if not clock.started:
            clock.begin(now)
            self._last_sent = self.sent_at = now
            return
        resyncs = clock.resyncs
        late = clock.late(self._index, now)  # (a stall restarts the schedule: no burst)
        if late < 0:
            await asyncio.sleep(-late)
            now = loop.time()
        else:
            self._count_late(late)
            self.stats.resyncs += clock.resyncs - resyncs
        self.stats._interval(now - self._last_sent)
        self._last_sent = self.sent_at = now

    def _count_late(self, late: float) -> None:
        late_ms = late * 1000
        if late_ms > 1.0:
            stats = self.stats
            stats.late_frames += 1
            if late_ms > stats.max_late_ms:
                stats.max_late_ms = late_ms
            if late_ms > FRAME_MS:
                stats.underruns += 1
