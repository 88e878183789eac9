"""`wacall demo`, run as a user runs it: a separate process, its recordings checked by FFT."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from media import analysis

BUSINESS_HZ, USER_HZ, PLAYED_S = 1000, 600, 3.0


def read_stereo(path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = [f.to_ndarray() for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    data = np.concatenate(frames, axis=1) if frames[0].shape[0] == 2 else \
        np.concatenate([f.reshape(-1, 2).T for f in frames], axis=1)
    data = data.astype(np.float32) / 32768
    return data[0], data[1], rate


def run_demo(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gateway.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("wacall") == "gateway.cli:main"


def test_demo_json_both_directions_heard(tmp_path):
    result = run_demo("--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    assert summary["state"] == "ended" and summary["end_reason"] == "business_hangup"
    assert summary["wacid"].startswith("wacid.")
    names = [entry["name"] for entry in summary["timeline"]]
    for name in ("created", "offer_sent", "ringing", "accepted", "media_up", "media_connected", "ended"):
        assert name in names
    assert all(entry["at"].endswith("Z") for entry in summary["timeline"])
    assert summary["setup_ms"]["offer_sent"] > 0 and summary["setup_ms"]["media_up"] > 0

    phone, gateway = tmp_path / "phone.wav", tmp_path / "gateway.wav"
    assert summary["recordings"] == {"gateway": str(gateway), "phone": str(phone),
                                     "stereo": str(tmp_path / "stereo.wav"), "ogg": str(tmp_path / "call.ogg")}
    # What the phone heard: the business's 1 kHz file, all of it, and nothing of the user's.
    x, rate = analysis.read_audio(phone)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(BUSINESS_HZ, abs=5)
    assert analysis.tone_seconds(x, rate, BUSINESS_HZ) == pytest.approx(PLAYED_S, rel=0.10)
    assert analysis.tone_seconds(x, rate, USER_HZ) == 0
    # What the gateway heard: the user's 600 Hz file.
    y, rate = analysis.read_audio(gateway)
    assert analysis.dominant_frequency(y, rate) == pytest.approx(USER_HZ, abs=5)
    assert analysis.tone_seconds(y, rate, USER_HZ) == pytest.approx(PLAYED_S, rel=0.10)
    assert analysis.tone_seconds(y, rate, BUSINESS_HZ) == 0
    # stereo.wav: the user on the left, the business on the right, each where it happened
    left, right, rate = read_stereo(tmp_path / "stereo.wav")
    assert analysis.tone_seconds(left, rate, USER_HZ) == pytest.approx(PLAYED_S, rel=0.10)
    assert analysis.tone_seconds(right, rate, BUSINESS_HZ) == pytest.approx(PLAYED_S, rel=0.10)
    assert analysis.tone_seconds(left, rate, BUSINESS_HZ) == 0 and analysis.tone_seconds(right, rate, USER_HZ) == 0
    # call.ogg: the user's side as Opus
    z, rate = analysis.read_audio(tmp_path / "call.ogg")
    assert analysis.tone_seconds(z, rate, USER_HZ) == pytest.approx(PLAYED_S, rel=0.10)
    audio = summary["audio"]
    assert audio["business_to_user"]["played_s"] == pytest.approx(PLAYED_S, abs=0.05)
    assert audio["user_to_business"]["active_s"] == pytest.approx(PLAYED_S, rel=0.10)


def test_demo_shows_progress_for_a_person(tmp_path):
    result = run_demo("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    order = ["ringing", "user picked up", "connected", "ended: business_hangup"]
    positions = [next(i for i, line in enumerate(lines) if key in line) for key in order]
    assert positions == sorted(positions)
    assert "business -> user: played 3.00 s" in result.stdout


def test_demo_reports_a_missing_file_clearly(tmp_path):
    result = run_demo("--out", str(tmp_path), "--play", str(tmp_path / "nope.wav"))
    assert result.returncode == 2
    assert "nope.wav" in result.stderr and "Traceback" not in result.stderr


def test_demo_plays_user_supplied_files(tmp_path):
    """--play and --phone-play take any format PyAV decodes (here WAV files we write)."""
    import numpy as np
    from media.sinks.wav import WavSink

    for name, freq in (("b.wav", 1500), ("u.wav", 400)):
        sink = WavSink(tmp_path / name)
        t = np.arange(48000) / 48000
        tone = (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
        for frame in tone.reshape(-1, 960):
            sink.write(frame, 48000)
        sink.close()
    out = tmp_path / "out"
    result = run_demo("--out", str(out), "--play", str(tmp_path / "b.wav"),
                      "--phone-play", str(tmp_path / "u.wav"), "--json")
    assert result.returncode == 0, result.stderr
    x, rate = analysis.read_audio(out / "phone.wav")
    assert analysis.tone_seconds(x, rate, 1500) == pytest.approx(1.0, rel=0.10)
    y, rate = analysis.read_audio(out / "gateway.wav")
    assert analysis.tone_seconds(y, rate, 400) == pytest.approx(1.0, rel=0.10)
