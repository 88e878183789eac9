"""The QA recordings on disk, as the API serves them: list, find a file, erase, peaks.

Each recorded call has a directory ``<data dir>/recordings/<call id>/`` with its files and
a ``recording.json`` sidecar (see :mod:`media.sinks.recorder`). This module reads the
sidecars (cached by modification time), lists recordings newest first, finds a call's
file **by matching the name against the sidecar's own list** (a requested name is never
joined to a path, so ``../`` cannot reach anything), erases a call's recordings, and
computes waveform peaks (min/max per column, per channel), cached next to the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import shutil
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from media import analysis
from media.recordings import ACTIVE, DIR_MODE, SIDECAR, iso, render_wav, write_json

from .numbers import display
from .redact import mask_phone

__all__ = ["FileInfo", "RecordingBusy", "Recordings"]

log = logging.getLogger(__name__)

#: What a recording's files are, by extension.
CONTENT_TYPES = {".wav": "audio/wav", ".ogg": "audio/ogg", ".json": "application/json"}
#: Waveform widths served (columns).
MAX_WIDTH = 4000


class RecordingBusy(RuntimeError):
    """The call is still being recorded (its files cannot be erased yet)."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    call_id: str
    name: str
    kind: str
    path: Path
    content_type: str


class Recordings:
    """Recorded calls under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int, int], dict]] = {}
        #: Sidecar updates (artifacts arrive on threads, two at once) one at a time.
        self._writing = threading.Lock()

    # -- reading -----------------------------------------------------------------------

    def _sidecar(self, call_dir: Path) -> dict | None:
        path = call_dir / SIDECAR
        try:
            stat = path.stat()
        except OSError:
            return None
        # (a sidecar is replaced whole: a new inode; the mtime alone can repeat within a
        # clock tick)
        stamp = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        cached = self._cache.get(call_dir.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            return None
        self._cache[call_dir.name] = (stamp, data)
        return data

    def sidecars(self) -> list[dict]:
        """Every readable sidecar, newest first."""
        found = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return []
        seen = set()
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                seen.add(entry.name)
                data = self._sidecar(Path(entry.path))
                if data is not None:
                    found.append(data)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        found.sort(key=lambda d: (str(d.get("started_at") or ""), str(d.get("call_id"))), reverse=True)
        return found

    def sidecar(self, call_id: str) -> dict | None:
        if not _safe_name(call_id):
            return None
        return self._sidecar(self.directory / call_id)

    def item(self, data: dict, url_prefix: str = "/v1/calls") -> dict[str, Any]:
        """One recording as the API shows it (the user masked)."""
        call_id = str(data.get("call_id"))
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        durations = data.get("durations_s") if isinstance(data.get("durations_s"), dict) else {}
        call_dir = self.directory / call_id
        files = []
        for kind, name in data["files"].items():
            path = call_dir / str(name)
            try:
                size = path.stat().st_size
            except OSError:
                continue  # (erased, or never written)
            files.append({"name": name, "kind": kind, "format": Path(name).suffix.lstrip("."),
                          "content_type": CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream"),
                          "size": size, "duration_s": durations.get(kind),
                          "url": f"{url_prefix}/{call_id}/recordings/{name}"})
        user = meta.get("user")
        return {"call_id": call_id, "direction": meta.get("direction"), "wacid": meta.get("wacid"),
                "user": mask_phone(display(user)) if isinstance(user, str) and user else None,
                "started_at": data.get("started_at"), "ended_at": data.get("ended_at"),
                "duration_s": durations.get("stereo_wav") or durations.get("stereo_ogg") or durations.get("user_wav"),
                "complete": bool(data.get("complete")), "recovered": bool(data.get("recovered")),
                "error": data.get("error"), "files": files}

    def file(self, call_id: str, name: str) -> FileInfo | None:
        """The call's file called ``name``, if the call lists one by that name."""
        data = self.sidecar(call_id)
        if data is None:
            return None
        names = {str(v): k for k, v in data["files"].items()}
        names[SIDECAR] = "sidecar"
        kind = names.get(name)
        if kind is None:
            return None
        path = self.directory / call_id / name
        if not path.is_file():
            return None
        return FileInfo(call_id, name, kind, path, CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

    # -- erasure -----------------------------------------------------------------------

    def erase(self, call_id: str) -> bool:
        """Delete the call's recordings (the call record stays). ``False``: none here."""
        if not _safe_name(call_id):
            return False
        call_dir = self.directory / call_id
        if not call_dir.is_dir():
            return False
        if call_dir.resolve() in ACTIVE:
            raise RecordingBusy(f"call {call_id} is still being recorded; hang it up first")
        shutil.rmtree(call_dir)
        self._cache.pop(call_id, None)
        log.info("recordings of call %s erased", call_id)
        return True

    # -- WhatsApp's artifacts ----------------------------------------------------------

    def store_artifact(self, call_id: str, kind: str, data: bytes, meta: dict[str, Any]) -> Path:
        """Keep a verified provider artifact beside the call's own recordings and list it in
        the sidecar (one is made for a call wacall did not record itself)."""
        if not _safe_name(call_id) or kind not in ARTIFACT_FILES:
            raise ValueError(f"bad artifact {kind!r} for {call_id!r}")
        call_dir = self.directory / call_id
        call_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        name = ARTIFACT_FILES[kind]
        path = call_dir / name
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with self._writing:
            self._cache.pop(call_id, None)  # (read it from the disk)
            self._list_artifact(call_dir, call_id, kind, name, len(data), meta)
        return path

    def _list_artifact(self, call_dir: Path, call_id: str, kind: str, name: str, size: int,
                       meta: dict[str, Any]) -> None:
        sidecar = self._sidecar(call_dir) or {
            "call_id": call_id, "started_at": meta.get("started_at"), "ended_at": meta.get("ended_at"),
            "complete": True, "files": {}, "durations_s": {}, "meta": {k: v for k, v in meta.items()
                                                                       if k in ("direction", "wacid", "user")}}
        sidecar = dict(sidecar)
        sidecar["files"] = {**sidecar.get("files", {}), f"whatsapp_{kind}": name}
        sidecar.setdefault("provider_artifacts", {})[kind] = {"file": name, "size": size,
                                                              "received_at": iso(time.time())}
        write_json(call_dir / SIDECAR, sidecar)
        self._cache.pop(call_id, None)

    # -- WAV renders ------------------------------------------------------------------

    def as_wav(self, info: FileInfo) -> FileInfo:
        """``info`` as a 16-bit WAV: a WAV as it is; a compressed recording (stereo.ogg,
        user.ogg) decoded once per file version and kept next to it (hidden, gone with
        the call's recordings). Raises ``ValueError`` for a file that is not audio,
        :class:`media.errors.MediaFileError` when it cannot be decoded."""
        if info.path.suffix == ".wav":
            return info
        if info.path.suffix != ".ogg":
            raise ValueError(f"{info.name} is not audio")
        stat = info.path.stat()
        prefix = f".{info.name}.render-"
        cached = info.path.with_name(f"{prefix}{stat.st_size}-{stat.st_mtime_ns}.wav")
        if not cached.is_file():
            render_wav(info.path, cached)
            for old in info.path.parent.glob(f"{prefix}*.wav"):  # (renders of earlier versions)
                if old != cached:
                    old.unlink(missing_ok=True)
        name = f"{Path(info.name).stem}.wav"
        return FileInfo(info.call_id, name, info.kind, cached, CONTENT_TYPES[".wav"])

    # -- waveform ----------------------------------------------------------------------

    def waveform(self, info: FileInfo, width: int) -> dict[str, Any]:
        """Min/max per column (values -1..1), per channel, computed once per file version
        and width, cached next to the file."""
        stat = info.path.stat()
        cache = info.path.with_name(f".{info.name}.peaks-{width}.json")
        version = f"{stat.st_size}:{stat.st_mtime_ns}"
        try:
            cached = json.loads(cache.read_text())
            if cached.get("version") == version:
                return cached["waveform"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        samples, rate = _read_channels(info.path)
        frames = samples.shape[0]
        columns = []
        for channel in samples.T:
            if frames == 0:
                columns.append([])
                continue
            edges = np.linspace(0, frames, num=min(width, frames) + 1).astype(np.int64)
            lo = np.minimum.reduceat(channel, edges[:-1])
            hi = np.maximum.reduceat(channel, edges[:-1])
            columns.append([[round(float(a), 4), round(float(b), 4)] for a, b in zip(lo, hi)])
        result = {"file": info.name, "width": len(columns[0]) if columns else 0, "channels": len(columns),
                  "sample_rate": rate, "duration_s": round(frames / rate, 3) if rate else 0.0, "peaks": columns}
        try:
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_text(json.dumps({"version": version, "waveform": result}))
            os.chmod(tmp, 0o600)
            os.replace(tmp, cache)
        except OSError as exc:  # (a full disk: computed again next time)
            log.warning("cannot cache the waveform of %s: %s", info.name, exc.strerror or exc)
        return result


def _read_channels(path: Path) -> tuple[np.ndarray, int]:
    """``(frames × channels float32 in -1..1, rate)``: WAV directly, anything else through PyAV."""
    if path.suffix.lower() == ".wav":
        with wave.open(str(path)) as w:
            channels, rate, width = w.getnchannels(), w.getframerate(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
        if width == 2:
            data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            return data.reshape(-1, channels), rate
    planar, rate = analysis.read_channels(path)
    return np.clip(planar, -1.0, 1.0).T, rate


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\x00" not in name and len(name) <= 128


# -- WhatsApp's own recording and transcription ------------------------------------------

#: The announcement languages Meta lists for call recording / transcription notices.
ANNOUNCEMENT_LANGUAGES = ("en", "en_US", "nl", "fr", "de", "hi", "it", "kn", "pt", "es", "es_ES", "te", "vi")
#: Artifacts WhatsApp delivers, by kind: the file name they are kept as.
ARTIFACT_FILES = {"recording": "whatsapp-recording.ogg", "transcription": "whatsapp-transcript.json"}


@dataclass(frozen=True, slots=True)
class ProviderRecording:
    """WhatsApp-native recording (and transcription) of a call, as asked on ``connect`` /
    ``accept``: ``{"purpose": "quality assurance", "announcement_language": "en_US",
    "transcription": true}``. Both parties hear a notice built from the purpose."""

    purpose: str
    announcement_language: str = "en_US"
    transcription: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> ProviderRecording:
        if not isinstance(data, dict):
            raise ValueError("provider_recording must be an object: {'purpose', 'announcement_language'?, "
                             "'transcription'?}")
        unknown = sorted(set(data) - {"purpose", "announcement_language", "transcription"})
        if unknown:
            raise ValueError(f"unknown provider_recording fields: {', '.join(unknown)}")
        purpose = data.get("purpose")
        if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > 250 or not purpose.isprintable():
            raise ValueError("provider_recording.purpose is required: 1 to 250 printable characters")
        language = data.get("announcement_language", "en_US")
        if language not in ANNOUNCEMENT_LANGUAGES:
            raise ValueError(f"provider_recording.announcement_language must be one of {', '.join(ANNOUNCEMENT_LANGUAGES)}")
        transcription = data.get("transcription", False)
        if not isinstance(transcription, bool):
            raise ValueError("provider_recording.transcription must be true or false")
        return cls(purpose.strip(), language, transcription)

    def to_dict(self) -> dict[str, Any]:
        return {"purpose": self.purpose, "announcement_language": self.announcement_language,
                "transcription": self.transcription}

    def fields(self) -> dict[str, Any]:
        """What goes on ``connect`` / ``accept`` (Meta's ``recording`` / ``transcription``)."""
        enabled = {"status": "ENABLED", "purpose": self.purpose, "announcement_language": self.announcement_language}
        out: dict[str, Any] = {"recording": dict(enabled)}
        if self.transcription:
            out["transcription"] = dict(enabled)
        return out


def verify_sha256(data: bytes, expected: str) -> bool:
    """Whether ``data`` has the digest the provider announced: base64 of SHA-256 (hex
    accepted too)."""
    digest = hashlib.sha256(data).digest()
    expected = expected.strip()
    return hmac.compare_digest(base64.b64encode(digest).decode(), expected) or \
        hmac.compare_digest(digest.hex(), expected.lower())


