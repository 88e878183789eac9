"""Interop with a real browser WebRTC stack: headless Chromium plays the WhatsApp user's
phone (gateway.sandbox.browser), answering wacall's offer as the provider relays it.

Needs Chromium and Playwright (``tools/install-chromium.sh``). Without them the tests
are skipped, except in CI (``CI=true``), where they fail: interop must not silently
stop being tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.sandbox.browser import (
    BrowserPhone,
    ChromiumHost,
    ChromiumUnavailable,
    browser_phone_factory,
)
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource
from tests.helpers import drain, tone_frequency, tone_seconds

USER = "+4915112345678"
TIMEOUT = 30
CAPTURE_HZ = 600.0
CAPTURE_S = 3.0


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Chromium interop cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"Chromium interop skipped: {reason}")


@pytest.fixture
async def chromium():
    host = ChromiumHost(capture_hz=CAPTURE_HZ, capture_s=CAPTURE_S)
    try:
        await host.start()
        await host.warm_up()
    except ChromiumUnavailable as exc:
        await host.close()
        unavailable(str(exc))
    try:
        yield host
    finally:
        await host.close()


def browser_service(settings, chromium, **phone_kwargs):
    """A gateway + sandbox whose phones are Chromium pages (and that terminates the call
    when the browser hangs up)."""

    class Ctx:
        async def __aenter__(self):
            self.service = await Service(settings, sandbox=True).start()
            sandbox = self.service.sandbox
            await sandbox.grant(USER, permanent=True)
            sandbox.phone_factory = browser_phone_factory(chromium, sandbox=sandbox, **phone_kwargs)
            sandbox.users.update(USER, {"answer_after_ms": 0})
            return self.service

        async def __aexit__(self, *exc):
            await self.service.stop()

    return Ctx()


async def heard_tone(phone: BrowserPhone, freq: float, min_s: float) -> dict:
    """Poll the page until it has heard ``freq`` for ``min_s`` and the tone has stopped."""

    async def poll() -> dict:
        while True:
            report = await phone.report()
            tone = next((t for t in report["tones"] if abs(t["hz"] - freq) < 30), None)
            if tone and tone["seconds"] >= min_s and not tone["open"]:
                return report
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), TIMEOUT)


async def connected_call(service, **place):
    call = await service.manager.place_call(USER, **place)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = service.sandbox.calls[call.wacid]
    return call, sandbox_call, sandbox_call.phone


async def test_audio_both_ways_with_chromium(settings, chromium, tmp_path, capsys):
    heard = tmp_path / "wacall-heard.wav"
    async with browser_service(settings, chromium) as service:
        call, sandbox_call, phone = await connected_call(
            service, sources=[ToneSource(1000, 2.0)], sinks=[WavSink(heard)])
        assert isinstance(phone, BrowserPhone)
        await asyncio.wait_for(phone.connected.wait(), TIMEOUT)
        gateway_media_up = call.elapsed_until("media_up") - call.elapsed_until("offer_created")
        await call.wait_playback()
        report = await heard_tone(phone, 1000, 1.0)
        said = await asyncio.wait_for(phone.said, TIMEOUT)  # the page's 3 s of 600 Hz
        await drain(call.media)
        ours = await call.media.get_stats()
        playout = ours["playout"]
        await call.hangup()
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)

    recorded = tone_seconds(phone.recording_path, 1000)
    with capsys.disabled():
        print(f"\nChromium {chromium.version}: offer -> media up {gateway_media_up * 1000:.0f} ms "
              f"(wacall: offer created -> ICE+DTLS up), {phone.media_up_s * 1000:.0f} ms "
              f"(page: offer in -> connected; {phone.timings()}); Chromium launch {chromium.launch_s:.2f} s; "
              f"NetEq made up {phone.stretched_s * 1000:.0f} ms; 1 kHz recorded {recorded:.2f} s of 2.0; "
              f"wacall's sends at most {ours['pacing']['max_late_ms']:.0f} ms late")
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert sandbox_call.ended_by == "business"
    assert gateway_media_up < 5.0
    # The page's AnalyserNode heard wacall's 1 kHz: the pitch within a few Hz, >= 80 % of it.
    tone = next(t for t in report["tones"] if abs(t["hz"] - 1000) < 30)
    assert tone is report["tones"][0]  # the dominant tone
    assert tone["hz"] == pytest.approx(1000, abs=3)
    # Upper bound: the analyser's 43 ms windows smear each edge, and Chromium's NetEq
    # stretches playout when packets come late (a loaded 2-core machine): it reports how
    # much it made up, and only that much may be added to the 2.0 s that were sent.
    stretched = phone.stretched_s
    assert 0.8 * 2.0 <= tone["seconds"] <= 2.0 + 0.3 + stretched
    # and the page's own recording agrees
    assert 2.0 - 0.2 <= recorded <= 2.0 + 0.2 + stretched
    # wacall's recording has the browser's capture tone.
    assert said == pytest.approx(CAPTURE_S)
    assert tone_frequency(heard, CAPTURE_HZ) == pytest.approx(CAPTURE_HZ, abs=3)
    # (our playout buffer may conceal / stretch too when the machine is loaded; on loopback
    # nothing is lost, so every concealed frame is 20 ms added)
    made_up = playout["frames_concealed"] * 0.020
    assert 0.8 * CAPTURE_S <= tone_seconds(heard, CAPTURE_HZ) <= CAPTURE_S + 0.2 + made_up
    assert phone.rtp_stats["packets_received"] > 0 and phone.peer.received.seconds > 2.0


async def test_browser_answer_keeps_chromium_shape(settings, chromium):
    async with browser_service(settings, chromium) as service:
        call, sandbox_call, phone = await connected_call(service)
        answer = phone.answer_sdp
        await call.hangup()
    lines = answer.split("\r\n")
    assert "a=ice-lite" not in lines  # Chromium is a full ICE agent
    assert "a=setup:active" in lines
    fingerprints = [line for line in lines if line.startswith("a=fingerprint:")]
    assert len(fingerprints) == 1 and fingerprints[0].startswith("a=fingerprint:sha-256 ")
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    assert candidates and all(" udp " in c and " 127.0.0.1 " in c for c in candidates)


async def test_ice_lite_mark_on_a_browser_answer_still_connects(settings, chromium):
    """Marking Chromium's answer ``a=ice-lite`` (as the sandbox marks its aiortc phones)
    is a lie but harmless with aiortc: the gateway is the controlling offerer anyway."""
    async with browser_service(settings, chromium, mark_ice_lite=True) as service:
        call, sandbox_call, phone = await connected_call(service)
        assert "a=ice-lite" in phone.answer_sdp.split("\r\n")
        await drain(call.media)
        await call.hangup()
    assert call.end_reason is EndReason.BUSINESS_HANGUP


async def test_browser_hang_up_ends_the_wacall_call(settings, chromium):
    async with browser_service(settings, chromium) as service:
        call, sandbox_call, phone = await connected_call(service)
        await drain(call.media)
        await phone.user_hang_up()  # pc.close() in the page
        await call.wait_state(CallState.ENDED, TIMEOUT)
        await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.USER_HANGUP  # the sandbox sent terminate
    assert sandbox_call.ended_by == "user_hangup"


async def test_browser_hang_up_without_terminate_is_a_media_failure(settings, chromium):
    """If no terminate came, wacall would still notice: Chromium's pc.close() sends a
    DTLS close_notify, aiortc closes the transport, the call ends as media_failure."""
    async with Service(settings, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.phone_factory = browser_phone_factory(chromium)  # not linked to the sandbox
        service.sandbox._watch_phone_hangup = lambda call: None  # the provider sends no terminate
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call, sandbox_call, phone = await connected_call(service)
        await drain(call.media)
        await phone.user_hang_up()
        reason = await asyncio.wait_for(call.media.ended, TIMEOUT)
        await call.wait_state(CallState.ENDED, TIMEOUT)
    assert reason == "transport closed"
    assert call.end_reason is EndReason.MEDIA_FAILURE


async def test_wacall_hang_up_ends_the_page_connection(settings, chromium):
    # The phone waits (bounded) for the page to see the far end go before closing it.
    async with browser_service(settings, chromium, await_remote_close_s=10.0) as service:
        call, sandbox_call, phone = await connected_call(service)
        await drain(call.media)
        await call.hangup()
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert phone.remote_ended.done()
    assert phone.remote_ended.result() in ("dtls closed", "connection closed", "connection failed",
                                           "dtls failed")
    assert not phone.hung_up.done()  # the page did not hang up by itself


async def test_chromium_unavailable_is_reported():
    host = ChromiumHost(executable_path="/nonexistent/chromium")
    with pytest.raises(ChromiumUnavailable, match="no Chromium at /nonexistent/chromium"):
        await host.start()
    await host.close()


async def test_chromium_dtmf_reaches_wacall_in_order(settings, chromium):
    """The page presses keys with RTCDTMFSender.insertDTMF; wacall decodes RFC 4733."""
    async with browser_service(settings, chromium) as service:
        call, sandbox_call, phone = await connected_call(service)
        assert call.media.peer.dtmf_payload_type is not None  # Chromium kept telephone-event/8000
        await asyncio.wait_for(phone.connected.wait(), TIMEOUT)
        await phone.press("159#*0AD")

        async def received():
            while len(call.dtmf_received) < 8:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(received(), TIMEOUT)
        assert "".join(call.dtmf_received) == "159#*0AD"
        durations = [e.detail["duration_ms"] for e in call.timeline if e.name == "dtmf"]
        assert all(100 <= d <= 160 for d in durations), durations
        await call.hangup()


def chromium_threads(host: ChromiumHost) -> list[tuple[int, str]]:
    """(tid, name) of every thread of this host's Chromium: the browser process (the
    one whose command line names the host's fake-capture file, generated in a directory
    of its own) and its descendants. Other Chromiums on the machine (another test run)
    are not ours to judge."""
    parents: dict[int, int] = {}
    roots = set()
    mark = f"--use-file-for-fake-audio-capture={host.capture_wav}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read() and "chrom" in os.path.basename(os.readlink(f"/proc/{pid}/exe")):
                    roots.add(int(pid))
        except OSError:
            continue  # gone, or not ours to read
    ours, grew = set(roots), True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    out = []
    for pid in ours:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    out.append((int(tid), f.read().strip()))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
async def test_chromium_runs_as_a_background_process_during_a_call(settings, chromium):
    """The browser phone shares the gateway's cores: it must not pre-empt it (no
    real-time audio threads, niceness 10), or the gateway sends its packets late."""
    async with browser_service(settings, chromium) as service:
        call, sandbox_call, phone = await connected_call(service, sources=[ToneSource(1000, 0.5)])
        await asyncio.wait_for(phone.connected.wait(), TIMEOUT)
        await call.wait_playback()
        threads = chromium_threads(chromium)
        policies = {}
        for tid, name in threads:
            with contextlib.suppress(OSError):
                policies[name] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
        await call.hangup()
    assert any("Audio" in name for name in policies), sorted(policies)  # the call's audio threads
    realtime = {n for n, (policy, _) in policies.items() if policy in (os.SCHED_RR, os.SCHED_FIFO)}
    if not chromium.realtime_dropped:
        # root without CAP_SETPCAP: CAP_SYS_NICE cannot be dropped, and with it Chromium
        # sets its own thread priorities (real-time audio, nice -8). Logged at launch.
        pytest.skip(f"this machine does not let wacall drop Chromium's CAP_SYS_NICE "
                    f"(real-time threads: {sorted(realtime)})")
    assert not realtime
    # none above the niceness it was started with (threads may lower their own priority:
    # Chromium's background workers can go nicer still)
    assert min(nice for _, nice in policies.values()) == 10, policies
