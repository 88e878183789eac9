"""Frame sinks: things that consume 20 ms int16 PCM frames (see :mod:`media.frames`).

(The call recorder, which combines several of them, is :mod:`media.sinks.recorder`; it is
not imported here: it uses :mod:`media.recordings`, which uses the WAV and Ogg writers.)
"""

from .meter import LevelMeter, SpeechDetector, SpeechEvent
from .ogg import OggOpusPassthrough, OggOpusSink, OggOpusWriter
from .stereo import AlignedStereoRecorder
from .stereo_opus import AlignedOpusRecorder
from .wav import WavSink, WavWriter, repair_wav

__all__ = [
    "AlignedOpusRecorder",
    "AlignedStereoRecorder",
    "LevelMeter",
    "OggOpusPassthrough",
    "OggOpusSink",
    "OggOpusWriter",
    "SpeechDetector",
    "SpeechEvent",
    "WavSink",
    "WavWriter",
    "repair_wav",
]
