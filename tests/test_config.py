import json
import subprocess
import sys

import pytest

from gateway.config import ConfigError, Settings


def test_defaults_work_for_the_sandbox():
    s = Settings.load(env={})
    assert s.provider == "360dialog" and s.port == 8080 and s.ring_timeout_s == 60
    assert s.media_addresses is None and s.media_port_range is None
    assert str(s.media_root) == "wacall-data/media"


def test_env_parsing():
    s = Settings.load(env={
        "WACALL_PROVIDER": "meta", "WACALL_META_TOKEN": "tok", "WACALL_PHONE_NUMBER_ID": "123",
        "WACALL_ICE_SERVERS": "stun:stun.example.org:3478,turn:alice:s3cret@turn.example.org:3478?transport=udp",
        "WACALL_MEDIA_PORT_RANGE": "40000-40099", "WACALL_MEDIA_ADDRESSES": "10.0.0.5, 127.0.0.1",
        "WACALL_INBOUND_PLAY": "a.ogg,b.wav", "WACALL_INBOUND_RECORD": "no", "WACALL_MAX_CALLS": "7",
        "WACALL_OPUS_COMPLEXITY": "2", "WACALL_OPUS_BITRATE": "24000",
    })
    assert s.provider == "meta" and s.provider_kwargs()["phone_number_id"] == "123"
    assert [(i.url, i.username, i.credential) for i in s.ice_servers] == [
        ("stun:stun.example.org:3478", None, None),
        ("turn:turn.example.org:3478?transport=udp", "alice", "s3cret")]
    assert s.media_port_range == (40000, 40099)
    assert s.media_addresses == ["10.0.0.5", "127.0.0.1"]
    assert s.inbound_play == ["a.ogg", "b.wav"] and s.inbound_record is False and s.max_calls == 7
    peer = s.peer_config()
    assert peer.port_range == (40000, 40099) and len(peer.ice_servers) == 2
    assert (peer.opus.complexity, peer.opus.bitrate) == (2, 24000)
    default = Settings.load(env={}).peer_config().opus
    assert (default.complexity, default.bitrate, default.application) == (5, 32000, "audio")


@pytest.mark.parametrize("env, fragment", [
    ({"WACALL_PROVIDER": "twilio"}, "WACALL_PROVIDER"),
    ({"WACALL_RING_TIMEOUT_S": "-3"}, "WACALL_RING_TIMEOUT_S"),
    ({"WACALL_PORT": "eighty"}, "WACALL_PORT"),
    ({"WACALL_MEDIA_PORT_RANGE": "99-10"}, "WACALL_MEDIA_PORT_RANGE"),
    ({"WACALL_ICE_SERVERS": "http://x"}, "not a stun:/turn: URL"),
    ({"WACALL_INBOUND_RECORD": "maybe"}, "WACALL_INBOUND_RECORD"),
    ({"WACALL_OPUS_COMPLEXITY": "11"}, "WACALL_OPUS_COMPLEXITY"),
    ({"WACALL_OPUS_BITRATE": "5000"}, "WACALL_OPUS_BITRATE"),
])
def test_bad_values_are_named(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Settings.load(env=env)


def test_missing_credentials_are_named():
    with pytest.raises(ConfigError, match="WACALL_D360_API_KEY"):
        Settings.load(env={}).provider_kwargs()
    with pytest.raises(ConfigError, match="WACALL_META_TOKEN and WACALL_PHONE_NUMBER_ID"):
        Settings.load(env={"WACALL_PROVIDER": "meta"}).provider_kwargs()


def test_toml_file_and_env_precedence(tmp_path):
    path = tmp_path / "wacall.toml"
    path.write_text('ring_timeout_s = 45\nmedia_port_range = [40000, 40010]\n'
                    'ice_servers = ["stun:stun.example.org:3478"]\nport = 9000\n')
    s = Settings.load(env={"WACALL_PORT": "9100"}, config_file=path)
    assert s.ring_timeout_s == 45 and s.media_port_range == (40000, 40010)
    assert s.port == 9100  # the environment wins
    assert Settings.load(env={"WACALL_CONFIG": str(path)}).port == 9000
    path.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown settings colour"):
        Settings.load(env={}, config_file=path)
    path.write_text("ring_timeout_s = [\n")
    with pytest.raises(ConfigError, match="wacall.toml"):
        Settings.load(env={}, config_file=path)


def test_wacall_config_masks_secrets(tmp_path):
    env = {"PATH": "", "WACALL_D360_API_KEY": "d360-key-abcdefghijklmnop",
           "WACALL_API_TOKEN": "api-token-abcdefghijklmnop", "WACALL_EVENT_SECRET": "ev-secret-abcdefghijkl",
           "WACALL_ICE_SERVERS": "turn:alice:turnpass123@turn.example.org:3478",
           "WACALL_EVENT_WEBHOOKS": "https://crm.example.org/hook?token=querysecret"}
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "config"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for secret in ("d360-key-abcdefghijklmnop", "api-token-abcdefghijklmnop", "ev-secret-abcdefghijkl",
                   "turnpass123", "querysecret"):
        assert secret not in out.stdout
    shown = json.loads(out.stdout)
    assert shown["d360_api_key"].startswith("d360") and "chars" in shown["d360_api_key"]
    assert shown["event_webhooks"] == ["https://crm.example.org/hook"]
