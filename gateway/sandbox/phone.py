"""A simulated user's phone: a real WebRTC peer that answers like WhatsApp's relay.

Its answer is ICE-lite (``a=ice-lite``), carries its candidates, a single sha-256
fingerprint, Opus (plus ``telephone-event/8000`` when offered) and ``a=setup:active`` (Meta takes the DTLS client role in its
sample answers). Once the user picks up and media is up it plays what the user "says"
and records everything it hears: decoded into a WAV, or (``recording_path`` ending in
``.ogg``) as the Opus packets received, nothing decoded. With ``prompts`` (a
:class:`media.sources.prompt.PromptCache` shared by the phones) what it says is decoded
and encoded once for every phone saying that file, not per call.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from media import sdp as sdp_rules
from media.peer import MediaError, MediaPeer, PeerConfig
from media.sinks.ogg import OggOpusPassthrough
from media.sinks.wav import WavSink
from media.sources.file import FileSource
from media.sources.prompt import PromptCache

log = logging.getLogger(__name__)


class Phone:
    def __init__(self, peer_config: PeerConfig, *, recording_path: Path, say: str | None = None,
                 prompts: PromptCache | None = None):
        self.peer: MediaPeer | None = MediaPeer(peer_config, label="sandbox phone")
        #: What the phone heard (frames, seconds); kept when the peer is let go.
        self.received = self.peer.received
        self.recording_path = Path(recording_path)
        if self.recording_path.suffix == ".ogg":
            self.recording_path.parent.mkdir(parents=True, exist_ok=True)
            self.recorder = OggOpusPassthrough(self.recording_path)
            self.peer.rtp_tap.add_listener(self.recorder)
        else:
            self.recorder = WavSink(self.recording_path)
            self.peer.add_sink(self.recorder)
        #: Digits the business sent, as the phone decoded them (RFC 4733).
        self.dtmf_received: list[str] = []
        self.peer.on_dtmf(lambda event: self.dtmf_received.append(event.digit))
        self._say_source = (prompts.source(say) if prompts is not None else FileSource(say)) if say else None
        #: Resolves with the seconds said once the user's audio has been played out.
        self.said: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task | None = None

    async def answer(self, offer: str) -> str:
        """Answer the business's offer the way WhatsApp's relay would."""
        return sdp_rules.mark_ice_lite(await self.peer.accept_offer(offer))

    async def offer(self) -> str:
        """The user calls the business: an offer shaped like WhatsApp's (ICE-lite,
        ``a=setup:actpass``), from an ICE-controlled agent as a lite one is."""
        return sdp_rules.mark_ice_lite(await self.peer.create_lite_offer())

    async def apply_answer(self, answer: str) -> None:
        await self.peer.apply_answer(answer)

    def pick_up(self, media_timeout_s: float) -> asyncio.Task:
        """The user accepted: once media is up, start talking. The returned task fails
        with :class:`MediaError` if no media arrives within ``media_timeout_s``."""
        self._task = asyncio.ensure_future(self._talk(media_timeout_s))
        return self._task

    async def _talk(self, media_timeout_s: float) -> None:
        peer = self.peer
        await peer.media_up(media_timeout_s)
        if self.peer is None:  # hung up meanwhile
            return
        if self._say_source is None:
            self.said.set_result(0.0)
            return
        playback = self.peer.play(self._say_source)
        self._say_source = None
        seconds = await playback.done
        if not self.said.done():
            self.said.set_result(seconds)

    async def press(self, digits: str, *, inband: bool = False) -> None:
        """The user presses keys: RFC 4733 events, or dual tones in the audio."""
        if inband:
            from media.dtmf import DtmfToneSource

            await self.peer.play(DtmfToneSource(digits)).done
        else:
            await self.peer.send_dtmf(digits)

    async def hang_up(self) -> None:
        """End the phone's side: close its media and let go of the peer (the sandbox
        keeps ended calls for inspection; they must not keep codecs and sockets)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        peer = self.peer
        if peer is not None:
            await peer.close()
        if isinstance(self.recorder, OggOpusPassthrough):
            self.recorder.close()  # (a peer closes its sinks, not its tap's listeners)
        self.peer = self.recorder = None
        if self._say_source is not None:
            self._say_source.close()
            self._say_source = None
        if not self.said.done():
            self.said.set_result(0.0)


__all__ = ["Phone", "MediaError"]
