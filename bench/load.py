"""Whole-gateway load: N concurrent playback + recording calls, CPU and memory per call.

Two processes, as in a deployment: the *provider* (``wacall serve --sandbox`` in a child
process: the emulated calling API and N simulated users whose phones are aiortc peers)
and the *gateway* under test (this process: a :class:`gateway.app.Service` whose
provider client points at the child's ``/sandbox``). Only the gateway's CPU and memory
are measured, so the phones' cost does not count against it.

Every call: the business plays a pre-encoded prompt (Opus pass-through, the cheap path
a voice-prompt campaign takes), records the call (``record=True``: user.wav, the
wall-clock stereo.wav, Ogg/Opus pass-through of the user, sidecar), and receives the
user's audio through wacall's playout buffer (decoded for the recordings). The user
says a 600 Hz tone for the whole call; the prompt is 1 kHz.

Printed per N: gateway CPU ms per call-second and the calls one core carries at that
cost, RSS added per call, and the quality the calls had meanwhile: sends later than
one frame (underruns) and the worst lateness, received frames concealed, and, for a
sample of calls, the tones found in the recordings on both sides (FFT), as a fraction
of the measured window.

The machine's other core(s) run the provider's phones; when the machine is saturated
the gateway's lateness shows it. ``--lean-phones`` makes the phones cheaper
(``WACALL_SANDBOX_PHONES=lean``: they keep what they hear as Opus, decoded only here
afterwards, and say a file pre-encoded once), so more calls fit. Run:

    python bench/load.py [--calls 25 50 100] [--seconds 20] [--workers 0 1 2]
                         [--rtp-path lean aiortc naive] [--record full|opus|ogg-only|none]

With ``--workers N`` the gateway's media runs in N worker processes (``WACALL_WORKERS``):
the gateway's CPU and memory are then its main process's plus its workers'.

``--rtp-path`` runs each value in turn, against the same kind of phones: ``lean`` and
``aiortc`` are wacall's two RTP paths (``WACALL_RTP_PATH``); ``lean-py`` is the lean
path with its C core switched off (``WACALL_NATIVE_RTP=0``: what runs where
``media._rtpcore`` was not built); ``lean-nolane`` is the lean path sending every frame
through Python (``WACALL_RTP_LANE=0``: no sending ahead in C); ``naive`` keeps the
gateway's signalling but makes each call's media the way a newcomer would with stock
aiortc (``bench/naive.py``: a ``MediaPlayer`` on the prompt file, a ``MediaRecorder``
to user.wav, nothing else). A table of the runs closes the output.

``--bot``: instead of the prompt, every call is bridged to a voice bot in a child
process (``bench/tone_bot.py``, wacall's ``pcm`` protocol at 16 kHz) that says 1 kHz:
the gateway decodes and resamples the user's audio for it and resamples and encodes
the bot's per call (transcoding both ways). The bot reports the user's tone in what it
heard; the phones report the bot's.

``--record``: ``full`` (default: user.wav, stereo.wav, user.ogg, speech events),
``opus`` (``WACALL_RECORDING_FORMAT=opus``: stereo.ogg, both legs as Opus as they went
over the wire, aligned, nothing decoded; no speech events; the sampled recordings are
checked for the user's tone on the left and the prompt on the right),
``ogg-only`` (only user.ogg, passed through from RTP, and no speech events: nothing
reads the user's PCM, so wacall decodes none of it; media in-process only),
``ogg-decoded`` (the same, but decoding every frame anyway: what ogg-only saves), ``none``
(no recording; speech events still decode the user's audio). The naive gateway always
records user.wav alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import Service  # noqa: E402
from gateway.bots import BotSpec  # noqa: E402
from gateway.calls import CallState  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.sandbox.browser import write_tone_wav  # noqa: E402
from media import analysis, rtpcore  # noqa: E402
from media.frames import SAMPLE_RATE  # noqa: E402
from media.sources.prompt import PromptCache  # noqa: E402

BUSINESS_HZ = 1000.0
USER_HZ = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """``(utime, stime)`` of a process (all its threads), from /proc. stime is the
    kernel's share: system calls, and on loopback a send also runs the receiving
    socket's network stack in the sender's time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    return sum(cpu_times(pid))


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gateway_pids(service: Service) -> list[int]:
    """This process and its media workers (their CPU and memory are the gateway's)."""
    pool = service.workers
    return [os.getpid(), *([w.pid for w in pool.workers if w.alive] if pool is not None else [])]


async def wait_healthy(session: aiohttp.ClientSession, url: str, process: subprocess.Popen,
                       timeout: float = 30) -> None:
    """Wait until ``url``/healthz answers 200; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            async with session.get(f"{url}/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


#: The provider child process authenticates its webhooks to us with this header.
WEBHOOK_HEADER = "X-Bench-Hook: bench-" + os.urandom(8).hex()


class Provider:
    """``wacall serve --sandbox`` in a child process, its webhooks aimed at us."""

    def __init__(self, workdir: Path, gateway_port: int, lean_phones: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ,
                   WACALL_DATA_DIR=str(workdir / "provider"),
                   WACALL_PORT=str(self.port),
                   WACALL_HOST="127.0.0.1",
                   WACALL_WEBHOOK_HEADER=WEBHOOK_HEADER,
                   WACALL_WORKERS="0",  # (the phones are in the main process anyway)
                   WACALL_SANDBOX_PHONES="lean" if lean_phones else "full",
                   WACALL_SANDBOX_WEBHOOK_URL=f"http://127.0.0.1:{gateway_port}/webhooks/whatsapp")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--sandbox"], env=env,
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
            stderr=(workdir / "provider.log").open("wb"))

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 30) -> None:
        await wait_healthy(session, self.url, self.process, timeout)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


class _OggOnlyRecorder:
    """While installed: the gateway's recorder makes only user.ogg (``--record ogg-only``);
    ``decode``: the user's audio is decoded all the same (``--record ogg-decoded``, what
    it cost before decoding followed its readers)."""

    def __init__(self, decode: bool = False) -> None:
        self.decode = decode

    def __enter__(self):
        from media.peer import MediaPeer
        from media.sinks import recorder

        if self.decode:
            self._gate = MediaPeer._pcm_rate
            MediaPeer._pcm_rate = lambda peer: SAMPLE_RATE

        self._module, self._original = recorder, recorder.CallRecorder
        original = self._original

        class OggOnly(original):
            def __init__(self, directory, **kwargs):
                super().__init__(directory, **{**kwargs, "wav": False, "stereo": False, "ogg": True})

        recorder.CallRecorder = OggOnly
        return self

    def __exit__(self, *exc_info):
        self._module.CallRecorder = self._original
        if self.decode:
            from media.peer import MediaPeer

            MediaPeer._pcm_rate = self._gate

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, *exc_info):
        self.__exit__(*exc_info)


async def run(n: int, seconds: float, workdir: Path, profile: str | None = None, record: str = "full",
              workers: int = 0, rtp_path: str = "lean", profile_spy: str | None = None, bot: bool = False,
              lean_phones: bool = False, opus_complexity: int = 5, bot_frame_ms: int = 20) -> dict:
    if rtp_path == "naive" or record.startswith("ogg-"):
        if workers:
            raise SystemExit(f"--rtp-path {rtp_path} --record {record}: with media in-process only (--workers 0)")
    core_off = rtp_path == "lean-py"
    no_lane = rtp_path == "lean-nolane"
    run_dir = workdir / f"n{n}-w{workers}-{rtp_path}-{record}-c{opus_complexity}"
    run_dir.mkdir(parents=True)
    recording = record != "none"
    naive = rtp_path == "naive"
    patch = (_OggOnlyRecorder(decode=record == "ogg-decoded") if record.startswith("ogg-") and not naive
             else contextlib.nullcontext())
    gateway_port = free_port()
    provider = Provider(run_dir, gateway_port, lean_phones)
    say = write_tone_wav(run_dir / "user-600hz.wav", USER_HZ, seconds + 30, amplitude=0.3)
    prompt_file = write_tone_wav(run_dir / "prompt-1khz.wav", BUSINESS_HZ, seconds + 30, amplitude=0.3)
    users = [f"+1555031{i:04d}" for i in range(n)]
    warm_up = [f"+1555032{i:04d}" for i in range(max(1, workers))]  # one call per media process first
    bot_process = bot_url = None
    try:
        async with aiohttp.ClientSession() as session:
            await provider.ready(session)
            if bot:
                bot_process, bot_url = await start_bot(run_dir)
            settings = Settings(
                data_dir=run_dir / "gateway", host="127.0.0.1", port=gateway_port,
                provider="360dialog", base_url=f"{provider.url}/sandbox", d360_api_key="sandbox-key",
                media_addresses=["127.0.0.1"], max_calls=n + 10, ring_timeout_s=60,
                webhook_header=tuple(part.strip() for part in WEBHOOK_HEADER.split(":", 1)),
                max_duration_s=seconds + 120, workers=workers,
                rtp_path="aiortc" if naive else "lean" if core_off or no_lane else rtp_path,
                speech_events=record in ("full", "none"), recording_format="opus" if record == "opus" else "wav",
                opus_complexity=opus_complexity)
            async with rtp_core(not core_off), lane(not no_lane), Service(settings) as service, patch:
                if naive:
                    from naive import sessions

                    service.manager.media_sessions = sessions(prompt_file)
                for user in users + warm_up:
                    async with session.post(f"{provider.url}/sandbox/users/{user}",
                                            json={"answer_after_ms": 0, "say": str(say)}) as r:
                        r.raise_for_status()
                    async with session.post(f"{provider.url}/sandbox/users/{user}/permission",
                                            json={"granted": True, "permanent": True}) as r:
                        r.raise_for_status()
                prompts = PromptCache()
                await prompts.preload(prompt_file)  # pre-encoded once, shared by every call

                def media_of_call() -> dict:
                    """A bot that speaks (the 1 kHz tone), or the pre-encoded 1 kHz prompt."""
                    if bot:
                        return {"bot": BotSpec.from_dict({"protocol": "pcm", "url": f"ws://{bot_url}/ws",
                                                          "frame_ms": bot_frame_ms})}
                    return {"sources": [prompts.source(prompt_file)]}

                warm = [await service.manager.place_call(user, record=recording, **media_of_call())
                        for user in warm_up]  # (codecs and modules loaded before memory is counted)
                await asyncio.gather(*(c.wait_state(CallState.MEDIA_CONNECTED, 60) for c in warm))
                for c in warm:
                    await c.hangup()
                await asyncio.gather(*(c.wait_finished(30) for c in warm))
                pids = gateway_pids(service)
                base_rss = sum(rss_mb(pid) for pid in pids)
                calls = []
                # In two halves: the RSS each half adds, up and settled, gives the slope
                # (what one more call costs, without what the first calls of a process
                # add once: caches, the event history filling up, heap growth).
                half_rss = []
                for batch in (users[: n // 2], users[n // 2 :]):
                    for user in batch:  # a steady stream of dialling, not one burst
                        calls.append(await service.manager.place_call(user, record=recording, **media_of_call()))
                    await asyncio.gather(*(c.wait_state(CallState.MEDIA_CONNECTED, 60) for c in calls))
                    await asyncio.sleep(1.0)  # let every playout buffer settle
                    half_rss.append(sum(rss_mb(pid) for pid in pids))
                for c in calls:  # count the sends' quality from here on
                    await c.media.reset_pacing()
                per_worker = service.workers.load() if service.workers is not None else None
                profiler = None
                if profile:
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
                spy = start_spy(profile_spy, seconds) if profile_spy else None
                times0, wall0 = [cpu_times(pid) for pid in pids], time.monotonic()
                provider_cpu0 = cpu_seconds(provider.process.pid)
                await asyncio.sleep(seconds)
                times1, wall1 = [cpu_times(pid) for pid in pids], time.monotonic()
                provider_cpu1 = cpu_seconds(provider.process.pid)
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(profile)
                if spy is not None:
                    await asyncio.to_thread(spy.wait, 30)
                rss = sum(rss_mb(pid) for pid in pids)
                stats = [await c.media.get_stats() for c in calls]
                # frames handed on without decoding (nothing read PCM; media in-process only)
                receivers = [getattr(getattr(c.media, "peer", None), "_receiver", None) for c in calls]
                not_decoded = sum(getattr(rx, "frames_not_decoded", 0) for rx in receivers)
                alive = sum(c.state is CallState.MEDIA_CONNECTED for c in calls)
                ended: dict[str, int] = {}
                for c in calls:
                    if c.end_reason is not None:
                        why = f"{c.end_reason.value}: {c.end_detail or ''}"[:80]
                        ended[why] = ended.get(why, 0) + 1
                sample = calls[:: max(1, n // 4)][:4]
                for c in calls:
                    await c.hangup()
                await asyncio.gather(*(c.wait_finished(30) for c in calls))
                bot_heard = []
                if bot:
                    async with session.get(f"http://{bot_url}/heard") as r:
                        bot_heard = (await r.json())["heard"][len(warm_up):]
                heard = []
                recorded_prompt = []  # (stereo.ogg: the business's leg as recorded, too)
                for c in sample if recording else ():
                    files = c.recording_files
                    if "stereo_ogg" in files:
                        (x, prompt), rate = analysis.read_channels(files["stereo_ogg"])
                        recorded_prompt.append(analysis.tone_seconds(prompt, rate, BUSINESS_HZ) / (x.size / rate))
                    else:
                        x, rate = analysis.read_audio(Path(files.get("user_wav") or files["user_ogg"]))
                    heard.append(analysis.tone_seconds(x, rate, USER_HZ) / (x.size / rate))
    finally:
        provider.stop()
        if bot_process is not None:
            bot_process.terminate()
            bot_process.wait(10)
    provider_says = [line for line in (run_dir / "provider.log").read_text(errors="replace").splitlines()
                     if '"WARNING"' in line or '"ERROR"' in line][:5]
    phone_heard = []
    heard_files = sorted((run_dir / "provider").rglob("*.ogg" if lean_phones else "*.wav"))
    for wav in heard_files[:4]:
        x, rate = analysis.read_audio(wav)
        if x.size:
            phone_heard.append(analysis.tone_seconds(x, rate, BUSINESS_HZ) / (x.size / rate))
    wall = wall1 - wall0
    cpu0, cpu1 = (sum(u + k for u, k in times) for times in (times0, times1))
    sys0, sys1 = (sum(k for _, k in times) for times in (times0, times1))
    worker_cpu0, worker_cpu1 = ([u + k for u, k in times[1:]] for times in (times0, times1))
    cpu_ms_per_call_s = (cpu1 - cpu0) * 1000 / (n * wall)
    pacing = [s.get("pacing") or {"frames": 0, "underruns": 0, "max_late_ms": 0.0} for s in stats]  # (naive: none)
    playout = [s.get("playout") or {} for s in stats]
    played = sum(p.get("frames_played", 0) + p.get("frames_concealed", 0) for p in playout)
    concealed = sum(p.get("frames_concealed", 0) for p in playout)
    return {
        "calls": n,
        "rtp_path": rtp_path,
        "workers": workers,
        "calls_per_worker": per_worker,
        "worker_cores": [round((b - a) / wall, 2) for a, b in zip(worker_cpu0, worker_cpu1)],
        "record": record,
        "opus_complexity": opus_complexity,
        "gateway": "naive stock aiortc" if naive else "wacall",
        "alive": alive,
        "ended_early": ended,
        "provider_warnings": provider_says,
        "window_s": round(wall, 2),
        "cpu_ms_per_call_s": round(cpu_ms_per_call_s, 2),
        "calls_per_core": round(1000 / cpu_ms_per_call_s) if cpu_ms_per_call_s else None,
        "rss_mb_per_call": round((rss - base_rss) / n, 2),
        "rss_slope_mb_per_call": round((half_rss[1] - half_rss[0]) / (n - n // 2), 2) if n > 1 else None,
        "gateway_cores": round((cpu1 - cpu0) / wall, 2),
        "kernel_pct": round(100 * (sys1 - sys0) / (cpu1 - cpu0)) if cpu1 > cpu0 else None,
        "provider_cores": round((provider_cpu1 - provider_cpu0) / wall, 2),
        "sent_frames": sum(p["frames"] for p in pacing),
        "ahead_pct": round(100 * sum(p.get("ahead_frames", 0) for p in pacing)
                           / max(1, sum(p["frames"] for p in pacing)), 1),
        "underruns": sum(p["underruns"] for p in pacing),
        "max_late_ms": round(max(p["max_late_ms"] for p in pacing), 1),
        "p50_call_max_late_ms": round(statistics.median(p["max_late_ms"] for p in pacing), 1),
        "received_frames": played,
        "frames_not_decoded": not_decoded,
        "concealed_pct": round(100 * concealed / played, 3) if played else None,
        "user_tone_in_recording": [round(h, 3) for h in heard],
        "prompt_in_recording": [round(h, 3) for h in recorded_prompt],
        "bot": bot,
        "user_tone_at_bot": bot_heard,
        "prompt_at_phone": [round(h, 3) for h in phone_heard],
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "main_cores": round((cpu1 - cpu0 - sum(worker_cpu1) + sum(worker_cpu0)) / wall, 2),
    }


async def start_bot(workdir: Path) -> tuple[subprocess.Popen, str]:
    """``bench/tone_bot.py`` in a child process; returns it and its ``host:port``."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("tone_bot.py")), "--keep", "8"],
                               stdout=subprocess.PIPE, stderr=(workdir / "bot.log").open("wb"), text=True)
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
    if not line.startswith("port "):
        process.kill()
        raise RuntimeError(f"the bot did not start: {(workdir / 'bot.log').read_text()[-500:]}")
    return process, f"127.0.0.1:{int(line.split()[1])}"


def start_spy(path: str, seconds: float) -> subprocess.Popen:
    """py-spy sampling this process (every thread; not pausing it) for ``seconds``, as
    collapsed stacks in ``path`` (``bench/spy_top.py`` ranks them)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--duration", str(max(1, int(seconds))),
                             "--rate", "250", "--format", "raw", "--nonblocking", "-o", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def rtp_core(on: bool):
    """The gateway's lean path with its C core (``on``) or without, in this process and
    in the media workers it starts (the phones keep theirs: the same phones either way)."""
    before = os.environ.get("WACALL_NATIVE_RTP")
    if not on:
        os.environ["WACALL_NATIVE_RTP"] = "0"
    was = rtpcore.enable(on)
    try:
        yield
    finally:
        rtpcore.enable(was)
        if before is None:
            os.environ.pop("WACALL_NATIVE_RTP", None)
        else:
            os.environ["WACALL_NATIVE_RTP"] = before


@contextlib.asynccontextmanager
async def lane(on: bool):
    """The lean sender's lane (sending ahead in C while a prompt or silence plays) on or
    off, in this process and in the media workers it starts."""
    from media import lean

    before, was = os.environ.get("WACALL_RTP_LANE"), lean.RUNWAY
    os.environ["WACALL_RTP_LANE"] = "1" if on else "0"
    lean.RUNWAY = lean.RUNWAY_FRAMES if on else 0
    try:
        yield
    finally:
        lean.RUNWAY = was
        if before is None:
            os.environ.pop("WACALL_RTP_LANE", None)
        else:
            os.environ["WACALL_RTP_LANE"] = before


async def main(counts: list[int], seconds: float, as_json: bool, profile: str | None, records: list[str],
               workers: list[int], paths: list[str], rounds: int = 1, spy: str | None = None,
               bot: bool = False, lean_phones: bool = False, complexities: tuple[int, ...] = (5,),
               bot_frame_ms: int = 20) -> None:
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="wacall-load-") as tmp:
        # (the stock gateway records user.wav whatever --record says: one run of it per round)
        runs = [(n, w, p, r, c) for _ in range(rounds) for w in workers for n in counts for p in paths
                for r in records for c in complexities if p != "naive" or (r, c) == (records[0], complexities[0])]
        for i, (n, w, path, record, c) in enumerate(runs):
            result = await run(n, seconds, Path(tmp) / str(i), profile, record, w, path,
                               spy and (spy if len(runs) == 1 else f"{spy}.{i}"), bot, lean_phones, c, bot_frame_ms)
            results.append(result)
            if as_json:
                print(json.dumps(result), flush=True)
                continue
            if result["ended_early"]:
                print(f"     ended before the hang-up: {result['ended_early']}")
                for line in result["provider_warnings"]:
                    print(f"     provider: {line[:300]}")
            where = (f"{w} media worker(s), calls per worker {result['calls_per_worker']}, worker cores "
                     f"{result['worker_cores']}, main process {result['main_cores']} cores; " if w else "media in-process; ")
            at_bot = f"user's at the bot {result['user_tone_at_bot']}, " if bot else ""
            prompt_rec = (f"prompt in recordings {result['prompt_in_recording']}, "
                          if result["prompt_in_recording"] else "")
            print(f"{n:4d} calls{f' bridged to a bot (pcm, 16 kHz, {bot_frame_ms} ms messages)' if bot else ''}"
                  f"{f', Opus complexity {c}' if c != 5 else ''}"
                  f"{'' if record == 'full' else f' (recording: {record})'}, {path} RTP path "
                  f"({result['alive']} up through {result['window_s']} s), "
                  f"{where}"
                  f"gateway {result['cpu_ms_per_call_s']} ms CPU per call-second "
                  f"(~{result['calls_per_core']} calls/core), +{result['rss_mb_per_call']} MB RSS/call "
                  f"(slope {result['rss_slope_mb_per_call']} MB/call); "
                  f"cores busy: gateway {result['gateway_cores']} ({result['kernel_pct']} % in the kernel), provider+phones {result['provider_cores']}; "
                  f"sends: {result['underruns']} underruns of {result['sent_frames']} ({result['ahead_pct']} % sent "
                  f"ahead by the lane), worst "
                  f"{result['max_late_ms']} ms late (median call {result['p50_call_max_late_ms']} ms); "
                  f"received: {result['concealed_pct']} % concealed, {result['frames_not_decoded']} frames "
                  f"not decoded; tones found: user's in "
                  f"recordings {result['user_tone_in_recording']}, {at_bot}"
                  f"{prompt_rec}"
                  f"{'bot' if bot else 'prompt'} at phones {result['prompt_at_phone']}", flush=True)
    if len(results) > 1 and not as_json:
        table: dict[tuple, list[dict]] = {}
        for r in results:
            table.setdefault((r["calls"], r["workers"], r["rtp_path"], r["record"], r["opus_complexity"]), []).append(r)
        print("\ncalls workers path        record    cx gateway CPU ms/call-s (median; each run)   MB RSS/call (slope)  underruns")
        for (calls, w, path, record, c), rs in table.items():
            cpu = [r["cpu_ms_per_call_s"] for r in rs]
            print(f"{calls:5d} {w:7d} {path:11s} {'user.wav' if path == 'naive' else record:9s} {c:2d} {statistics.median(cpu):8.2f} "
                  f"({' '.join(f'{c:.1f}' for c in cpu)}){'':4s} "
                  f"{statistics.median(r['rss_mb_per_call'] for r in rs):8.2f} "
                  f"({statistics.median(r['rss_slope_mb_per_call'] for r in rs):.2f})  "
                  f"{'n/a' if path == 'naive' else statistics.median(r['underruns'] for r in rs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the measured window into FILE (numbers then include its overhead)")
    parser.add_argument("--bot", action="store_true",
                        help="each call bridged to a voice bot (bench/tone_bot.py in a child process, pcm protocol at "
                             "16 kHz) that says 1 kHz instead of the prompt: the user's audio decoded, resampled and "
                             "sent to it, its audio resampled and encoded per call (transcoding both ways)")
    parser.add_argument("--spy", metavar="FILE",
                        help="py-spy (pip install py-spy) samples the measured window into FILE as collapsed stacks "
                             "(little overhead: numbers stay comparable); python bench/spy_top.py FILE ranks them")
    parser.add_argument("--record", nargs="+", choices=["full", "opus", "ogg-only", "ogg-decoded", "none"], default=["full"],
                        help="one run per value; full: user.wav + stereo.wav + user.ogg + speech events; opus: "
                             "stereo.ogg (WACALL_RECORDING_FORMAT=opus: both legs as Opus, nothing decoded), no speech "
                             "events; ogg-only: user.ogg "
                             "passed through, no speech events (no PCM read: nothing decoded); ogg-decoded: the same, "
                             "decoding all the same (the saving's baseline); none")
    parser.add_argument("--no-record", dest="record", action="store_const", const=["none"],
                        help="= --record none (the user's audio is still decoded for speech events)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], metavar="N",
                        help="media worker processes, one run per value (0: media in the gateway's process)")
    parser.add_argument("--rtp-path", nargs="+", default=["lean"], choices=["lean", "lean-nolane", "lean-py", "aiortc", "naive"],
                        help="the gateway's RTP path (WACALL_RTP_PATH), one run per value; lean-nolane: the lean "
                             "path without its lane (WACALL_RTP_LANE=0: every frame through Python); lean-py: "
                             "without its C core; naive: stock "
                             "aiortc media (MediaPlayer/MediaRecorder, bench/naive.py) behind the same signalling")
    parser.add_argument("--lean-phones", action="store_true",
                        help="the provider's phones keep what they hear as Opus and say a pre-encoded file "
                             "(WACALL_SANDBOX_PHONES=lean): several times the calls this machine can host")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole set of runs, interleaved (A/B/A/B on a noisy machine); the "
                             "table then shows each configuration's median")
    parser.add_argument("--bot-frame-ms", type=int, default=20, choices=[20, 40, 60, 80, 100],
                        help="with --bot: the caller's audio per message to the bot (the pcm protocol's frame_ms)")
    parser.add_argument("--opus-complexity", type=int, nargs="+", default=[5], metavar="C",
                        help="the gateway's live Opus encoder complexity (WACALL_OPUS_COMPLEXITY: tones, a bot's "
                             "voice), one run per value")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.seconds, args.json, args.profile, args.record, args.workers, args.rtp_path,
                     args.rounds, args.spy, args.bot, args.lean_phones, tuple(args.opus_complexity),
                     args.bot_frame_ms))
