"""What the demo plays: ``business.ogg`` (3 s of 1 kHz) and ``user.ogg`` (3 s of 600 Hz),
Ogg/Opus made by ``fixtures/audio/make_fixtures.py``; shipped in the wheel, found with
:func:`importlib.resources.files`."""

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """The file ``name`` of this package, on disk (wheels install unzipped)."""
    return Path(str(resources.files(__name__) / name))
