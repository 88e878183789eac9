"""Frame sources: things that produce 20 ms int16 PCM frames (see :mod:`media.frames`)."""

from .file import FileSource
from .prompt import Prompt, PromptCache, PromptSource
from .tone import SilenceSource, ToneSource

__all__ = ["FileSource", "Prompt", "PromptCache", "PromptSource", "SilenceSource", "ToneSource"]
