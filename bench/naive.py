"""A call's media built the way a newcomer builds it with stock aiortc (the baseline of
``bench/load.py --rtp-path naive``).

One ``RTCPeerConnection`` per call, ``aiortc.contrib.media.MediaPlayer`` playing the
prompt *file* (decoded, resampled and Opus-encoded again for every call, every frame,
paced by aiortc's sender), ``MediaRecorder`` writing the user's audio to a WAV (aiortc's
decoder thread, then PyAV's WAV muxer). Nothing of wacall's media path: no
pre-encoded prompt, no shared ticker, no playout buffer, no lean RTP.

What it takes from wacall is only what the provider insists on and the gateway needs
to drive a call: the SDP shaped for WhatsApp (Opus alone, through aiortc's own
``setCodecPreferences``; :func:`media.sdp.for_whatsapp`: one sha-256 fingerprint,
``a=ptime``; aiortc already waits for its candidates), the
:class:`media.session.MediaSession` commands the gateway calls (offer, apply answer,
wait for media, record, close, events), and a frame counter on the received track
(the gateway's RTP watchdog reads ``received.frames``). Signalling (the provider's
``connect``, its webhooks) stays the gateway's own.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole, MediaPlayer, MediaRecorder
from aiortc.mediastreams import MediaStreamTrack

from media import sdp as sdp_rules
from media.mix import Playback
from media.peer import MediaError, ReceiveStats
from media.session import MediaEnded, RecordSpec

log = logging.getLogger(__name__)


class _Counted(MediaStreamTrack):
    """The received track, counting frames for the gateway's watchdog."""

    kind = "audio"

    def __init__(self, track: MediaStreamTrack, received: ReceiveStats) -> None:
        super().__init__()
        self._track = track
        self._received = received

    async def recv(self):
        frame = await self._track.recv()
        self._received.frames += 1
        self._received.pts = frame.pts
        return frame


class NaiveMediaSession:
    """Stock aiortc media for one call (see the module docstring). ``prompt``: the file
    the MediaPlayer plays from the moment media is up."""

    def __init__(self, prompt: str | Path, *, label: str = "call", **_ignored: Any) -> None:
        self.label = label
        self.call_id: str | None = None
        self.received = ReceiveStats()
        self.closed = False
        self.pc = RTCPeerConnection()
        self.player = MediaPlayer(str(prompt))
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self._connected = asyncio.Event()
        self._callbacks: list = []
        self._remote: MediaStreamTrack | None = None
        self._recorder: MediaRecorder | MediaBlackhole | None = None
        self._record_path: Path | None = None
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("track", self._on_track)

    # -- events -------------------------------------------------------------------------

    def subscribe(self, callback) -> None:
        self._callbacks.append(callback)

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed") and not self.ended.done():
            self.ended.set_result(f"transport {state}")
            for callback in list(self._callbacks):
                callback(MediaEnded(f"transport {state}"))

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._remote is None:
            self._remote = _Counted(track, self.received)
            asyncio.ensure_future(self._start_recorder())

    # -- negotiation --------------------------------------------------------------------

    def _opus_only(self) -> None:
        """WhatsApp takes Opus alone (aiortc also offers PCMU/PCMA)."""
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        for transceiver in self.pc.getTransceivers():
            transceiver.setCodecPreferences(opus)

    async def offer(self) -> str:
        self.pc.addTrack(self.player.audio)
        self._opus_only()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return sdp_rules.for_whatsapp(self.pc.localDescription.sdp)

    async def answer(self, offer: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        self.pc.addTrack(self.player.audio)
        self._opus_only()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return sdp_rules.for_whatsapp(self.pc.localDescription.sdp)

    async def apply_answer(self, answer: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def wait_up(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout or 30)
        except asyncio.TimeoutError as exc:
            raise MediaError("no media") from exc

    # -- commands -----------------------------------------------------------------------

    def play(self, source) -> Playback:
        return Playback(source)  # (not played: the MediaPlayer plays the prompt file since media came up)

    def record(self, spec: RecordSpec) -> dict[str, Path]:
        directory = Path(spec.directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._record_path = directory / "user.wav"
        return {"user_wav": self._record_path, "sidecar": directory / "recording.json"}

    async def _start_recorder(self) -> None:
        await asyncio.sleep(0)  # (record() runs right after the answer is applied)
        if self._record_path is not None:
            self._recorder = MediaRecorder(str(self._record_path))
        else:
            self._recorder = MediaBlackhole()  # (a remote track nobody reads fills its queue)
        self._recorder.addTrack(self._remote)
        await self._recorder.start()

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        raise NotImplementedError("the naive baseline sends no DTMF")

    async def start_bridge(self, bridge, **kwargs: Any):
        raise NotImplementedError("the naive baseline has no bridges")

    async def open_rtp(self, **options: Any):
        raise NotImplementedError("the naive baseline has no RTP legs")

    def stats(self) -> dict:
        return {"received_seconds": round(self.received.frames * 0.02, 3)}

    async def get_stats(self) -> dict:
        return self.stats()

    async def reset_pacing(self) -> None:
        pass

    async def close(self, *, recording_meta: dict | None = None, media_stats: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._recorder is not None:
            await self._recorder.stop()
        await self.pc.close()
        if self.player.audio is not None:
            self.player.audio.stop()
        if not self.ended.done():
            self.ended.set_result("closed")


def sessions(prompt: str | Path):
    """A ``media_sessions`` factory for :class:`gateway.calls.service.CallManager`."""

    def make(config, *, label: str = "call", sinks=(), speech: bool = False) -> NaiveMediaSession:
        return NaiveMediaSession(prompt, label=label)

    return make
