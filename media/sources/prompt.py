"""Prompt cache: decode a file once, play it to any number of calls without copies, and
pre-encode it to Opus once when it is played to many.

A :class:`Prompt` is a file decoded to 48 kHz mono int16, kept as one read-only numpy
array (padded to whole 20 ms frames plus one silent frame). A :class:`PromptSource`
plays it: :meth:`PromptSource.read` returns read-only *views* into that array, so a
thousand concurrent playbacks share one copy and read it without allocating.

Pre-encoding: :meth:`Prompt.encode` runs libopus over the prompt once (20 ms packets,
:func:`media.opus.encode_pcm`). A source of an encoded prompt also exposes, after each
``read()``, the Opus payload of that frame as ``source.packet``; the outbound track
(:class:`media.track.OutboundAudioTrack`) then sends that packet as it is, so playing
the prompt costs no encoding at all. The PCM frames are still there for outbound taps
(recordings) and for anything that needs samples (a mixer). An encoded prompt plays one
frame longer than its PCM (the encoder's lookahead flushed into a last packet), which
keeps its tail.

:class:`PromptCache` keys prompts by resolved path, size and mtime (an edited file is
decoded again), evicts least recently used prompts beyond ``max_bytes``, and encodes a
prompt in a worker thread once it has been requested ``encode_after`` times (or
up front with ``preload(path, encode=True)``). Playbacks started before the packets
are ready play PCM (encoded per call); later ones get packets.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from ..opus import PROMPT_SETTINGS, OpusSettings, encode_pcm
from .file import FileSource

__all__ = ["Prompt", "PromptCache", "PromptSource"]

log = logging.getLogger(__name__)


class Prompt:
    """A decoded prompt (shared, read-only). Build with :meth:`from_file` or
    :meth:`from_pcm`; ``encode()`` adds its Opus packets."""

    def __init__(self, pcm: np.ndarray, *, name: str = "prompt", samples: int | None = None) -> None:
        pcm = np.asarray(pcm, dtype=PCM_DTYPE).reshape(-1)
        self.samples = pcm.size if samples is None else samples
        frames = -(-pcm.size // FRAME_SAMPLES)
        padded = np.zeros((frames + 1) * FRAME_SAMPLES, dtype=PCM_DTYPE)  # + lookahead frame
        padded[: pcm.size] = pcm
        padded.flags.writeable = False
        self.pcm = padded
        self.frames = frames
        rows = padded.reshape(-1, FRAME_SAMPLES).astype(np.float64)
        #: Per 20 ms frame: (sum of squared samples, peak |sample|), measured once for
        #: every playback (a recorder's levels of what we send need no pass per frame).
        self.frame_levels: list[tuple[float, int]] = list(zip(
            np.einsum("ij,ij->i", rows, rows).tolist(), np.abs(rows).max(axis=1).astype(int).tolist()))
        self.name = name
        self.packets: tuple[bytes, ...] | None = None
        self.opus: OpusSettings | None = None
        self.plays = 0
        #: The file it was decoded from (``None`` for PCM given directly).
        self.path: Path | None = None
        self._encode_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Prompt:
        """Decode ``path`` (anything :class:`~media.sources.file.FileSource` plays)."""
        chunks = []
        with FileSource(path) as source:
            while (frame := source.read()) is not None:
                chunks.append(frame)
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=PCM_DTYPE)
        prompt = cls(pcm, name=Path(path).name)
        prompt.path = Path(path).resolve()
        return prompt

    @classmethod
    def from_pcm(cls, pcm: np.ndarray, *, name: str = "prompt") -> Prompt:
        return cls(pcm, name=name)

    @property
    def duration_s(self) -> float:
        return self.frames * FRAME_SAMPLES / SAMPLE_RATE

    @property
    def encoded(self) -> bool:
        return self.packets is not None

    @property
    def nbytes(self) -> int:
        return self.pcm.nbytes + (sum(map(len, self.packets)) if self.packets else 0)

    def encode(self, settings: OpusSettings = PROMPT_SETTINGS) -> tuple[bytes, ...]:
        """Pre-encode to 20 ms Opus packets (once; thread-safe). Returns the packets."""
        with self._encode_lock:
            if self.packets is None or self.opus != settings:
                packets = tuple(encode_pcm(self.pcm[: self.frames * FRAME_SAMPLES], settings))
                self.opus = settings
                self.packets = packets
            return self.packets

    def source(self, *, encoded: bool | None = None) -> PromptSource:
        """A new playback of this prompt (see :class:`PromptSource`)."""
        return PromptSource(self, encoded=encoded)

    def __repr__(self) -> str:
        return f"Prompt({self.name!r}, {self.duration_s:.2f} s, encoded={self.encoded})"


class PromptSource:
    """Plays a :class:`Prompt` (mono 48 kHz). Frames are read-only views of the prompt.

    ``encoded``: ``None`` = use the packets if the prompt has them, ``True`` = require
    them (``ValueError`` if not encoded), ``False`` = PCM only. With packets, ``packet``
    is the Opus payload of the frame the last ``read()`` returned.
    """

    channels = 1
    sample_rate = SAMPLE_RATE

    def __init__(self, prompt: Prompt, *, encoded: bool | None = None) -> None:
        packets = prompt.packets
        if encoded and packets is None:
            raise ValueError(f"{prompt!r} is not encoded (call prompt.encode() first)")
        self.prompt = prompt
        self._packets = packets if encoded is not False else None
        self._count = len(self._packets) if self._packets is not None else prompt.frames
        self._pcm = prompt.pcm
        self._levels = prompt.frame_levels
        self._i = 0
        self.packet: bytes | None = None
        #: ``(sum of squares, peak)`` of the frame the last ``read()`` returned.
        self.level: tuple[float, int] | None = None
        prompt.plays += 1

    @property
    def encoded(self) -> bool:
        return self._packets is not None

    @property
    def duration_s(self) -> float:
        return self._count * FRAME_SAMPLES / SAMPLE_RATE

    def read(self) -> np.ndarray | None:
        i = self._i
        if i >= self._count:
            self.packet = None
            return None
        self._i = i + 1
        if self._packets is not None:
            self.packet = self._packets[i]
        self.level = self._levels[i]
        start = i * FRAME_SAMPLES
        return self._pcm[start : start + FRAME_SAMPLES]

    def close(self) -> None:
        self._i = self._count
        self.packet = None

    def runway(self, limit: int) -> tuple[tuple[bytes, ...], int, int] | None:
        """The next frames (up to ``limit``) as pre-encoded packets, without reading
        them: ``(packets, start, count)``, what a lean sender (:mod:`media.lean`) sends
        before it calls :meth:`advance`; ``None`` when this source plays PCM or ended."""
        packets = self._packets
        i = self._i
        if packets is None or i >= self._count:
            return None
        return packets, i, min(limit, self._count - i)

    def advance(self, n: int) -> tuple[float, int]:
        """``n`` frames of a :meth:`runway` went out: as ``n`` reads (``packet`` and
        ``level`` are the last one's). Returns their ``(sum of squares, peak)``. A
        source closed meanwhile stays closed."""
        i = self._i
        end = min(i + n, self._count)
        if end <= i:
            return 0.0, 0
        self._i = end
        self.packet = self._packets[end - 1] if self._packets is not None else None
        levels = self._levels[i:end]
        self.level = levels[-1]
        return sum(level[0] for level in levels), max(level[1] for level in levels)

    def __reduce__(self):
        """Pickled (for a media worker process) as what it plays: a file-backed prompt
        by its path, played from that process's own cache (decoded and pre-encoded once
        per process); a PCM prompt with its samples. Always from the start."""
        prompt = self.prompt
        if prompt.path is not None:
            return (_shared_source, (str(prompt.path), self._packets is not None))
        return (PromptSource, (prompt,), None)

    def __repr__(self) -> str:
        return f"PromptSource({self.prompt.name!r}, encoded={self.encoded})"


_SHARED: PromptCache | None = None


def _shared_source(path: str, encoded: bool) -> PromptSource:
    """A playback of ``path`` from this process's shared cache (pre-encoded on first
    use, in a thread; PCM until the packets are ready)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PromptCache(encode_after=1)
    return _SHARED.source(path, encoded=None if encoded else False)


class PromptCache:
    """Decoded (and pre-encoded) prompts by file, shared by every call.

    Args:
        opus: settings for pre-encoding (done once per prompt, so the best quality).
        encode_after: pre-encode a prompt once it has been requested this many times
            (``0``: never automatically; ``1``: on first use).
        max_bytes: evict least recently used prompts beyond this much memory.
    """

    def __init__(
        self,
        *,
        opus: OpusSettings = PROMPT_SETTINGS,
        encode_after: int = 2,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.opus = opus
        self.encode_after = encode_after
        self.max_bytes = max_bytes
        self._prompts: collections.OrderedDict[tuple, Prompt] = collections.OrderedDict()
        self._requests: dict[tuple, int] = {}
        self._encoding: dict[tuple, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(path: str | os.PathLike[str]) -> tuple:
        p = Path(path).resolve()
        st = p.stat()
        return (str(p), st.st_size, st.st_mtime_ns)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._prompts.values())

    def get(self, path: str | os.PathLike[str]) -> Prompt:
        """The decoded prompt for ``path`` (decoding it now if needed; blocking)."""
        return self._get(self._key(path), path)

    def _get(self, key: tuple, path: str | os.PathLike[str]) -> Prompt:
        prompt = self._prompts.get(key)
        if prompt is not None:
            self._prompts.move_to_end(key)
            self.hits += 1
            return prompt
        self.misses += 1
        prompt = Prompt.from_file(path)
        self._store(key, prompt)
        return prompt

    def _store(self, key: tuple, prompt: Prompt) -> None:
        self._prompts[key] = prompt
        self._prompts.move_to_end(key)
        while len(self._prompts) > 1 and self.nbytes > self.max_bytes:
            old, _ = self._prompts.popitem(last=False)
            self._requests.pop(old, None)

    async def preload(self, path: str | os.PathLike[str], *, encode: bool = True) -> Prompt:
        """Decode (and pre-encode) ``path`` in a worker thread; for startup warm-up."""
        key = self._key(path)
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = await asyncio.to_thread(Prompt.from_file, path)
            self._store(key, prompt)
        if encode and not prompt.encoded:
            await asyncio.to_thread(prompt.encode, self.opus)
        return prompt

    def source(self, path: str | os.PathLike[str], *, encoded: bool | None = None) -> PromptSource:
        """A playback of ``path``: packets when the prompt is encoded (see
        :class:`PromptSource` for ``encoded``). Counts the request; the
        ``encode_after``-th one starts pre-encoding in a worker thread (needs a running
        event loop; without one it encodes inline)."""
        key = self._key(path)
        prompt = self._get(key, path)
        n = self._requests.get(key, 0) + 1
        self._requests[key] = n
        if self.encode_after and n >= self.encode_after and not prompt.encoded and encoded is not False:
            self._encode_soon(key, prompt)
        return PromptSource(prompt, encoded=encoded)

    def _encode_soon(self, key: tuple, prompt: Prompt) -> None:
        if key in self._encoding:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            prompt.encode(self.opus)
            return
        future = loop.run_in_executor(None, prompt.encode, self.opus)
        self._encoding[key] = future

        def done(f: asyncio.Future) -> None:
            self._encoding.pop(key, None)
            if not f.cancelled() and f.exception() is not None:
                log.warning("pre-encoding %s failed: %s", prompt.name, f.exception())

        future.add_done_callback(done)

    async def wait_encoded(self) -> None:
        """Wait for background pre-encodes in progress (tests, orderly shutdown)."""
        if self._encoding:
            await asyncio.gather(*self._encoding.values(), return_exceptions=True)
