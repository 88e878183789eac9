"""Frame sinks: things that consume 20 ms int16 PCM frames (see :mod:`media.frames`)."""

from .wav import WavSink

__all__ = ["WavSink"]
