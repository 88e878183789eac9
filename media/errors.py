"""Exceptions raised by the media layer."""

from __future__ import annotations

import os


class MediaFileError(ValueError):
    """A media file exists but cannot be used: PyAV cannot open or decode it, or it
    has no audio stream.

    ``path`` and ``reason`` are kept as attributes; ``str(err)`` names both, e.g.
    ``"cannot use media file 'hello.mp3': no audio stream"``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        # Both go to ``args`` so the exception pickles and copies cleanly.
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot use media file {self.path!r}: {self.reason}"
