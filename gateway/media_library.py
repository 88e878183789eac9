"""The media directory: files the control API and inbound policy may play.

Clients name files relative to ``WACALL_MEDIA_DIR``; a name that escapes it (``..``,
an absolute path, a symlink pointing outside) is refused, so an API caller can never
make wacall read arbitrary files.
"""

from __future__ import annotations

from pathlib import Path

from media.sources.file import FileSource


class MediaPathError(ValueError):
    """A media file name that is not inside the media directory or does not exist."""


class MediaLibrary:
    def __init__(self, root: Path):
        self.root = Path(root)

    def resolve(self, name: str) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise MediaPathError("a media file name must be a non-empty string")
        shown = repr(name if len(name) <= 80 else name[:80] + "…")
        if "\x00" in name or not name.isprintable():
            raise MediaPathError(f"{shown}: a media file name has no control characters")
        if Path(name).is_absolute():
            raise MediaPathError(f"{shown}: use a path relative to the media directory")
        try:
            root = self.root.resolve()
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                raise MediaPathError(f"{shown} is outside the media directory")
            if not path.is_file():
                raise MediaPathError(f"{shown} does not exist in the media directory")
        except (OSError, ValueError) as exc:  # too long, a loop of links, ...
            if isinstance(exc, MediaPathError):
                raise
            raise MediaPathError(f"{shown} is not a usable file name") from None
        return path

    def open(self, name: str) -> FileSource:
        """A playable source for ``name`` (decoding errors raise ``MediaFileError``)."""
        return FileSource(self.resolve(name))

    def sources(self, names: list[str]) -> list[FileSource]:
        """Sources for every name, or an error and nothing left open: every name is
        checked before any file is opened."""
        paths = [self.resolve(name) for name in names]
        opened: list[FileSource] = []
        try:
            for path in paths:
                opened.append(FileSource(path))
        except Exception:
            for source in opened:
                source.close()
            raise
        return opened
