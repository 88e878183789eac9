"""A finished call leaves nothing behind: no media object survives it, no thread.

Calls of every kind run through the gateway and the sandbox (one process, real WebRTC),
end, and then ``gc.collect()`` must find no live peer, peer connection, codec context,
recorder, receiver, file source or bridge anywhere in the process (the sandbox's phones
included), and the process must have as many native threads as before. Counted by
type through ``gc.get_objects()``: no timing is involved.
"""

import asyncio
import collections
import gc
import os
import threading
from dataclasses import replace
from pathlib import Path

import av
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport

from gateway.app import Service
from gateway.calls import CallState, EndReason
from media import rtpcore
from media.bridges.base import Bridge
from media.jitterbuffer import PlayoutBuffer
from media.peer import MediaPeer
from media.receiver import OpusDecoder, OpusReceiver
from media.session import LocalMediaSession
from media.sinks.recorder import CallRecorder
from media.sinks.stereo_opus import OpusRing
from media.sources.file import FileSource
from tests.helpers import until

ROOT = Path(__file__).resolve().parent.parent
PLAY = ROOT / "gateway/assets/business.ogg"
TIMEOUT = 30

#: What a call's media is made of; none of it may outlive the call (the C core's
#: playout buffer and stereo.ogg ring included, where it was built).
MEDIA_TYPES = (MediaPeer, RTCPeerConnection, RTCDtlsTransport, av.codec.context.CodecContext,
               av.container.Container, CallRecorder, OpusReceiver, OpusDecoder, FileSource, Bridge,
               LocalMediaSession, PlayoutBuffer, OpusRing,
               *((rtpcore.core.PlayoutBuffer, rtpcore.core.OpusRing) if rtpcore.core is not None else ()))


def media_objects() -> collections.Counter:
    gc.collect()
    found = collections.Counter()
    for obj in gc.get_objects():
        if isinstance(obj, MEDIA_TYPES):
            found[type(obj).__qualname__] += 1
    return found


def native_threads() -> int:
    """Threads of this process, not counting asyncio's default executor (Python threads
    it starts on demand for getaddrinfo and keeps for reuse)."""
    executor = sum(1 for t in threading.enumerate() if t.name.startswith("asyncio_"))
    return len(os.listdir("/proc/self/task")) - executor


class Numbers:
    """A fresh simulated user per call (the seed's 5 calls / 24 h limit holds per user)."""

    def __init__(self, sandbox) -> None:
        self.sandbox, self.n = sandbox, 0

    async def next(self, **behaviour) -> str:
        self.n += 1
        user = f"+49151200{self.n:05d}"
        await self.sandbox.grant(user, permanent=True)
        self.sandbox.users.update(user, {"answer_after_ms": 0, **behaviour})
        return user


async def ended(call, reason: EndReason) -> None:
    await call.wait_state(CallState.ENDED, TIMEOUT)
    await call.wait_finished(TIMEOUT)
    assert call.end_reason is reason, (call.end_reason, call.end_detail)


async def settled(service) -> None:
    """Every sandbox call has ended and every task of it has run out."""
    await until(lambda: all(c.finished.is_set() for c in service.sandbox.calls.values()), TIMEOUT)
    await until(lambda: not service.manager.live_calls, TIMEOUT)


async def business_hangup(service, numbers):
    call = await service.manager.place_call(await numbers.next(), sources=[FileSource(PLAY)], record=True)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.hangup()
    await ended(call, EndReason.BUSINESS_HANGUP)


async def business_hangup_stereo_ogg(service, numbers):
    """As business_hangup, recorded as stereo.ogg (the C core's ring, where it was built)."""
    call = await service.manager.place_call(await numbers.next(), sources=[FileSource(PLAY)], record="opus")
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.hangup()
    await ended(call, EndReason.BUSINESS_HANGUP)


async def user_hangup(service, numbers):
    user = await numbers.next(hangup_after_s=0.3)
    call = await service.manager.place_call(user, sources=[FileSource(PLAY)], record=True)
    await ended(call, EndReason.USER_HANGUP)


async def rejected(service, numbers):
    call = await service.manager.place_call(await numbers.next(on_call="reject"),
                                            sources=[FileSource(PLAY)], record=True)
    await ended(call, EndReason.REJECTED)


async def ring_timeout(service, numbers):
    call = await service.manager.place_call(await numbers.next(on_call="ignore"),
                                            sources=[FileSource(PLAY)], record=True, ring_timeout_s=0.3)
    await ended(call, EndReason.RING_TIMEOUT)


async def inbound(service, numbers):
    sandbox_call = await service.sandbox.user_calls(await numbers.next(), hangup_after_s=0.3)
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    call = service.manager.get(sandbox_call.wacid)
    await ended(call, EndReason.USER_HANGUP)


async def media_failure(service, numbers):
    call = await service.manager.place_call(await numbers.next(), sources=[FileSource(PLAY)], record=True)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await service.sandbox.calls[call.wacid].phone.peer.close()  # gone, no terminate webhook
    await ended(call, EndReason.MEDIA_FAILURE)


async def bot_bridged(service, numbers):
    from gateway.bots import BotSpec
    from tests.test_bridge_twilio import TwilioBot

    async with TwilioBot() as bot:
        spec = BotSpec.from_dict({"protocol": "twilio", "url": bot.url})
        call = await service.manager.place_call(await numbers.next(), bot=spec, record=True)
        ws = await bot.connected()
        await bot.wait(lambda m: m["event"] == "media")  # audio reached the bot
        await ws.close()  # the bot hangs up
        await ended(call, EndReason.BOT_HANGUP)


KINDS = [business_hangup, business_hangup_stereo_ogg, user_hangup, rejected, ring_timeout, inbound, media_failure, bot_bridged]


async def test_finished_calls_leave_no_media_objects_and_no_threads(settings):
    async with Service(settings, sandbox=True) as service:
        numbers = Numbers(service.sandbox)
        service.manager.media_end_grace_s = 0.2  # media failure is declared quickly
        await business_hangup(service, numbers)  # warm-up: lazy imports, caches, pools
        await settled(service)
        threads, before = native_threads(), media_objects()  # (other tests' leftovers)
        for kind in KINDS:
            for _ in range(2):
                await kind(service, numbers)
        await settled(service)
        assert len(service.manager.calls) == 1 + 2 * len(KINDS)  # the history is kept…
        alive = media_objects() - before
        assert not alive, f"alive after the calls ended: {dict(alive)}"  # …its media is not
        assert native_threads() == threads


async def test_call_history_is_capped(settings):
    async with Service(replace(settings, call_history=3), sandbox=True) as service:
        numbers = Numbers(service.sandbox)
        calls = [await service.manager.place_call(await numbers.next(on_call="reject")) for _ in range(5)]
        for call in calls:
            await ended(call, EndReason.REJECTED)
        assert list(service.manager.calls) == [c.id for c in calls[-3:]]
        assert service.manager.get(calls[0].wacid) is None and service.manager.get(calls[-1].wacid) is calls[-1]


def test_encoders_and_resamplers_start_no_threads():
    """PyAV gives every encoder a private resampler (a libavfilter graph) whose thread
    pool cannot be sized from Python; media.ffmpeg makes FFmpeg's automatic count 1."""
    import numpy as np

    from media.ffmpeg import threads_limited
    from media.opus import OpusEncoder

    assert threads_limited()[0], threads_limited()[1]
    before = native_threads()
    encoders = [OpusEncoder() for _ in range(4)]
    for encoder in encoders:
        encoder.encode(np.zeros(960, dtype=np.int16))
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.int16), format="s16", layout="mono")
    frame.sample_rate = 48000
    resampler.resample(frame)
    assert native_threads() == before


def test_heap_trimmer_trims_at_most_every_interval():
    from gateway.memory import HeapTrimmer

    now = [0.0]
    trimmer = HeapTrimmer(interval_s=10.0, clock=lambda: now[0])
    assert trimmer.available  # glibc: malloc_trim is there
    assert not trimmer.maybe_trim()  # just started
    now[0] = 10.0
    assert trimmer.maybe_trim() and trimmer.trims == 1
    now[0] = 15.0
    assert not trimmer.maybe_trim()
    now[0] = 20.5
    assert trimmer.maybe_trim() and trimmer.trims == 2
