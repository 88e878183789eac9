"""Recordings on disk, after (or without) the recorder: startup repair, retention, WAV renders.

:func:`repair_directory` fixes what a killed process left (WAV header lengths, torn Ogg
pages, sidecars of recordings that never closed: marked ``"recovered": true`` with
durations measured from the files); :func:`apply_retention` deletes the oldest call
directories by age, count or size. Both skip the directories of recorders open in this
process (:data:`ACTIVE`, kept by :class:`media.sinks.recorder.CallRecorder`).
:func:`render_wav` decodes a compressed recording (stereo.ogg) into a 16-bit WAV for
tools that take nothing else.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import struct
import threading
import time
from pathlib import Path

from .frames import SAMPLE_RATE
from .sinks.ogg import read_ogg_packets, repair_ogg
from .sinks.wav import HEADER_SIZE, WavWriter, open_private, repair_wav
from .sources.file import decoded_chunks

__all__ = ["ACTIVE", "SIDECAR", "apply_retention", "render_wav", "repair", "repair_directory"]

log = logging.getLogger(__name__)

SIDECAR = "recording.json"
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Call directories with an open recorder (never deleted or repaired under its feet).
ACTIVE: set[Path] = set()


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp, FILE_MODE)
    try:
        payload = json.dumps(data, indent=2, sort_keys=False, default=str).encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- startup repair -------------------------------------------------------------------


def repair(path: str | os.PathLike[str]) -> bool:
    """Fix one recording file left by a crash: WAV header lengths, torn Ogg pages.
    Returns ``True`` when the file was changed; other file types are left alone."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".wav":
        return repair_wav(p)
    if suffix in (".ogg", ".opus"):
        return repair_ogg(p)
    return False


def _wav_seconds(path: Path) -> float | None:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        channels, rate = struct.unpack("<HI", head[22:28])
        size = struct.unpack("<I", head[40:44])[0]
        return round(size / (2 * channels) / rate, 3)
    except (OSError, struct.error, ZeroDivisionError):
        return None


def repair_directory(directory: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Repair every call directory under ``directory`` (or ``directory`` itself when it
    is a call directory): files via :func:`repair`, sidecars of recordings that never
    closed get ``"recovered": true`` and durations measured from the files. Directories
    of recorders open in this process are skipped. Returns ``{"repaired": [...files],
    "recovered": [...call dirs], "errors": [...]}``."""
    root = Path(directory)
    report: dict[str, list[str]] = {"repaired": [], "recovered": [], "errors": []}
    if not root.is_dir():
        return report
    calls = [root] if (root / SIDECAR).exists() else [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    for call_dir in sorted(calls):
        if call_dir.resolve() in ACTIVE:
            continue
        for f in sorted(call_dir.iterdir()):
            if f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
                continue
            try:
                if f.is_file() and repair(f):
                    report["repaired"].append(str(f))
            except (OSError, ValueError) as exc:
                report["errors"].append(f"{f}: {exc}")
        sidecar = call_dir / SIDECAR
        try:
            data = json.loads(sidecar.read_text()) if sidecar.exists() else None
        except (OSError, ValueError) as exc:
            report["errors"].append(f"{sidecar}: {exc}")
            continue
        if data is None or data.get("complete") or data.get("recovered"):
            continue
        durations = data.setdefault("durations_s", {})
        for key, name in (data.get("files") or {}).items():
            f = call_dir / name
            if not f.exists():
                continue
            if name.endswith(".wav"):
                durations[key] = _wav_seconds(f)
            elif name.endswith(".ogg"):
                try:
                    packets, granule = read_ogg_packets(f)
                    durations[key] = round(granule / SAMPLE_RATE, 3) if packets else 0.0
                except OSError:
                    pass
        data["recovered"] = True
        data["recovered_at"] = iso(time.time())
        try:
            write_json(sidecar, data)
            report["recovered"].append(str(call_dir))
        except OSError as exc:
            report["errors"].append(f"{sidecar}: {exc}")
    return report


# -- retention ------------------------------------------------------------------------


def _usage(path: Path) -> tuple[float, int]:
    """``(newest mtime, total bytes)`` of a call directory and its files."""
    newest = path.stat().st_mtime
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return newest, total


def apply_retention(
    directory: str | os.PathLike[str],
    max_age_s: float | None = None,
    max_count: int | None = None,
    max_bytes: int | None = None,
    *,
    now: float | None = None,
) -> list[Path]:
    """Delete call directories under ``directory``, oldest first (by the newest file
    inside), until every limit holds: none older than ``max_age_s``, at most
    ``max_count`` directories, at most ``max_bytes`` in total. Directories of
    recorders open in this process are never deleted (they still count). Returns the
    deleted directories, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    entries = []
    for d in root.iterdir():
        if d.is_dir() and not d.is_symlink():
            try:
                mtime, size = _usage(d)
            except OSError:
                continue
            entries.append((mtime, d.name, d, size))
    entries.sort()
    total_bytes = sum(e[3] for e in entries)
    count = len(entries)
    removed: list[Path] = []
    for mtime, _, d, size in entries:
        if d.resolve() in ACTIVE:
            continue
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_many = max_count is not None and count > max_count
        too_big = max_bytes is not None and total_bytes > max_bytes
        if not (too_old or too_many or too_big):
            continue
        try:
            shutil.rmtree(d)
        except OSError:
            log.exception("retention: cannot delete %s", d)
            continue
        removed.append(d)
        count -= 1
        total_bytes -= size
    return removed


def render_wav(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> float:
    """Decode ``source`` (any audio PyAV reads; here: stereo.ogg) into ``target``, a
    16-bit WAV (mode 0600) with the same channels and rate, a frame at a time (an
    hour-long call never sits in memory whole). ``target`` appears only complete: it
    is written beside it and renamed. Returns the seconds rendered.

    Raises:
        FileNotFoundError: no ``source``.
        MediaFileError: PyAV cannot read it.
    """
    target = Path(target)
    # (a name of its own: two renders of the same file at once do not mix)
    partial = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # (startup repair removes a stray one)
    rate, channels, chunks = decoded_chunks(source, "s16")
    try:
        writer = WavWriter(partial, sample_rate=rate, channels=channels, flush_interval_s=1.0)
        try:
            for chunk in chunks:
                writer.append(chunk.reshape(-1))
            writer.close()
        except BaseException:
            writer.abort()
            partial.unlink(missing_ok=True)
            raise
    finally:
        chunks.close()  # (the file, also when the WAV could not be written)
    os.replace(partial, target)
    return writer.samples / rate if rate else 0.0
