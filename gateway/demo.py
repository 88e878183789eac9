"""``wacall demo``: one business-initiated call through the embedded sandbox.

Gateway and sandbox run in this process on loopback (real HTTP, real WebRTC). The
business plays a file to a simulated WhatsApp user, the user's phone says something
back, both sides record, the business hangs up, and a summary is printed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from media import analysis
from media.sinks.wav import WavSink
from media.sources.file import FileSource

from . import assets
from .app import Service
from .calls import CallState, EndReason, LiveCall as Call
from .config import Settings
from .progress import ProgressPrinter

DEFAULT_PLAY = assets.path("business.ogg")
DEFAULT_PHONE_PLAY = assets.path("user.ogg")
DEMO_USER = "+15550100001"
#: Keep listening this long after both sides finished talking, then hang up.
LISTEN_TAIL_S = 0.5
DEMO_TIMEOUT_S = 120.0


def _side(path: Path, played_s: float) -> dict:
    if not path.exists():
        return {"recording": None, "played_s": round(played_s, 3)}
    x, rate = analysis.read_audio(path)
    return {
        "recording": str(path),
        "played_s": round(played_s, 3),
        "recorded_s": round(len(x) / rate, 3),
        "active_s": round(analysis.active_seconds(x, rate), 3),
        "dominant_hz": round(analysis.dominant_frequency(x, rate), 1) if len(x) else None,
    }


async def run_demo(settings: Settings, *, play: Path | None, phone_play: Path | None,
                   out: Path, quiet: bool = False) -> dict:
    play = Path(play or DEFAULT_PLAY)
    phone_play = Path(phone_play or DEFAULT_PHONE_PLAY)
    for path in (play, phone_play):
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}")
    out.mkdir(parents=True, exist_ok=True)
    source = FileSource(play)  # a file PyAV cannot read fails here, before any call
    with tempfile.TemporaryDirectory(prefix="wacall-demo-") as scratch:
        settings = replace(settings, host="127.0.0.1", port=0, data_dir=Path(scratch))
        async with Service(settings, sandbox=True) as service:
            assert service.sandbox is not None and service.manager is not None
            service.sandbox.users.update(DEMO_USER, {"say": str(phone_play), "answer_after_ms": 800,
                                                     "on_permission_request": "grant",
                                                     "permission_after_ms": 300})
            printer = None if quiet else ProgressPrinter()
            unsubscribe = service.manager.subscribe(printer) if printer else (lambda: None)
            if printer:
                printer.line(f"wacall demo: sandbox on {service.url}, calling simulated user {DEMO_USER}")
            # The seed's whole flow: no permission yet, so wacall sends a call-permission
            # request, the simulated user grants it (a GRANTED webhook), then it dials.
            call = await service.manager.place_call(
                DEMO_USER, sources=[source], sinks=[WavSink(out / "gateway.wav")],
                biz_opaque_callback_data="wacall-demo", if_no_permission="request",
                permission_wait_s=30, record=True)
            try:
                await asyncio.wait_for(_converse(service, call), DEMO_TIMEOUT_S)
            finally:
                if not call.ended:
                    await call.hangup()
                await call.wait_finished(10)
                unsubscribe()
            said_s = 0.0
            phone_recording = None
            sandbox_call = service.sandbox.calls.get(call.wacid or "")
            if sandbox_call is not None:
                await asyncio.wait_for(sandbox_call.finished.wait(), 10)
                said_s = sandbox_call.phone.said.result() if sandbox_call.phone.said.done() else 0.0
                phone_recording = sandbox_call.phone.recording_path
            if phone_recording is not None and phone_recording.exists():
                shutil.move(phone_recording, out / "phone.wav")
            # The QA recordings: stereo and the user's Opus.
            for name, target in (("stereo_wav", "stereo.wav"), ("user_ogg", "call.ogg")):
                source_path = call.recording_files.get(name)
                if source_path is not None and source_path.exists():
                    shutil.copyfile(source_path, out / target)
    played_s = call.played_s
    summary = call.summary()
    summary["setup_ms"] = _setup_ms(call)
    summary["audio"] = {
        "business_to_user": _side(out / "phone.wav", played_s),
        "user_to_business": _side(out / "gateway.wav", said_s),
    }
    summary["recordings"] = {"gateway": str(out / "gateway.wav"), "phone": str(out / "phone.wav"),
                             "stereo": str(out / "stereo.wav"), "ogg": str(out / "call.ogg")}
    summary["ok"] = call.end_reason is EndReason.BUSINESS_HANGUP and call.connected_at is not None
    return summary


async def _converse(service: Service, call: Call) -> None:
    await call.wait_state(CallState.MEDIA_CONNECTED)
    if call.ended:
        return
    await call.wait_playback()
    sandbox_call = service.sandbox.calls.get(call.wacid or "") if service.sandbox else None
    if sandbox_call is not None:
        finished = asyncio.ensure_future(call.finished.wait())
        try:
            await asyncio.wait({sandbox_call.phone.said, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
    if not call.ended:
        await asyncio.sleep(LISTEN_TAIL_S)


def _setup_ms(call: Call) -> dict:
    def ms(name: str) -> float | None:
        value = call.elapsed_until(name)
        return None if value is None else round(value * 1000, 1)

    return {"permission_requested": ms("permission_requested"),
            "permission_granted": ms("permission_granted"),
            "offer_created": ms("offer_created"), "offer_sent": ms("offer_sent"),
            "media_up": ms("media_up"), "media_connected": ms("media_connected")}
