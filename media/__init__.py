"""wacall's media plane: WebRTC peers, RTP, codecs, sources, sinks and bridges.

Importing it limits FFmpeg's automatic threading to one thread (see :mod:`media.ffmpeg`).
"""

from .ffmpeg import limit_threads as _limit_threads

_limit_threads()
