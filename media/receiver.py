"""wacall's audio receive path: the far side's Opus RTP into an adaptive playout buffer,
decoded on the event loop, one 20 ms frame per 20 ms of wall-clock time.

aiortc 1.16 plays received audio through ``JitterBuffer(capacity=16, prefetch=4)``: a
frame leaves only when four complete frames follow it, one per arriving packet, and a
loss evicts several frames with nothing concealing them; every frame is decoded in a
thread of its own (a thread hop per frame). :class:`OpusReceiver` replaces that for
one :class:`aiortc.RTCRtpReceiver`:

* **Intercept** — it is the *consumer* of the receiver's hook
  (:func:`media.aiortc_hooks.receiver_hook`; :class:`media.taps.RtpTap` observes the
  same hook and sees every packet first). Opus packets stop here; anything else goes on
  to aiortc. DTMF is untouched: :mod:`media.dtmf` takes telephone-events out one level
  earlier, in the DTLS transport, and closes their sequence-number gap.
* **Buffer** — :class:`media.jitterbuffer.PlayoutBuffer` (ordering, duplicates, late
  packets, adaptive target delay, loss concealment decisions).
* **Clock** — a drift-free schedule (tick *n* at ``start + n × 20 ms``; a tick more
  than :data:`RESYNC_S` late starts a new schedule rather than a burst, like
  :mod:`media.track`), run by the event loop's shared :class:`media.lean.FrameTicker`
  (one timer for every call's sending and receiving, not one per receiver). The
  schedule lies on the ticker's grid: it starts at the first tick at or after the
  buffer's ``start_at`` (so playout starts up to 20 ms later than the first packet
  alone would say: the delay is that much above target, which the buffer measures and,
  once it is a frame and more too long, takes back), and after a stall it goes on from
  the ticker's tick. Each tick plays the slot due by then; after the loop was late,
  the backlog follows one slot per loop iteration (with the socket reads in between). Receivers tick before the senders on the ticker: a
  frame delivered to a bridge's sender goes out in the same tick. Playout stops once
  nothing is buffered and no packet came for ``PlayoutBuffer.hold_s`` (200 ms), so
  frames stop on a dead network (the RTP watchdog counts them); the receiver leaves the
  ticker while it is stopped.
* **Decode** — :class:`OpusDecoder`: one persistent libopus decoder, mono 48 kHz
  s16, on the event loop, called directly (:mod:`media.libopus`: a third cheaper per
  frame than through PyAV, and a fifth of the memory). Concealment is libopus' own
  PLC. A lost packet whose successor is buffered already is rebuilt from the in-band
  FEC that successor carries, if it carries any (:meth:`OpusDecoder.recover`); the
  first loss in a stream with FEC whose successor came too late raises the buffer's
  floor to :data:`FEC_MIN_DELAY_S`. (Where libopus cannot be bound, PyAV decodes,
  without FEC, and PLC is reached by decoding a TOC-only packet: a 0-byte frame,
  what DTX sends.)
* **Decode only for a reader** — with ``pcm_wanted`` given (``() -> bool``, asked every
  tick), a tick when nobody reads PCM (say the only sink is the recorder writing
  user.ogg from the RTP packets as received) decodes nothing: it delivers
  :data:`NOT_DECODED` (a shared read-only 20 ms of zeros) in place of the audio, so
  frames, their ``pts`` and the watchdogs counting them go on as before, at no libopus
  cost. (Packets that are not one 20 ms frame are still decoded, to be cut into frames.)
  Once a reader is back, decoding resumes with the next packet; libopus then starts
  from the state it had, which a few milliseconds of the first frame may show.
* **Decode at the readers' rate** — with ``pcm_rate`` given (``() -> int``, asked
  every tick instead), libopus decodes straight to the rate the readers want (a bot at
  16 or 8 kHz: about half the cost of decoding at 48 kHz and resampling), 0 meaning
  nobody reads.
* **Deliver** — ``deliver(pcm, pts)`` with a 960-sample int16 array (20 ms at 48 kHz, or
  at the rate ``pcm_rate`` asked for; a read-only view of the decoded frame: sinks copy
  what they keep) and the frame's stream position
  (``None`` for a frame inserted to grow the delay). One frame per tick while playing,
  except for slots the sender sent no audio for (telephone-events replacing the audio,
  which media.dtmf reports through ``events_received``; timestamp jumps): those pass
  without a frame, as they did with aiortc's path, so the far side's DTMF does not
  turn into concealed audio.

aiortc's receiver keeps doing the cheap part. Its decoder thread is stopped as soon as
``receive()`` started it (so the remote track never yields frames: nothing reads it),
and for each Opus packet we feed its per-SSRC ``StreamStatistics`` ourselves, so its
RTCP receiver reports (fraction / cumulative lost, highest sequence number, jitter,
LSR/DLSR) and ``getStats()`` ``inbound-rtp`` (what :mod:`media.stats` reads) keep
describing the network exactly as before. Not kept: ``getSynchronizationSources()``
(aiortc's "active SSRC" bookkeeping) stays empty.

aiortc internals relied on: the receiver hook, ``__stop_decoder``, ``__remote_streams``
and ``StreamStatistics``, all reached through :mod:`media.aiortc_hooks` (which checks
them; any problem makes :class:`media.peer.MediaPeer` fall back to aiortc's own path).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import av
import numpy as np

from . import aiortc_hooks, libopus
from .clock import FRAME_S, FrameClock
from .frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from .jitterbuffer import CONCEAL, DISCARD, GAP, IDLE, PLAY, PlayoutBuffer, playout_buffer
from .lean import FrameTicker

__all__ = ["NOT_DECODED", "OpusDecoder", "OpusReceiver", "aiortc_problems", "RESYNC_S"]

log = logging.getLogger(__name__)

#: A tick this late (the event loop stalled) starts a new schedule instead of catching
#: up: the stall becomes playout delay, which the buffer then shrinks again.
RESYNC_S = 3 * FRAME_S
#: A slot due this little after a tick of the shared ticker is played in that tick
#: (clock noise: the schedule lies on the ticker's grid).
_DUE_SLACK_S = 0.001

#: The least playout delay once a stream carrying in-band FEC lost a packet: a frame
#: and a margin, so the packet after a lost one is here when the lost one is due.
FEC_MIN_DELAY_S = FRAME_S + 0.005

Deliver = Callable[[np.ndarray, "int | None"], None]


def _plc_tocs() -> tuple[bytes, ...]:
    """For each TOC byte: a TOC-only packet asking libopus for 20 ms of concealment in
    the same mode, bandwidth and channel count (code 0 = one frame, here of 0 bytes)."""
    out = []
    for toc in range(256):
        config, stereo = toc >> 3, toc & 0x04
        if config < 12:  # SILK: 20 ms is config % 4 == 1
            config = (config & ~3) | 1
        elif config < 16:  # Hybrid: 20 ms is odd
            config |= 1
        else:  # CELT: 20 ms is config % 4 == 3
            config |= 3
        out.append(bytes([(config << 3) | stereo]))
    return tuple(out)


_PLC = _plc_tocs()
#: For each TOC byte: whether the packet is one 20 ms frame (code 0; SILK config % 4 == 1,
#: Hybrid odd, CELT config % 4 == 3), i.e. exactly one frame to deliver.
_ONE_FRAME = tuple(
    (toc & 3) == 0 and (
        (toc >> 3) % 4 == 1 if toc >> 3 < 12 else (toc >> 3) % 2 == 1 if toc >> 3 < 16 else (toc >> 3) % 4 == 3)
    for toc in range(256)
)
#: What a tick delivers in place of audio when nothing reads PCM (see ``pcm_wanted``):
#: 20 ms of zeros, shared, read-only. Sinks that declare ``needs_pcm = False`` may get it.
NOT_DECODED = np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE)
NOT_DECODED.flags.writeable = False
#: Before anything was decoded: CELT fullband 20 ms mono.
_DEFAULT_TOC = 0xF8


class _Subscription:
    """A receiver's place on the shared ticker (what ``OpusReceiver._timer`` holds while
    playout runs; ``cancel()`` leaves the ticker, as a timer handle's would)."""

    __slots__ = ("callback", "ticker")

    def __init__(self, ticker: FrameTicker, callback: Callable[[float, float, int], None],
                 at: float | None) -> None:
        self.ticker = ticker
        self.callback = callback
        ticker.add(callback, first=True, at=at)

    def cancel(self) -> None:
        self.ticker.remove(self.callback)


class OpusDecoder:
    """A persistent libopus decoder giving mono int16 at ``rate`` (48 kHz by default),
    with PLC and FEC.

    libopus is called directly (:mod:`media.libopus`) where it can be bound, else
    through PyAV (``av.CodecContext``; 48 kHz only, no FEC there; ``pyav=True`` chooses
    it). Returned arrays are the caller's (no other reference to them is kept).
    :meth:`set_rate` switches the output rate (libopus decodes to 8, 12, 16, 24 or
    48 kHz itself: cheaper than decoding at 48 kHz and resampling)."""

    def __init__(self, *, pyav: bool = False, rate: int = SAMPLE_RATE) -> None:
        self._direct = libopus.Decoder(rate) if libopus.available() and not pyav else None
        self._ctx = None if self._direct is not None else self._pyav_context()
        self._toc = _DEFAULT_TOC
        self._at(rate if self._direct is not None else SAMPLE_RATE)
        self.packets = 0
        self.concealed = 0
        self.recovered = 0
        self.errors = 0

    def _at(self, rate: int) -> None:
        self.rate = rate
        self.frame = rate // 50  # samples per 20 ms
        self._silence = np.zeros(self.frame, dtype=PCM_DTYPE)
        self._silence.flags.writeable = False

    def set_rate(self, rate: int) -> bool:
        """Decode at ``rate`` from the next packet on (a fresh libopus state: the first
        frame may show it); ``False`` where only PyAV decodes (48 kHz stays)."""
        if rate == self.rate:
            return True
        if self._direct is None:
            return False
        self._direct = libopus.Decoder(rate)
        self._at(rate)
        return True

    @staticmethod
    def _pyav_context():
        ctx = av.CodecContext.create("libopus", "r")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.thread_count = 1
        return ctx

    @property
    def fec(self) -> bool:
        """Whether :meth:`recover` can use in-band FEC (libopus called directly)."""
        return self._direct is not None

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            log.warning("Opus decode failed (%d so far): %s", self.errors, exc)

    def _run(self, data: bytes) -> np.ndarray | None:
        try:
            frames = self._ctx.decode(av.Packet(data))
        except (av.FFmpegError, ValueError) as exc:
            self._failed(exc)
            return None
        if len(frames) == 1:
            frame = frames[0]
            pcm = np.frombuffer(frame.planes[0], dtype=PCM_DTYPE, count=frame.samples)
        elif frames:
            pcm = np.concatenate(
                [np.frombuffer(f.planes[0], dtype=PCM_DTYPE, count=f.samples) for f in frames]
            )
        else:
            return None
        pcm.flags.writeable = False  # a view of libopus' output: sinks must not modify it
        return pcm

    def decode(self, payload: bytes) -> np.ndarray | None:
        """PCM of one packet, or ``None`` if libopus rejected it."""
        self.packets += 1
        direct = self._direct
        if direct is not None:
            try:
                return direct.decode(payload)
            except libopus.OpusError as exc:
                self._failed(exc)
                return None
        pcm = self._run(payload)
        if pcm is not None:
            self._toc = payload[0]
        return pcm

    def conceal(self) -> np.ndarray:
        """20 ms of libopus packet-loss concealment (silence if that fails)."""
        self.concealed += 1
        direct = self._direct
        if direct is not None:
            try:
                return direct.conceal()
            except libopus.OpusError:
                return self._silence
        pcm = self._run(_PLC[self._toc])
        if pcm is None or pcm.size != self.frame:
            return self._silence
        return pcm

    def recover(self, following: bytes) -> np.ndarray | None:
        """20 ms in place of a lost packet, rebuilt from the in-band FEC that the packet
        after it (``following``) carries; ``None`` if it carries none (or FEC cannot
        be reached): conceal instead. Counted as concealed and in ``recovered``."""
        direct = self._direct
        if direct is None or libopus.has_fec(following) is False:
            return None
        try:
            pcm = direct.decode(following, fec=True)
        except libopus.OpusError:
            return None
        self.concealed += 1
        self.recovered += 1
        return pcm


def aiortc_problems(receiver=None) -> list[str]:
    """What is missing from the aiortc internals this module relies on (empty: fine).
    ``receiver``: an ``RTCRtpReceiver`` instance to check as well."""
    return aiortc_hooks.problems(receiver=receiver, scope="receiver")


class OpusReceiver:
    """One call's received audio (see the module docstring).

    Args:
        deliver: called once per 20 ms frame while playing: ``deliver(pcm, pts)``.
        buffer: the playout buffer (a default :class:`PlayoutBuffer` if omitted).
        on_fallback: called if the negotiated codecs have no Opus: aiortc's own path
            must then play the audio (its decoder thread is left running).
        events_received: ``() -> int``, telephone-event packets received so far (from
            :class:`media.dtmf.PeerDtmf`): while events arrive instead of audio, empty
            slots are the sender's (no frame), not losses (no concealment).
        clock: arrival timestamps and tick times (the event loop's clock by default;
            the schedule always runs on the loop).
        pcm_wanted: ``() -> bool``, asked once per tick: whether anything reads the
            decoded audio; when it says no, the tick delivers :data:`NOT_DECODED`
            without decoding. ``None`` (default): always decode. May be set later
            (:attr:`pcm_wanted`).
        pcm_rate: ``() -> int``, asked once per tick instead of ``pcm_wanted``: the
            rate the readers want the audio decoded at (libopus decodes to 8, 12, 16,
            24 or 48 kHz), 0 when nothing reads it. Frames are then that rate's 20 ms.
    """

    def __init__(
        self,
        deliver: Deliver,
        *,
        buffer: PlayoutBuffer | None = None,
        on_fallback: Callable[[], None] | None = None,
        events_received: Callable[[], int] | None = None,
        label: str = "peer",
        clock: Callable[[], float] | None = None,
        pcm_wanted: Callable[[], bool] | None = None,
        pcm_rate: Callable[[], int] | None = None,
    ) -> None:
        self.buffer = buffer if buffer is not None else playout_buffer()
        self.pcm_wanted = pcm_wanted
        self.pcm_rate = pcm_rate
        self._rate = SAMPLE_RATE  # what the decoder gives (the readers' rate, see pcm_rate)
        #: Frames delivered as :data:`NOT_DECODED` (nothing read PCM), and packets
        #: dropped to shrink the delay without decoding them.
        self.frames_not_decoded = 0
        self.discarded_not_decoded = 0
        self.decoder: OpusDecoder | None = None
        self.label = label
        self._deliver = deliver
        self._on_fallback = on_fallback
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self._loop_clock = clock is None  # our clock is the loop's (the ticker's)
        self._ticker = FrameTicker.of(self._loop)
        self._timer: _Subscription | None = None  # on the ticker while playout runs
        self._frames = FrameClock(resync_after_s=RESYNC_S)
        self._tick_n = 0  # ticks since the schedule began
        self._catching_up = False  # a catch-up slot is due in the next loop iteration
        self._receiver = None
        self._opus_pts: frozenset[int] = frozenset()
        self._streams: dict | None = None
        self._carry: np.ndarray | None = None  # decoded samples beyond one frame
        self._carry_pts: int | None = None
        self._last_payload: bytes | None = None  # the packet last decoded (does the stream carry FEC?)
        self._fec_delay = False  # the playout delay was raised so FEC can be used
        self._events = events_received
        self._events_at_audio = 0  # events_received() when the last audio packet came
        if events_received is not None:
            self.buffer.events_hint = self._events_instead_of_audio
        self._closed = False
        #: True when aiortc plays the audio instead (no Opus negotiated).
        self.fallback = False
        self.errors = 0
        self._released_errors = 0  # decode errors of a decoder freed by release()

    # -- wiring ------------------------------------------------------------------------

    @property
    def opus_payload_types(self) -> frozenset[int]:
        """The Opus payload types negotiated (empty before the receiver started)."""
        return self._opus_pts

    @property
    def installed(self) -> bool:
        return self._receiver is not None

    def install(self, receiver) -> None:
        """Take over ``receiver``'s (an ``RTCRtpReceiver``) audio; before any packet
        arrives, and before :meth:`media.taps.RtpTap.install` (which then wraps us)."""
        if self._receiver is not None:
            return
        self._receiver = receiver
        hook = aiortc_hooks.receiver_hook(receiver)
        hook.consumer = self._on_packet
        hook.started.append(self._started)

    def _started(self, parameters) -> None:
        """aiortc's receiver started (codecs known, decoder thread running)."""
        receiver = self._receiver
        self._opus_pts = frozenset(
            c.payloadType for c in parameters.codecs if c.mimeType.lower() == "audio/opus"
        )
        if self.fallback:
            return
        if not self._opus_pts:
            log.info("%s: no Opus negotiated, aiortc plays the received audio", self.label)
            self.fallback = True
            if self._on_fallback is not None:
                self._on_fallback()
            return
        self._streams = aiortc_hooks.remote_streams(receiver)
        aiortc_hooks.stop_decoder(receiver)  # we decode; the remote track stays silent

    def close(self, *, flush: bool = False) -> None:
        """Stop playout (idempotent); ``flush``: first deliver what is still buffered
        (packets that arrived but whose time has not come). aiortc's receiver is
        closed by its peer connection."""
        if self._closed:
            return
        if flush and not self.fallback:
            try:
                self.flush()
            except Exception:
                log.exception("%s: flushing the receive buffer failed", self.label)
        self._closed = True
        self._leave_ticker()

    def release(self) -> None:
        """After :meth:`close`: free the decoder (libopus context) and the buffered
        packets; statistics stay readable."""
        self.close()
        if self.decoder is not None:
            self._released_errors += self.decoder.errors
        self.decoder = None
        self._carry = None
        self._last_payload = None

    # -- packets -----------------------------------------------------------------------

    def _on_packet(self, packet, at: float | None = None) -> bool:
        """One routed RTP packet that arrived ``at`` (loop clock; ``None``: now);
        ``False`` hands it on to aiortc."""
        if self.fallback or packet.payload_type not in self._opus_pts or not aiortc_hooks.receiver_enabled(self._receiver):
            return False
        if at is None:
            at = self._loop.time()
        streams = self._streams
        ssrc = packet.ssrc
        stream = streams.get(ssrc)
        if stream is None:
            stream = streams[ssrc] = aiortc_hooks.stream_statistics(SAMPLE_RATE)
        stream.add(packet, at)
        if self._events is not None:
            self._events_at_audio = self._events()
        payload = packet.payload
        if self._closed or not payload:
            return True
        buffer = self.buffer
        buffer.push(packet.sequence_number, packet.timestamp, payload, at if self._loop_clock else self._clock(), ssrc)
        if self._timer is None:
            start = buffer.start_at
            if start is not None:
                self._schedule(start)
        return True

    def _events_instead_of_audio(self) -> bool:
        return self._events() != self._events_at_audio

    # -- playout -----------------------------------------------------------------------

    def _schedule(self, start: float) -> None:
        """Start a new playout schedule: tick 0 due at the ticker's first tick at or
        after ``start`` (``start`` itself when the ticker is idle: it starts then)."""
        offset = self._clock_offset()
        grid = self._ticker.next_due
        if grid is not None:
            grid += offset
            start = grid + math.ceil((start - grid) / FRAME_S - 1e-6) * FRAME_S
        self._frames.begin(start)
        self._tick_n = 0
        if self._timer is None:
            self._timer = _Subscription(self._ticker, self._on_ticker, start - offset)

    def _clock_offset(self) -> float:
        """Our clock minus the loop's (0 unless a test gave a clock of its own)."""
        return 0.0 if self._loop_clock else self._clock() - self._loop.time()

    def _leave_ticker(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _on_ticker(self, now: float, late: float, frames: int) -> None:
        """A tick of the shared ticker: play our slot due by now. (The ticker's own
        ``late``/``frames`` are not used: our schedule has its own stall rule,
        :data:`RESYNC_S`, and a backlog is played one slot per loop iteration.)"""
        self._play_due(now if self._loop_clock else self._clock())

    def _play_due(self, clock: float) -> None:
        """Play the slot due by ``clock`` (our clock's time), if any. After a stall
        longer than :data:`RESYNC_S`, it starts a new schedule on the ticker's grid (the
        stall becomes delay). When more slots are due (the loop was late), the next one
        is played in the next loop iteration, after the socket reads in between, as the
        per-call timer did: a datagram transport reads one packet per socket per
        iteration, so a backlog played at once would conceal packets that are there."""
        schedule = self._frames
        try:
            if self._timer is None:
                return
            n = self._tick_n
            due = schedule.start + n * FRAME_S
            if due > clock + _DUE_SLACK_S:
                return
            if clock - due > RESYNC_S:
                # the stall becomes delay: this slot is due at the ticker's last tick
                # (the grid's last point at or before now), the next one at its next
                schedule.resyncs += 1
                grid = self._ticker.next_due + self._clock_offset()
                if grid > clock + _DUE_SLACK_S:
                    grid -= math.ceil((grid - clock - _DUE_SLACK_S) / FRAME_S) * FRAME_S
                schedule.begin(grid - n * FRAME_S)
            self._tick(clock)
            if (self._timer is not None and not self._catching_up
                    and schedule.start + self._tick_n * FRAME_S <= clock + _DUE_SLACK_S):
                self._catching_up = True
                self._loop.call_soon(self._catch_up)
        except Exception:  # never lose the ticker over one tick
            self.errors += 1
            log.exception("%s: receive playout tick failed", self.label)

    def _catch_up(self) -> None:
        self._catching_up = False
        self._play_due(self._clock())

    @property
    def resyncs(self) -> int:
        return self._frames.resyncs

    @property
    def _due(self) -> float:
        """When the next tick is due (loop clock)."""
        return self._frames.due(self._tick_n)

    @_due.setter
    def _due(self, at: float) -> None:
        self._frames.begin(at)
        self._tick_n = 0

    def _tick(self, now: float | None = None) -> None:
        """Play the slot due now (``now``: our clock's time, read if not given)."""
        if self._closed:
            self._leave_ticker()
            return
        if now is None:
            now = self._clock()
        frames, n = self._frames, self._tick_n
        frames.late(n, now)  # a stalled loop restarts the schedule (the stall becomes delay)
        due = frames.due(n)
        try:
            played = self.play(due)
        except Exception:
            played = True  # keep the clock going; a sink or the decoder failed once
            self.errors += 1
            if self.errors == 1 or self.errors % 500 == 0:
                log.exception("%s: receive playout failed (%d so far)", self.label, self.errors)
        if self._closed:
            return
        if played:
            self._tick_n = n + 1
            if self._timer is None:
                self._timer = _Subscription(self._ticker, self._on_ticker, None)
        else:
            start = self.buffer.start_at
            if start is not None:
                self._schedule(max(start, now))
            else:
                self._leave_ticker()  # stopped: the next packet starts a new schedule

    def play(self, now: float) -> bool:
        """Do what the tick due at ``now`` does: deliver a frame (or, for a slot the
        sender sent no audio for, nothing); ``False`` when playout is stopped.
        Benchmarks and tests drive this directly."""
        carry = self._carry
        if carry is not None and carry.size >= self._decoder().frame:
            return self._emit_carry()
        pop = self.buffer.pop
        rate_of = self.pcm_rate
        if rate_of is not None:
            rate = rate_of()
            skip = carry is None and not rate
            if rate and rate != self._rate and carry is None:
                self._rate = rate  # (the decoder follows at its next use)
        else:
            wanted = self.pcm_wanted
            skip = wanted is not None and carry is None and not wanted()
        while True:
            kind, payload, pts = pop(now)
            if kind == DISCARD:
                if skip:
                    self.discarded_not_decoded += 1
                else:
                    self._decoder().decode(payload)
                continue
            if kind == IDLE:
                return False
            if kind == GAP:
                return True
            if skip and (kind != PLAY or _ONE_FRAME[payload[0]]):
                # nothing reads PCM: this frame's slot passes without libopus
                self.frames_not_decoded += 1
                self._deliver(NOT_DECODED, pts)
                return True
            if self._render(kind, payload, pts):
                return True

    def _decoder(self) -> OpusDecoder:
        decoder = self.decoder
        if decoder is None:
            decoder = self.decoder = OpusDecoder(rate=self._rate)
        elif decoder.rate != self._rate and not decoder.set_rate(self._rate):
            self._rate = decoder.rate  # (PyAV: 48 kHz only)
        return decoder

    def _render(self, kind: int, payload: bytes | None, pts: int | None) -> bool:
        """Decode (or conceal) one slot and deliver a frame; ``False`` if less than a
        frame is available yet (packets shorter than 20 ms)."""
        decoder = self._decoder()
        if kind == PLAY:
            self._last_payload = payload
            pcm = decoder.decode(payload)
            if pcm is None:
                pcm = decoder.conceal()
        elif kind == CONCEAL and decoder.fec:
            # a lost packet: the next one, if here already, may carry it as in-band FEC
            buffer = self.buffer
            following = buffer.peek(pts + FRAME_SAMPLES)
            pcm = None if following is None else decoder.recover(following)
            if pcm is not None:
                buffer.stats.frames_fec += 1
            else:
                pcm = decoder.conceal()
                if following is None and not self._fec_delay and self._last_payload is not None \
                        and libopus.has_fec(self._last_payload):
                    # The stream carries FEC, but the next packet comes only as its slot
                    # is due: keep one more frame buffered from now on, so it is here.
                    self._fec_delay = True
                    buffer.min_delay_s = min(max(buffer.min_delay_s, FEC_MIN_DELAY_S), buffer.max_delay_s)
        else:
            pcm = decoder.conceal()
        carry = self._carry
        frame = decoder.frame
        if carry is None and pcm.size == frame:
            self._deliver(pcm, pts)
            return True
        # Packets of another duration than 20 ms: cut the audio into frames.
        if carry is not None:
            pcm = np.concatenate([carry, pcm])
            pts = self._carry_pts
        self._carry, self._carry_pts = pcm, pts
        if pcm.size >= frame:
            return self._emit_carry()
        return False

    def flush(self) -> int:
        """Deliver what is still buffered now (the call is ending); returns frames."""
        frames = 0
        for kind, payload, pts in self.buffer.drain():
            if kind != GAP:
                frames += self._render(kind, payload, pts)
        while self._carry is not None and self._carry.size >= self._decoder().frame:
            frames += self._emit_carry()
        return frames

    def _emit_carry(self) -> bool:
        carry, pts = self._carry, self._carry_pts
        frame = self._decoder().frame
        rest = carry[frame:]
        if rest.size:
            self._carry = rest
            self._carry_pts = None if pts is None else pts + FRAME_SAMPLES  # (stream units: 48 kHz)
        else:
            self._carry = self._carry_pts = None
        self._deliver(carry[:frame], pts)
        return True

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> dict:
        out = self.buffer.stats.as_dict()
        out["decode_errors"] = self._released_errors + (self.decoder.errors if self.decoder is not None else 0)
        out["resyncs"] = self.resyncs
        return out
