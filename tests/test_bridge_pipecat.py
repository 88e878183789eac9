"""A real Pipecat bot answers a WhatsApp call through the Twilio bridge, unchanged.

The bot is the shape of Pipecat's own Twilio examples: a FastAPI WebSocket endpoint
served by uvicorn that reads the telephony handshake with ``parse_telephony_websocket``,
then runs ``FastAPIWebsocketTransport`` + ``TwilioFrameSerializer`` (auto hang-up off:
there is no Twilio REST API here) around one tiny processor that answers a 600 Hz tone
from the caller with a 1000 Hz tone. Nothing in it knows about wacall.

Needs ``pipecat-ai[websocket]`` and ``uvicorn``. Without them the test is skipped, except
in CI (``CI=true``), where it fails: the Pipecat interop must not silently stop being
tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import numpy as np
import pytest

from media import analysis
from media.bridges import make_bridge
from media.sources.tone import ToneSource
from media_call import TIMEOUT, call_pair
from tests.helpers import ToneEars

CALLER_HZ = 600.0
BOT_HZ = 1000.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Pipecat interop cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"Pipecat interop skipped: {reason}")


try:
    import uvicorn
    from fastapi import FastAPI, WebSocket
    from loguru import logger as _loguru
    from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.runner.utils import parse_telephony_websocket
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
    from pipecat.workers.runner import WorkerRunner

    PIPECAT_MISSING = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    PIPECAT_MISSING = f"{exc} (pip install 'wacall[bots]')"


if PIPECAT_MISSING is None:

    class ToneResponder(FrameProcessor):
        """While the caller's audio is dominated by 600 Hz, answer each input frame with
        the same length of a phase-continuous 1000 Hz tone."""

        def __init__(self) -> None:
            super().__init__()
            self.frames_in = 0
            self.frames_heard = 0
            self._phase = 0.0

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                self.frames_in += 1
                pcm = np.frombuffer(frame.audio, dtype=np.int16).astype(np.float64)
                if pcm.size >= 64 and self._hears(pcm, frame.sample_rate):
                    self.frames_heard += 1
                    await self.push_frame(self._tone(pcm.size, frame.sample_rate))
                return
            await self.push_frame(frame, direction)

        @staticmethod
        def _hears(pcm: np.ndarray, rate: int) -> bool:
            power = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size))) ** 2
            freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
            band = power[np.abs(freqs - CALLER_HZ) <= 1.5 * rate / pcm.size].sum()
            loud = np.sqrt(np.mean(pcm * pcm)) > 300  # about -40 dBFS
            return bool(loud and band > 0.5 * power.sum())

        def _tone(self, n: int, rate: int) -> OutputAudioRawFrame:
            step = 2 * np.pi * BOT_HZ / rate
            samples = np.round(0.3 * 32767 * np.sin(self._phase + step * np.arange(n))).astype(np.int16)
            self._phase = (self._phase + step * n) % (2 * np.pi)
            return OutputAudioRawFrame(audio=samples.tobytes(), sample_rate=rate, num_channels=1)


class PipecatTwilioBot:
    """uvicorn + FastAPI on 127.0.0.1, one Pipecat pipeline per WebSocket, as in
    Pipecat's Twilio examples."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.responders: list[ToneResponder] = []
        self.call_data: list = []
        self.pipelines_done = 0
        self._done = asyncio.Event()
        self.app.add_api_websocket_route("/ws", self._websocket)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._main: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        transport_type, call_data = await parse_telephony_websocket(websocket)
        assert transport_type == "twilio", transport_type
        self.call_data.append(call_data)
        serializer = TwilioFrameSerializer(
            stream_sid=call_data["stream_id"],
            call_sid=call_data["call_id"],
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
            ),
        )
        responder = ToneResponder()
        self.responders.append(responder)
        worker = PipelineWorker(
            Pipeline([transport.input(), responder, transport.output()]),
            params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
        )

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, client):
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()
        self.pipelines_done += 1
        self._done.set()

    async def pipeline_finished(self, timeout: float) -> None:
        await asyncio.wait_for(self._done.wait(), timeout)

    async def __aenter__(self) -> PipecatTwilioBot:
        # Server.serve() minus its signal handling, so we know when it listens.
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._sock])
        self._main = asyncio.ensure_future(self._server.main_loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._main, 5)
        await self._server.shutdown(sockets=[self._sock])
        self._sock.close()


@pytest.fixture(autouse=True)
def _quiet_pipecat():
    if PIPECAT_MISSING is not None:
        _unavailable(PIPECAT_MISSING)
    _loguru.remove()
    _loguru.add(lambda message: None, level="WARNING")
    yield


async def test_pipecat_twilio_bot_answers_a_whatsapp_call_unchanged():
    async with PipecatTwilioBot() as bot:
        recorder = ToneEars(BOT_HZ)
        async with call_pair(lambda business, user: user.add_sink(recorder)) as (business, user):
            bridge = make_bridge("twilio", bot.url, idle_timeout_s=30)
            await bridge.start(business, call_id="CA0123456789abcdef0123456789abcdef",
                               parameters={"from_number": "+4915112345678", "to_number": "+4930123456"})
            user.play(ToneSource(CALLER_HZ, None, amplitude=0.3))
            # The bot hears 600 Hz and answers with 1000 Hz: the user hears it.
            await recorder.hears(1.5, TIMEOUT)
            responder = bot.responders[0]
            assert responder.frames_heard >= 20, (responder.frames_in, responder.frames_heard)
            data = bot.call_data[0]
            assert data["call_id"] == "CA0123456789abcdef0123456789abcdef"
            assert data["stream_id"] == bridge.stream_sid
            assert data["body"]["from_number"] == "+4915112345678"
            assert not bridge.closed.done()

            # The user hangs up: stop + close; Pipecat sees the disconnect and its
            # pipeline ends (no REST hang-up attempt: auto_hang_up is off).
            reason = await bridge.stop("user hung up")
            assert reason == "user hung up" and bridge.ended_by == "local"
            await bot.pipeline_finished(TIMEOUT)

        audio = recorder.audio
        heard = analysis.tone_seconds(audio, 48000, BOT_HZ)
        assert heard >= 1.5, heard
        # ...as one continuous tone: the bot paces 40 ms chunks, the bridge's playout
        # queue turns them into gap-free 20 ms frames.
        segments = analysis.tone_segments(audio, 48000, BOT_HZ, merge_gap_ms=0)
        assert max(end - start for start, end in segments) >= 1.4, segments
        # What the user heard of the bot is the 1000 Hz tone, not an echo of 600 Hz.
        assert analysis.tone_seconds(audio, 48000, CALLER_HZ) < 0.1
        stats = bridge.stats
        assert stats.frames_dropped == 0 and stats.ignored_messages == 0
        assert stats.audio_from_bot_s >= 1.0
