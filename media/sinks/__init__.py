"""Frame sinks: things that consume 20 ms int16 PCM frames (see :mod:`media.frames`)."""

from .meter import LevelMeter, SpeechDetector, SpeechEvent
from .ogg import OggOpusPassthrough, OggOpusSink, OggOpusWriter
from .recorder import CallRecorder, apply_retention, repair, repair_directory
from .stereo import AlignedStereoRecorder
from .wav import WavSink, WavWriter, repair_wav

__all__ = [
    "AlignedStereoRecorder",
    "CallRecorder",
    "LevelMeter",
    "OggOpusPassthrough",
    "OggOpusSink",
    "OggOpusWriter",
    "SpeechDetector",
    "SpeechEvent",
    "WavSink",
    "WavWriter",
    "apply_retention",
    "repair",
    "repair_directory",
    "repair_wav",
]
