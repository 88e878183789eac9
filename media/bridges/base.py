"""What every bot bridge shares: attach to a call, stream both ways, marks, clear, stop.

A bridge connects one call's :class:`~media.peer.MediaPeer` to a voice bot speaking some
telephony wire protocol (Twilio Media Streams, raw PCM over WebSocket, Asterisk
AudioSocket), playing the *platform* side so the bot attaches unchanged::

    bridge = make_bridge("twilio", "wss://bot.example/ws")
    await bridge.start(peer, call_id=call.id, parameters={"from_number": ...})
    reason = await bridge.closed          # the bot hung up, went idle, or the link broke
    ...
    await bridge.stop("user hung up")     # the caller hung up: protocol stop, then close

Data path (all on the event loop, nothing awaits on the media path):

* **caller → bot**: a :class:`~media.frames.Sink` on the peer (:attr:`Bridge.sink`). Its
  ``write`` downmixes, resamples 48 kHz → the wire rate (:mod:`.resample`), encodes,
  and appends to a bounded outbox (oldest audio dropped and counted when full). A sender
  task drains the outbox to the socket, so a bot that stops reading never stalls the
  receive pump.
* **bot → caller**: :class:`BotAudio`, a :class:`~media.frames.Source` played on the
  peer (:attr:`Bridge.playback`). Bot audio is decoded on arrival into a FIFO at the
  wire rate; the paced outbound track reads one 20 ms frame at a time and gets
  silence when the FIFO is empty, so the caller hears silence while the bot thinks or
  stalls. Marks sit in the FIFO by sample position and are echoed when the track has
  played everything queued before them; ``clear`` empties the FIFO (the very next frame
  is silence) and echoes pending marks at once, in order.
* **DTMF**: ``peer.on_dtmf`` digits go to the bot as the protocol's DTMF message.

Lifecycle: :meth:`Bridge.start` raises :class:`BridgeUnavailable` (with the reason) when
the bot cannot be reached within ``connect_timeout_s``. :attr:`Bridge.closed` resolves
with a reason string when the bridge ends for any reason: the bot hung up (socket
closed or the protocol's hang-up message), the bot sent nothing for ``idle_timeout_s``
(``"bot idle"``), the connection broke, the call's media ended, or :meth:`Bridge.stop`.
After the bot hangs up, audio it already sent still plays out (``playback.done``
resolves after it); on stop/idle/error it is dropped.

If something else calls ``peer.clear()`` (dropping the bridge's playback), the bridge
queues a new playback of the same source when the bot next sends audio.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import functools
import logging
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import frames as _frames
from .. import libopus
from ..frames import FRAME_MS, FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from .resample import Decimator, Interpolator

if TYPE_CHECKING:  # pragma: no cover
    from ..opus import OpusSettings
    from ..dtmf import DtmfEvent
    from ..peer import MediaPeer
    from ..track import Playback

__all__ = [
    "BotAudio",
    "BotProtocolError",
    "Bridge",
    "BridgeError",
    "BridgeStats",
    "BridgeUnavailable",
    "LatencyHistogram",
    "SUPPORTED_RATES",
]

log = logging.getLogger(__name__)

#: Wire rates the bridges resample to/from (integer divisors of 48 kHz).
SUPPORTED_RATES = (8000, 12000, 16000, 24000, 48000)


def one_of(name: str, value: Any, allowed) -> int:
    """``value`` if it is one of the integers ``allowed``, else ``ValueError`` naming the
    option (an integral float from JSON, ``16000.0``, is refused too: every count and
    header field made from it would be a float)."""
    if type(value) is not int or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


class BridgeError(RuntimeError):
    """Base class of bridge errors."""


class BotProtocolError(BridgeError):
    """The bot broke the protocol in a way that ends the session (``closed`` resolves
    with ``"bot protocol error: …"``)."""


class BridgeUnavailable(BridgeError):
    """The bot could not be reached (refused, timed out, rejected the handshake).

    ``str(err)`` is a sentence naming the bot and why, e.g. ``"bot at
    ws://127.0.0.1:9/ws unreachable: connection refused"``; ``reason`` is the why."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(target, reason)
        self.target = target
        self.reason = reason

    def __str__(self) -> str:
        return f"bot at {self.target} unreachable: {self.reason}"


# -- statistics --------------------------------------------------------------------------


class LatencyHistogram:
    """Latency histogram with bins that widen with the value: 10 µs up to 1 ms, 0.1 ms
    up to 10 ms, 1 ms up to 100 ms, then one overflow bin (281 bins, 1.1 kB: a bridge
    keeps three). Recording is an index increment; percentiles are exact to the bin
    (its centre): within 5 µs below 1 ms, within 5 % above."""

    BINS = 280  # + the overflow bin

    def __init__(self) -> None:
        self._hist = array("I", bytes(4 * (self.BINS + 1)))
        self.count = 0
        self.max_ms = 0.0
        self._sum_ms = 0.0

    def add(self, seconds: float) -> None:
        ms = seconds * 1000.0
        if ms < 1.0:
            b = int(ms * 100.0) if ms > 0.0 else 0
        elif ms < 10.0:
            b = 90 + int(ms * 10.0)  # 100 + (ms - 1) / 0.1
        elif ms < 100.0:
            b = 180 + int(ms)  # 190 + (ms - 10)
        else:
            b = self.BINS
        self._hist[b] += 1
        self.count += 1
        self._sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    @staticmethod
    def _centre_ms(b: int) -> float:
        if b < 100:
            return (b + 0.5) * 0.01
        if b < 190:
            return 1.0 + (b - 100 + 0.5) * 0.1
        return 10.0 + (b - 190 + 0.5)

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile in ms (bin centre), ``None`` when empty; values past
        the last bin report :attr:`max_ms`."""
        if not self.count:
            return None
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for b, n in enumerate(self._hist):
            seen += n
            if seen >= rank:
                break
        if b >= self.BINS:
            return round(self.max_ms, 3)
        return round(self._centre_ms(b), 3)

    @property
    def mean_ms(self) -> float | None:
        return round(self._sum_ms / self.count, 3) if self.count else None

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "p99": self.percentile(99),
            "max": round(self.max_ms, 3) if self.count else None,
        }


@dataclass(slots=True)
class BridgeStats:
    #: Caller frames (20 ms) handed to the bot's socket / dropped because the outbox
    #: was full (a message of several frames counts them all).
    frames_to_bot: int = 0
    frames_dropped: int = 0
    #: Largest outbox backlog seen, in frames.
    outbox_high_water: int = 0
    dtmf_to_bot: int = 0
    #: Messages (any kind) and audio received from the bot.
    messages_from_bot: int = 0
    audio_from_bot_s: float = 0.0
    #: Bot audio dropped: flushed by ``clear`` / over the buffer cap.
    audio_cleared_s: float = 0.0
    audio_overflow_s: float = 0.0
    #: 20 ms frames handed to the outbound track with bot audio / as silence.
    frames_played: int = 0
    silence_frames: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    #: Loop time (``loop.time()``) the last ``clear`` was applied.
    last_clear_at: float | None = None
    #: Messages from the bot that were malformed or of an unknown kind (ignored).
    ignored_messages: int = 0
    #: Caller sink ``write`` → the frame's bytes written to the bot's socket.
    to_bot: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: Bot audio message received → decoded and queued.
    decode: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: Bot audio message received → its first sample handed to the outbound track
    #: (includes waiting for the next 20 ms frame slot and any queued audio ahead).
    to_user: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_dict(self) -> dict:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, LatencyHistogram):
                out[name + "_ms"] = value.as_dict()
            elif isinstance(value, float):
                out[name] = round(value, 3)
            else:
                out[name] = value
        return out


# -- bot → caller ------------------------------------------------------------------------


class BotAudio:
    """The bot's voice as a 48 kHz mono :class:`~media.frames.Source`, with Twilio-style
    mark and clear semantics.

    ``push`` appends decoded int16 audio at the wire rate; ``mark`` queues a mark after
    it; ``clear`` drops all of it. ``read`` (called by the paced track once per 20 ms)
    takes one frame's worth, resamples it to 48 kHz and returns it (silence when there
    is nothing), and first echoes (``on_mark(name)``) every mark whose audio has been
    handed out completely. Positions are counted in wire samples, so timing is exact.

    With ``opus`` (the outbound track's settings, for a track that sends pre-encoded
    packets), a bot slower than 48 kHz is encoded at its own rate by a libopus encoder
    here (16 kHz: ~53 µs a frame against ~68 µs at 48 kHz; nothing is lost, the bot's
    audio has nothing above its Nyquist frequency) and each frame's payload is left in
    :attr:`packet` for the track to send. The 48 kHz PCM is then rendered only while
    ``pcm_wanted()`` says something reads it (the track's taps: a recording, a meter);
    otherwise :meth:`read` returns a shared read-only silent frame and skips the
    resampler.
    """

    sample_rate = SAMPLE_RATE
    channels = 1

    def __init__(
        self,
        wire_rate: int,
        *,
        on_mark: Callable[[str], None],
        stats: BridgeStats,
        max_buffer_s: float = 600.0,
        clock: Callable[[], float] = time.perf_counter,
        opus: OpusSettings | None = None,
        pcm_wanted: Callable[[], bool] | None = None,
    ) -> None:
        if wire_rate not in SUPPORTED_RATES:
            raise ValueError(f"unsupported wire rate {wire_rate} (use one of {SUPPORTED_RATES})")
        #: The Opus payload of the frame :meth:`read` returned last, when this source
        #: encodes (see the class docstring); ``None``: the track encodes the PCM.
        self.packet: bytes | None = None
        self._encoder = None
        if opus is not None and wire_rate != SAMPLE_RATE and libopus.available():
            try:
                self._encoder = libopus.Encoder(wire_rate, 1, application=opus.application,
                                                bitrate=opus.bitrate, complexity=opus.complexity,
                                                fec_loss=opus.fec_loss)
            except libopus.OpusError:  # (the track encodes, as without settings)
                self._encoder = None
        self._pcm_wanted = pcm_wanted
        self._rendering = True  # the resampler was fed the last frame
        self._silent_encoded = 0  # silent frames encoded since the audio ran out
        self.wire_rate = wire_rate
        self._frame = wire_rate * FRAME_MS // 1000
        self._interp = Interpolator(SAMPLE_RATE // wire_rate) if wire_rate != SAMPLE_RATE else None
        self._on_mark = on_mark
        self._stats = stats
        self._clock = clock
        self._max = int(max_buffer_s * wire_rate)
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._head = 0  # samples of _chunks[0] already consumed
        self.queued = 0  # wire samples ever queued (cleared ones included): positions
        self.consumed = 0  # wire samples handed out or cleared
        self._marks: collections.deque[tuple[int, str]] = collections.deque()
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque()
        self._in = np.zeros(self._frame, dtype=PCM_DTYPE)
        # The shared silent frame (by identity: "nothing to say now, not finished"):
        # the track sends its cached silence packet instead of encoding zeros.
        self._silence = _frames.SILENT_FRAME
        self._playing = False  # the last frame read carried bot audio
        self._ending = False  # play out what is queued, then end
        self._ended = False
        #: Set when the track dropped this source (``close``): the bridge re-queues it.
        self.detached = False
        self._overflow_warned = False

    # -- bot side -----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Wire samples queued and not yet played."""
        return self.queued - self.consumed

    @property
    def buffered_s(self) -> float:
        return self.buffered / self.wire_rate

    def push(self, pcm: np.ndarray, received_at: float | None = None) -> None:
        """Queue int16 audio at the wire rate (the array is kept: pass a fresh one)."""
        n = pcm.size
        if n == 0 or self._ended or self._ending:
            return
        if self.buffered + n > self._max:
            self._stats.audio_overflow_s += n / self.wire_rate
            if not self._overflow_warned:
                self._overflow_warned = True
                log.warning("bot audio buffer full (%.0f s): dropping audio", self._max / self.wire_rate)
            return
        if received_at is not None:
            self._arrivals.append((self.queued, received_at))
        self._chunks.append(pcm)
        self.queued += n
        self._stats.audio_from_bot_s += n / self.wire_rate

    def mark(self, name: str) -> None:
        """Queue a mark after the audio pushed so far. It is echoed at once when nothing
        is queued or still playing and no earlier mark is pending; otherwise by the
        ``read`` after its audio's last frame (marks are always echoed in order)."""
        self._stats.marks_received += 1
        if self.buffered == 0 and not self._marks and not self._playing:
            self._echo(name)
        else:
            self._marks.append((self.queued, name))

    def clear(self) -> None:
        """Drop all queued audio (the next frame read is silence) and echo every pending
        mark now, in order."""
        self._stats.clears += 1
        try:
            self._stats.last_clear_at = asyncio.get_running_loop().time()
        except RuntimeError:  # pragma: no cover - not on a loop
            pass
        self._drop()

    def _drop(self) -> None:
        dropped = self.buffered
        if dropped:
            self._stats.audio_cleared_s += dropped / self.wire_rate
        self._chunks.clear()
        self._head = 0
        self._playing = False
        self.consumed = self.queued
        self._arrivals.clear()
        marks = self._marks
        while marks:
            self._echo(marks.popleft()[1])

    def end(self, *, drain: bool) -> None:
        """The bridge is over: play out what is queued first (``drain``) or drop it; then
        ``read`` returns ``None`` and the playback ends. Marks are no longer echoed."""
        self._on_mark = _ignore_mark
        if not drain:
            self._drop()
        self._ending = True

    def _echo(self, name: str) -> None:
        self._stats.marks_echoed += 1
        self._on_mark(name)

    # -- track side ---------------------------------------------------------------------

    def read(self) -> np.ndarray | None:
        self.packet = None
        if self._ended:
            return None
        consumed = self.consumed
        marks = self._marks
        while marks and marks[0][0] <= consumed:
            self._echo(marks.popleft()[1])
        avail = self.queued - consumed
        stats = self._stats
        if avail == 0:
            self._playing = False
            interp = self._interp
            encoder = self._encoder
            if self._ending and (encoder is not None or interp is None or interp.quiet):
                self._ended = True
                return None
            stats.silence_frames += 1
            if encoder is not None:
                if self._silent_encoded < _FLUSH_FRAMES:
                    # a few frames of silence through this encoder (its lookahead holds
                    # the end of the audio); then the track's cached silence packet
                    self._silent_encoded += 1
                    self._in.fill(0)
                    return self._encoded(self._in)
                self._rendering = False
                return self._silence
            if interp is None or interp.quiet:
                return self._silence
            self._in.fill(0)  # let the filter ring out: no click
            return interp.process(self._in)
        n = self._frame
        take = avail if avail < n else n
        buf = self._in
        filled = 0
        chunks = self._chunks
        while filled < take:
            chunk = chunks[0]
            k = min(take - filled, chunk.size - self._head)
            buf[filled : filled + k] = chunk[self._head : self._head + k]
            filled += k
            self._head += k
            if self._head == chunk.size:
                chunks.popleft()
                self._head = 0
        if take < n:
            buf[take:] = 0
        self.consumed = consumed = consumed + take
        self._playing = True
        stats.frames_played += 1
        arrivals = self._arrivals
        if arrivals:
            now = self._clock()
            while arrivals and arrivals[0][0] < consumed:
                stats.to_user.add(now - arrivals.popleft()[1])
        if self._encoder is not None:
            self._silent_encoded = 0
            return self._encoded(buf)
        if self._interp is None:
            return buf
        return self._interp.process(buf)

    def _encoded(self, buf: np.ndarray) -> np.ndarray:
        """Encode the wire-rate frame into :attr:`packet`; its 48 kHz PCM if read."""
        self.packet = self._encoder.encode(buf)
        wanted = self._pcm_wanted
        if wanted is not None and not wanted():
            self._rendering = False
            return _UNRENDERED
        interp = self._interp
        if not self._rendering:  # (its history is from before: start clean)
            interp.reset()
            self._rendering = True
        return interp.process(buf)

    def close(self) -> None:
        """Called by the play queue when the playback ends or is cleared from outside."""
        if not self._ended and not self._ending:
            self.detached = True
            self._drop()


def _ignore_mark(name: str) -> None:
    pass


#: Silent frames :class:`BotAudio` still encodes after its audio runs out (100 ms).
_FLUSH_FRAMES = 5
#: What :meth:`BotAudio.read` returns while nothing reads the PCM of frames it encodes.
_UNRENDERED = np.zeros(FRAME_SAMPLES, dtype=PCM_DTYPE)
_UNRENDERED.flags.writeable = False


# -- caller → bot ------------------------------------------------------------------------


class _Outbox:
    """Items waiting for the sender task. Audio items (``frames`` 20 ms frames each) are
    bounded to ``limit`` frames (the oldest audio is dropped when full); control items
    (DTMF, mark echoes, stop) are never dropped."""

    __slots__ = ("_items", "_audio", "_limit", "_frames", "_wake", "stats")

    def __init__(self, limit: int, stats: BridgeStats, frames: int = 1) -> None:
        self._items: collections.deque[tuple] = collections.deque()
        self._audio = 0  # audio items queued
        self._limit = max(1, limit // frames)
        self._frames = frames
        self._wake = asyncio.Event()
        self.stats = stats

    def __len__(self) -> int:
        return len(self._items)

    def put_audio(self, item: tuple) -> None:
        items = self._items
        if self._audio >= self._limit:
            if items[0][0] == "audio":
                items.popleft()
            else:  # rare: a control item is at the head
                for i, queued in enumerate(items):
                    if queued[0] == "audio":
                        del items[i]
                        break
            self._audio -= 1
            self.stats.frames_dropped += self._frames
        items.append(item)
        self._audio += 1
        queued = self._audio * self._frames
        if queued > self.stats.outbox_high_water:
            self.stats.outbox_high_water = queued
        self._wake.set()

    def put(self, item: tuple) -> None:
        self._items.append(item)
        self._wake.set()

    async def get(self) -> tuple:
        items = self._items
        while not items:
            self._wake.clear()
            await self._wake.wait()
        item = items.popleft()
        if item[0] == "audio":
            self._audio -= 1
        return item


class _CallerTap:
    """The sink on the peer: caller audio → wire-rate int16 → ``encode`` → outbox.

    It asks for the caller's audio at the wire rate (:attr:`pcm_rate`: libopus then
    decodes straight to it, no resampling here) and takes any rate that is a multiple
    of it (decimated: 48 kHz when another reader wants that)."""

    def __init__(self, bridge: Bridge, wire_rate: int) -> None:
        self._bridge = bridge
        self.pcm_rate = wire_rate
        self._wire_frame = wire_rate * FRAME_SAMPLES // SAMPLE_RATE
        self._decimators: dict[int, Decimator] = {}
        self._held: list[np.ndarray] = []  # frames waiting for the rest of their message
        self._mono = np.empty(FRAME_SAMPLES, dtype=np.int32)
        self._other: Any = None  # PyAV fallback for other input
        self.frames = 0
        self.closed = False

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self.closed:
            return
        t = time.perf_counter()
        if sample_rate == SAMPLE_RATE and pcm.size == FRAME_SAMPLES * channels and channels != 1:
            if channels != 2:
                return
            mono = self._mono
            np.add(pcm[0::2], pcm[1::2], out=mono, dtype=np.int32)
            np.right_shift(mono, 1, out=mono)
            pcm, channels = mono.astype(PCM_DTYPE), 1
        # 20 ms mono at the wire rate (decoded at it) or at a multiple of it: to the bot
        factor, rest = divmod(sample_rate, self.pcm_rate)
        if channels == 1 and factor and not rest and pcm.size == self._wire_frame * factor:
            self._queue(pcm if factor == 1 else self._decimator(factor).process(pcm), t)
        else:
            self._write_other(pcm, sample_rate, channels)

    def _decimator(self, factor: int) -> Decimator:
        dec = self._decimators.get(factor)
        if dec is None:
            dec = self._decimators[factor] = Decimator(factor)
        return dec

    def _emit(self, pcm48: np.ndarray, t: float) -> None:
        factor = SAMPLE_RATE // self.pcm_rate
        self._queue(self._decimator(factor).process(pcm48) if factor > 1 else np.array(pcm48, dtype=PCM_DTYPE), t)

    def _queue(self, wire: np.ndarray, t: float) -> None:
        """One 20 ms frame at the wire rate; a message of ``frames_per_message`` of them
        to the outbox (its latency counted from its last frame)."""
        bridge = self._bridge
        per_message = bridge.frames_per_message
        if per_message > 1:
            held = self._held
            held.append(wire)  # (a fresh array: the decoder's or the decimator's)
            if len(held) < per_message:
                return
            wire = np.concatenate(held)
            held.clear()
        index = self.frames
        self.frames += 1
        bridge._outbox.put_audio(("audio", bridge._encode_audio(wire), index, t))

    def _write_other(self, pcm: np.ndarray, sample_rate: int, channels: int) -> None:
        # Not what a MediaPeer delivers, but keep working: convert to 20 ms 48 kHz mono
        # frames with PyAV first.
        from ..mix import ResampledSink

        if self._other is None:
            self._other = ResampledSink(_FrameSink(self), sample_rate=SAMPLE_RATE, channels=1)
        self._other.write(pcm, sample_rate, channels)

    def close(self) -> None:
        self.closed = True


class _FrameSink:
    def __init__(self, tap: _CallerTap) -> None:
        self._tap = tap

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        self._tap._emit(pcm, time.perf_counter())

    def close(self) -> None:
        pass


# -- the bridge --------------------------------------------------------------------------


class Bridge(abc.ABC):
    """One call ⇄ one bot connection. Subclasses implement the wire protocol.

    Args:
        url: where the bot listens (``ws://``/``wss://`` or ``tcp://host:port``).
        connect_timeout_s: :meth:`start` gives up (``BridgeUnavailable``) after this.
        idle_timeout_s: the bot sent nothing for this long → ``closed`` resolves
            ``"bot idle"``; ``None`` disables it.
        close_timeout_s: bound on flushing the stop message and closing the socket.
        outbox_frames: caller frames buffered while the bot's socket is slow (20 ms
            each); beyond it the oldest are dropped (``stats.frames_dropped``).
        max_buffer_s: bot audio buffered ahead of playout (bots send faster than real
            time); more is dropped (``stats.audio_overflow_s``). Twilio's cap is ~10 min.
    """

    protocol: str = ""
    #: Sample rate on the wire (set by subclasses, possibly per instance).
    wire_rate: int = 8000
    #: 20 ms frames of the caller's audio per message to the bot (protocols that take
    #: longer messages set it per instance).
    frames_per_message: int = 1

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float | None = 60.0,
        close_timeout_s: float = 2.0,
        outbox_frames: int = 50,
        max_buffer_s: float = 600.0,
    ) -> None:
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0 or None")
        if outbox_frames < 1:
            raise ValueError("outbox_frames must be >= 1")
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.close_timeout_s = close_timeout_s
        self.outbox_frames = outbox_frames
        self.max_buffer_s = max_buffer_s
        self.stats = BridgeStats()
        self.call_id: str | None = None
        self.parameters: dict[str, Any] = {}
        self.peer: MediaPeer | None = None
        self.source: BotAudio | None = None
        self.sink: _CallerTap | None = None
        self.playback: Playback | None = None
        #: ``"bot"``, ``"idle"``, ``"error"`` or ``"local"`` (stop / media ended) once closed.
        self.ended_by: str | None = None
        self._closed: asyncio.Future[str] | None = None
        self._outbox: _Outbox | None = None
        self._tasks: list[asyncio.Task] = []
        self._closer: asyncio.Task | None = None
        self._unsubscribe_dtmf: Callable[[], None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._stop_sent: asyncio.Event | None = None
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The options it was made with (:func:`media.bridges.make_bridge` sets them).
        self.options: dict[str, Any] | None = None

    def __reduce__(self):
        """Pickled (for a media worker process) as what it was made from: an unstarted
        bridge of the same kind, URL and options."""
        if self._started or self.options is None:
            raise TypeError("only an unstarted bridge made by make_bridge() can be sent to a media worker")
        return (functools.partial(type(self), self.url, **self.options), ())

    # -- public API ---------------------------------------------------------------------

    @property
    def closed(self) -> asyncio.Future[str]:
        """Resolves with the reason the bridge ended (never raises)."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    @property
    def running(self) -> bool:
        return self._started and not self.closed.done()

    @property
    def target(self) -> str:
        """The bot's address for messages (no query string: it may carry tokens)."""
        return self.url.split("?", 1)[0]

    async def start(self, peer: MediaPeer, *, call_id: str, parameters: dict | None = None) -> None:
        """Connect to the bot, do the protocol's opening, then attach to ``peer``.

        Raises:
            BridgeUnavailable: the bot was not reachable within ``connect_timeout_s``
                (refused, timed out, handshake rejected).
        """
        if self._started:
            raise RuntimeError("a bridge is started once")
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
        closed = self.closed
        self.call_id = call_id
        self.parameters = dict(parameters or {})
        self.peer = peer
        self._outbox = _Outbox(self.outbox_frames, self.stats, self.frames_per_message)
        self._stop_sent = asyncio.Event()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._connect()
                await self._open()
        except BaseException as exc:
            await self._abort_connect()
            reason = _connect_reason(exc, self.connect_timeout_s)
            if reason is None:
                if not closed.done():
                    closed.set_result("start cancelled")
                raise
            if not closed.done():
                self.ended_by = "error"
                closed.set_result(f"unavailable: {reason}")
            raise BridgeUnavailable(self.target, reason) from exc
        if closed.done():  # stop() was called while connecting
            await self._abort_connect()
            return
        log.info("%s bridge for call %s connected to %s", self.protocol, call_id, self.target)
        self._last_rx = loop.time()
        # A track that sends pre-encoded packets lets the bot's audio be encoded at its
        # own rate, and rendered at 48 kHz only for the track's taps.
        track = getattr(peer, "outbound", None)
        native = track is not None and getattr(track, "passthrough", False) and track.opus is not None
        self.source = BotAudio(
            self.wire_rate, on_mark=self._echo_mark, stats=self.stats, max_buffer_s=self.max_buffer_s,
            opus=track.opus if native else None,
            pcm_wanted=(lambda: bool(track.sinks)) if native else None,
        )
        self.sink = _CallerTap(self, self.wire_rate)
        self.playback = peer.play(self.source)
        peer.add_sink(self.sink)
        self._unsubscribe_dtmf = peer.on_dtmf(self._on_dtmf)
        self._tasks = [
            asyncio.ensure_future(self._send_loop()),
            asyncio.ensure_future(self._receive_guard()),
        ]
        if self.idle_timeout_s is not None:
            self._idle_handle = loop.call_at(self._last_rx + self.idle_timeout_s, self._idle_check)
        peer.ended.add_done_callback(self._on_media_ended)

    async def stop(self, reason: str = "user hung up") -> str:
        """The caller hung up (or the gateway ends the bridge): send the protocol's stop,
        close the connection (bounded by ``close_timeout_s``); returns the close reason
        (an earlier one if the bridge had already ended)."""
        if not self._started:
            self._started = True
            if not self.closed.done():
                self.ended_by = "local"
                self.closed.set_result(reason)
            return self.closed.result()
        self._begin_close(reason, by="local", send_stop=True, drain=False)
        if self._closer is not None:
            await asyncio.shield(self._closer)
        return self.closed.result()

    # -- subclass interface ---------------------------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Open the connection (inside the connect timeout)."""

    async def _open(self) -> None:
        """Send the protocol's opening messages (inside the connect timeout)."""

    @abc.abstractmethod
    def _encode_audio(self, pcm: np.ndarray) -> Any:
        """Wire-rate int16 frame → what ``_send_audio`` needs (called on the RTP path)."""

    @abc.abstractmethod
    async def _send_audio(self, payload: Any, index: int) -> None:
        """Write one caller frame (``index``: 0-based frame number since start)."""

    @abc.abstractmethod
    async def _send_dtmf(self, event: DtmfEvent) -> None: ...

    async def _send_mark(self, name: str) -> None:
        """Echo a mark (protocols without marks never get here)."""

    @abc.abstractmethod
    async def _send_stop(self, reason: str) -> None:
        """The protocol's stop/hang-up message."""

    @abc.abstractmethod
    async def _receive(self) -> str:
        """Read from the bot until it hangs up; handle each message (calling
        :meth:`_touch` for every one); return the hang-up reason. Exceptions mean the
        connection broke."""

    @abc.abstractmethod
    async def _close_transport(self) -> None:
        """Close the connection (bounded by the caller)."""

    async def _abort_connect(self) -> None:
        """Release whatever a failed ``_connect``/``_open`` left open."""
        try:
            await asyncio.wait_for(self._close_transport(), self.close_timeout_s)
        except Exception:  # pragma: no cover - best effort
            pass

    # -- helpers for subclasses -----------------------------------------------------------

    def _touch(self) -> None:
        """The bot sent something (resets the idle timer)."""
        self._last_rx = self._loop.time()
        self.stats.messages_from_bot += 1

    def _bot_audio(self, pcm: np.ndarray, received_at: float) -> None:
        source = self.source
        if source.detached and self.running:
            source.detached = False
            self.playback = self.peer.play(source)
        source.push(pcm, received_at)
        self.stats.decode.add(time.perf_counter() - received_at)

    def _bot_mark(self, name: str) -> None:
        self.source.mark(name)

    def _bot_clear(self) -> None:
        self.source.clear()

    def _bot_hangup(self, reason: str) -> None:
        """The bot ended the call with a protocol message."""
        self._begin_close(reason, by="bot", send_stop=False, drain=True)

    # -- internals ----------------------------------------------------------------------

    def _echo_mark(self, name: str) -> None:
        if self._outbox is not None and self.running:
            self._outbox.put(("mark", name))

    def _on_dtmf(self, event: DtmfEvent) -> None:
        if self.running:
            self._outbox.put(("dtmf", event))

    def _on_media_ended(self, fut: asyncio.Future) -> None:
        reason = fut.result() if not fut.cancelled() else "cancelled"
        self._begin_close(f"call media ended ({reason})", by="local", send_stop=True, drain=False)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if not self.running:
            return
        due = self._last_rx + self.idle_timeout_s
        now = self._loop.time()
        if now >= due:
            log.warning("%s bridge for call %s: bot idle for %.1f s", self.protocol, self.call_id, self.idle_timeout_s)
            self._begin_close("bot idle", by="idle", send_stop=True, drain=False)
        else:
            self._idle_handle = self._loop.call_at(due, self._idle_check)

    async def _send_loop(self) -> None:
        try:
            await self._send_items()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s bridge for call %s: send failed: %r", self.protocol, self.call_id, exc)
            self._begin_close(f"bot connection lost: {exc or type(exc).__name__}", by="error", send_stop=False, drain=True)

    async def _send_items(self) -> None:
        outbox = self._outbox
        stats = self.stats
        clock = time.perf_counter
        per_message = self.frames_per_message
        while True:
            item = await outbox.get()
            kind = item[0]
            if kind == "audio":
                await self._send_audio(item[1], item[2])
                stats.frames_to_bot += per_message
                stats.to_bot.add(clock() - item[3])
            elif kind == "mark":
                await self._send_mark(item[1])
            elif kind == "dtmf":
                await self._send_dtmf(item[1])
                stats.dtmf_to_bot += 1
            elif kind == "stop":
                await self._send_stop(item[1])
                self._stop_sent.set()
                return

    async def _receive_guard(self) -> None:
        try:
            reason = await self._receive()
        except asyncio.CancelledError:
            raise
        except BotProtocolError as exc:
            log.warning("%s bridge for call %s: %s", self.protocol, self.call_id, exc)
            self._begin_close(f"bot protocol error: {exc}", by="error", send_stop=False, drain=True)
            return
        except Exception as exc:
            log.warning("%s bridge for call %s: connection lost: %r", self.protocol, self.call_id, exc)
            self._begin_close(f"bot connection lost: {exc or type(exc).__name__}", by="error", send_stop=False, drain=True)
            return
        self._begin_close(reason, by="bot", send_stop=False, drain=True)

    def _begin_close(self, reason: str, *, by: str, send_stop: bool, drain: bool) -> None:
        closed = self.closed
        if closed.done():
            return
        self.ended_by = by
        closed.set_result(reason)
        log.info("%s bridge for call %s closed: %s", self.protocol, self.call_id, reason)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        peer = self.peer
        if self.sink is not None:
            self.sink.close()
            if peer is not None:
                peer.remove_sink(self.sink)
        if self._unsubscribe_dtmf is not None:
            self._unsubscribe_dtmf()
            self._unsubscribe_dtmf = None
        if self.source is not None:
            self.source.end(drain=drain)
        if peer is not None:
            peer.ended.remove_done_callback(self._on_media_ended)
        if send_stop and self._outbox is not None:
            self._outbox.put(("stop", reason))
        else:
            self._stop_sent.set()
        self._closer = asyncio.ensure_future(self._close(send_stop))

    async def _close(self, send_stop: bool) -> None:
        sender = self._tasks[0] if self._tasks else None
        if send_stop and sender is not None and not sender.done():
            try:
                await asyncio.wait_for(self._stop_sent.wait(), self.close_timeout_s)
            except asyncio.TimeoutError:
                log.warning("%s bridge for call %s: stop not sent within %.1f s", self.protocol, self.call_id, self.close_timeout_s)
        if sender is not None and sender is not asyncio.current_task():
            sender.cancel()
        # Close while the receiver still runs: a WebSocket close handshake needs it
        # (aiohttp's close() takes over the receive loop and waits for the bot's reply).
        try:
            await asyncio.wait_for(self._close_transport(), self.close_timeout_s)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - best effort
            log.debug("%s bridge: close: %r", self.protocol, exc)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _connect_reason(exc: BaseException, timeout_s: float) -> str | None:
    """A short reason for a failed connect, or ``None`` for a real cancellation."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, asyncio.CancelledError):
        return None
    if isinstance(exc, BridgeUnavailable):
        return exc.reason
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        os_exc = exc
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, OSError):
            os_exc = inner
        if isinstance(os_exc, ConnectionRefusedError):
            return "connection refused"
        return os_exc.strerror or str(os_exc) or type(os_exc).__name__
    if isinstance(exc, Exception):
        return str(exc) or type(exc).__name__
    return None
