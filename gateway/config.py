"""Settings: ``WACALL_*`` environment variables over an optional TOML file over defaults.

Every setting has a default that works against the embedded sandbox. The TOML file
(``WACALL_CONFIG`` or ``wacall --config FILE``) uses the setting names in lower case
without the prefix (``ring_timeout_s = 45``, ``ice_servers = ["stun:…"]``);
environment variables win over it. ``wacall config`` prints the effective settings
with secrets masked.
"""

from __future__ import annotations

import json

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from media.opus import OpusSettings
from media.peer import IceServer, PeerConfig
from media.session import RECORDING_FORMATS

from .recordings import ProviderRecording
from .redact import mask_secret
from .sip.spec import CODECS as SIP_CODECS, parse_uri
from .webhook_auth import parse_header_setting

PROVIDERS = ("360dialog", "meta")
INBOUND = ("answer", "reject")


class ConfigError(ValueError):
    """A setting has a value wacall cannot use."""


def parse_ice_servers(raw: str | list) -> list[IceServer]:
    """``stun:host:port,turn:user:secret@host:port?transport=udp`` -> ICE servers."""
    items = raw if isinstance(raw, list) else raw.split(",")
    servers = []
    for item in filter(None, (str(part).strip() for part in items)):
        scheme, sep, rest = item.partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise ConfigError(f"ice_servers: {item!r} is not a stun:/turn: URL")
        username = credential = None
        if "@" in rest:
            auth, rest = rest.rsplit("@", 1)
            username, _, credential = auth.partition(":")
        servers.append(IceServer(f"{scheme}:{rest}", username or None, credential or None))
    return servers


def _list(raw: str | list) -> list[str]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _bool(raw: str | bool) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _positive(kind: type) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        value = kind(raw)
        if value <= 0:
            raise ValueError(f"must be positive, got {raw!r}")
        return value

    return parse


def _bounded_int(low: int, high: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, got {value}")
        return value
    return parse


def _non_negative(kind: type) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        value = kind(raw)
        if value < 0:
            raise ValueError(f"must be zero or more, got {raw!r}")
        return value

    return parse


def _record_policy(raw: Any) -> bool | str:
    if str(raw).strip().lower() == "required":
        return "required"
    return _bool(raw)


def _provider_recording(raw: Any) -> str:
    """``WACALL_INBOUND_PROVIDER_RECORDING``: the purpose as text, or the API's object as
    JSON (TOML: a table); kept as the object's canonical JSON."""
    if isinstance(raw, str):
        text = raw.strip()
        data = json.loads(text) if text.startswith("{") else {"purpose": text}
    else:
        data = raw
    return json.dumps(ProviderRecording.from_dict(data).to_dict())


def _host_port(raw: Any) -> tuple[str, int]:
    text = str(raw).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, e.g. 0.0.0.0:5060, got {raw!r}")
    return host.strip("[]"), int(port)


def _sip_uri(raw: Any) -> str:
    parse_uri(str(raw).strip())
    return str(raw).strip()


def _sip_codecs(raw: Any) -> list[str]:
    known = {c.lower(): c for c in SIP_CODECS}
    chosen = []
    for item in _list(raw):
        if item.lower() not in known:
            raise ValueError(f"{item!r} is not one of {', '.join(SIP_CODECS)}")
        chosen.append(known[item.lower()])
    if not chosen:
        raise ValueError("name at least one codec")
    return chosen


def _choice(options: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = str(raw).strip().lower()
        value = (aliases or {}).get(value, value)
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _port_range(raw: str | list) -> tuple[int, int]:
    low, high = (raw if isinstance(raw, list) else str(raw).replace(":", "-").split("-"))
    low, high = int(low), int(high)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"must be LOW-HIGH within 1024-65535, got {raw!r}")
    return low, high


def setting(default: Any = None, parse: Callable[[Any], Any] = str, *, group: str, secret: bool = False,
            factory: Callable[[], Any] | None = None) -> Any:
    """One setting, declared once: its default, how ``WACALL_<NAME>`` / the TOML value is
    parsed, its concern (``group``) and whether it is a secret (masked when printed)."""
    meta = {"parse": parse, "group": group, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class Settings:
    # -- provider: who carries the calls ---------------------------------------------------
    provider: str = setting("360dialog", _choice(PROVIDERS, {"d360": "360dialog"}), group="provider")
    base_url: str | None = setting(group="provider")
    d360_api_key: str | None = setting(group="provider", secret=True)
    meta_token: str | None = setting(group="provider", secret=True)
    phone_number_id: str | None = setting(group="provider")
    graph_version: str = setting("v23.0", group="provider")
    verify_token: str | None = setting(group="provider", secret=True)
    # -- webhook authentication: Meta's signature, 360dialog's signature, a custom header ----
    #: Meta's app secret: ``X-Hub-Signature-256`` is checked on every webhook.
    app_secret: str | None = setting(group="webhooks", secret=True)
    #: 360dialog's webhook secret: ``x-360dialog-signature`` is checked.
    d360_webhook_secret: str | None = setting(group="webhooks", secret=True)
    #: ``"Name: value"``: a header the provider sends with each webhook (set on its URL).
    webhook_header: tuple[str, str] | None = setting(parse=parse_header_setting, group="webhooks", secret=True)
    #: ``none`` accepts unauthenticated webhooks (refused at startup otherwise, when no
    #: method above is configured); ``required`` (the default) does not.
    webhook_auth: str = setting("required", _choice(("required", "none")), group="webhooks")
    # -- service: HTTP, control API, storage ------------------------------------------------
    api_token: str | None = setting(group="service", secret=True)
    data_dir: Path = setting(parse=Path, group="service", factory=lambda: Path("wacall-data"))
    media_dir: Path | None = setting(parse=Path, group="service")
    host: str = setting("127.0.0.1", group="service")
    port: int = setting(8080, _bounded_int(0, 65535), group="service")
    log_format: str = setting("json", _choice(("json", "text")), group="service")
    #: Share calls, webhook ids and events with other instances through this Redis
    #: (``redis://[:password@]host:port/db``); unset: ``wacall.sqlite3`` in the data dir.
    redis_url: str | None = setting(group="service", secret=True)
    #: This instance's name on the calls it runs (the store's ``owner``).
    instance: str = setting(parse=str, group="service", factory=socket.gethostname)
    #: Ended calls are kept in the store (``GET /v1/calls`` across restarts) this long.
    call_retention_days: float = setting(30.0, _positive(float), group="calls")
    #: Tries of a hang-up (``terminate``/``reject``) before it is reported unconfirmed
    #: (pauses of 0.25 s, doubling); an unconfirmed one is tried again at the next start.
    hangup_attempts: int = setting(6, _positive(int), group="calls")
    #: Below this much free space in the data dir, recording is refused (507) and
    #: ``/readyz`` is 503. Unset: two minutes of recording at ``max_calls`` (see gateway.disk).
    min_free_mb: int | None = setting(parse=_non_negative(int), group="service")
    # -- media: WebRTC and the network -----------------------------------------------------
    ice_servers: list[IceServer] = setting(parse=parse_ice_servers, group="media", factory=list)
    media_addresses: list[str] | None = setting(parse=_list, group="media")
    media_port_range: tuple[int, int] | None = setting(parse=_port_range, group="media")
    advertised_address: str | None = setting(group="media")
    gather_timeout_s: float = setting(5.0, _positive(float), group="media")
    media_timeout_s: float = setting(20.0, _positive(float), group="media")
    rtp_timeout_s: float = setting(15.0, _positive(float), group="media")
    #: Media worker processes: every call's media (WebRTC, recording, bots) runs in one
    #: of them, on its own core; HTTP, webhooks and call state stay in the main process.
    #: ``0``: media in the main process. Unset: ``wacall serve`` starts one per core,
    #: an embedded service (tests, ``wacall demo``/``call``) runs media in-process.
    workers: int | None = setting(parse=_non_negative(int), group="media")
    #: How RTP travels once DTLS is up: ``lean`` (one 20 ms ticker sends every call's
    #: frames straight to the socket and drains every call's socket, with the kernel's
    #: arrival times) or ``aiortc`` (aiortc's per-call loops).
    rtp_path: str = setting("lean", _choice(("lean", "aiortc")), group="media")
    #: Also detect DTMF sent as audio tones (Goertzel), besides RFC 4733 events.
    inband_dtmf: bool = setting(False, _bool, group="media")
    #: Speech start/stop events (energy based) on the user's audio, as call events.
    speech_events: bool = setting(True, _bool, group="media")
    #: The Opus encoder for audio the gateway encodes live (tones, bots, SIP parties;
    #: prompts are pre-encoded): bit/s, and complexity 0..10. Lower complexity is
    #: cheaper: a bot's 16 kHz voice costs ~26 µs a frame at 2 against ~39 at 5, its
    #: waveform within 0.1 dB SNR (``bench/encoder_cost.py``).
    opus_bitrate: int = setting(32_000, _bounded_int(6_000, 510_000), group="media")
    opus_complexity: int = setting(5, _bounded_int(0, 10), group="media")
    # -- calls -----------------------------------------------------------------------------
    ring_timeout_s: float = setting(60.0, _positive(float), group="calls")
    max_duration_s: float = setting(3600.0, _positive(float), group="calls")
    max_calls: int = setting(100, int, group="calls")
    #: Ended calls kept in memory for ``GET /v1/calls`` and late webhooks (oldest go first).
    call_history: int = setting(1000, _non_negative(int), group="calls")
    # -- inbound calls ---------------------------------------------------------------------
    inbound: str = setting("answer", _choice(INBOUND), group="inbound")
    inbound_play: list[str] = setting(parse=_list, group="inbound", factory=list)
    #: Record callers: ``true`` (answered unrecorded when the disk is low), ``false``,
    #: or ``required`` (rejected when recording cannot start).
    inbound_record: bool | str = setting(True, _record_policy, group="inbound")
    #: Route inbound calls to this voice bot (``ws://…`` or ``tcp://host:port``).
    inbound_bot_url: str | None = setting(group="inbound")
    #: Ask WhatsApp to record (and transcribe) answered inbound calls: the purpose
    #: announced, or ``{"purpose", "announcement_language", "transcription"}`` as JSON.
    #: Meta backend only.
    inbound_provider_recording: str | None = setting(parse=_provider_recording, group="inbound")
    inbound_bot_protocol: str = setting("twilio", _choice(("twilio", "pcm", "audiosocket")), group="inbound")
    #: Where bots may be: networks (CIDR) and host names. Unset: anywhere but link-local
    #: (cloud metadata) addresses and this gateway's own port.
    bot_allow: list[str] = setting(parse=_list, group="inbound", factory=list)
    #: Join inbound callers to this SIP party (an IVR, a PBX queue) once answered.
    inbound_sip_uri: str | None = setting(parse=_sip_uri, group="inbound")
    inbound_sip_username: str | None = setting(group="inbound")
    inbound_sip_password: str | None = setting(group="inbound", secret=True)
    # -- SIP --------------------------------------------------------------------------------
    #: ``host:port`` the SIP user agent listens on (UDP and TCP); SIP is off without it.
    sip_listen: tuple[str, int] | None = setting(parse=_host_port, group="sip")
    #: Digest credentials a PBX must present to place WhatsApp calls through wacall
    #: (the SIP trunk). Without them INVITEs from outside are refused (403).
    sip_username: str | None = setting(group="sip")
    sip_password: str | None = setting(group="sip", secret=True)
    #: The address in our Contact and SDP when it differs from the listening one (NAT).
    sip_advertised_address: str | None = setting(group="sip")
    #: UDP ports for SIP legs' RTP (even ports for RTP, the next odd one for RTCP).
    sip_rtp_port_range: tuple[int, int] | None = setting(parse=_port_range, group="sip")
    #: Codecs offered and accepted on SIP legs, in preference order.
    sip_codecs: list[str] = setting(parse=_sip_codecs, group="sip", factory=lambda: list(SIP_CODECS))
    #: A SIP party whose RTP stops for this long is hung up (``sip_failure``).
    sip_rtp_timeout_s: float = setting(30.0, _positive(float), group="sip")
    # -- events out ------------------------------------------------------------------------
    event_webhooks: list[str] = setting(parse=_list, group="events", factory=list)
    event_secret: str | None = setting(group="events", secret=True)
    #: Events kept for SSE replay (``Last-Event-ID``).
    event_history: int = setting(1000, _non_negative(int), group="events")
    #: What a recorded call's files are: ``wav`` (user.wav and stereo.wav, decoded,
    #: plus user.ogg as received), ``opus`` (stereo.ogg: both legs as Opus, as they went
    #: over the wire, nothing decoded: the cheapest full recording) or ``both``.
    recording_format: str = setting("wav", _choice(tuple(RECORDING_FORMATS)), group="recording")
    # -- recording retention (applied at startup and after calls; unset = keep all) --------
    recording_max_age_s: float | None = setting(parse=_positive(float), group="recording")
    #: Recordings older than this many days are deleted (hourly; the call record stays).
    #: The same as ``WACALL_RECORDING_MAX_AGE_S`` in days; the shorter of the two wins.
    recording_retention_days: float | None = setting(parse=_positive(float), group="recording")
    recording_max_count: int | None = setting(parse=_positive(int), group="recording")
    recording_max_bytes: int | None = setting(parse=_positive(int), group="recording")
    # -- permissions -----------------------------------------------------------------------
    #: Permission rules: ``seed`` (2 requests / 7 days, 5 calls / 24 h) or ``meta``.
    permission_limits: str = setting("seed", _choice(("seed", "meta")), group="permissions")
    #: Turn ``callback_permission_status`` on at the provider at startup; a user who
    #: calls the business then grants a temporary permission.
    callback_permission: bool = setting(False, _bool, group="permissions")
    #: Ask the provider's permission-state endpoint before refusing for lack of permission.
    permission_reconcile: bool = setting(False, _bool, group="permissions")
    #: How long a call with ``if_no_permission: request`` waits for the user's answer.
    permission_wait_s: float = setting(3600.0, _positive(float), group="permissions")
    # -- sandbox ---------------------------------------------------------------------------
    #: Sandbox only: where the sandbox POSTs its webhooks (default: this service's own
    #: ``/webhooks/whatsapp``). Lets a separate ``wacall call`` process use the sandbox.
    sandbox_webhook_url: str | None = setting(group="sandbox")
    #: Sandbox only: ``full`` phones decode what they hear into a WAV and play what the
    #: user says from the file; ``lean`` ones keep what they hear as the Opus packets
    #: received (``<wacid>.ogg``, nothing decoded) and say a file pre-encoded once for
    #: all phones: several times the simulated users per core, for load tests.
    sandbox_phones: str = setting("full", _choice(("full", "lean")), group="sandbox")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: str | Path | None = None) -> Settings:
        """Defaults, then the TOML file (``config_file`` or ``WACALL_CONFIG``), then env."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("WACALL_CONFIG")
        if path:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path}: {exc}") from None
            unknown = sorted(set(data) - set(_PARSERS))
            if unknown:
                raise ConfigError(f"config file {path}: unknown settings {', '.join(unknown)}")
            for name, raw in data.items():
                values[name] = _parse(name, raw, f"{name} in {path}")
        for name in _PARSERS:
            raw = env.get(f"WACALL_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = _parse(name, raw, f"WACALL_{name.upper()}")
        return cls(**values)


    @property
    def media_root(self) -> Path:
        """Where playable files live (``WACALL_MEDIA_DIR``, default ``<data dir>/media``)."""
        return Path(self.media_dir) if self.media_dir else Path(self.data_dir) / "media"

    def peer_config(self) -> PeerConfig:
        return PeerConfig(
            ice_servers=list(self.ice_servers),
            host_addresses=self.media_addresses,
            port_range=self.media_port_range,
            advertised_address=self.advertised_address,
            gather_timeout_s=self.gather_timeout_s,
            connect_timeout_s=self.media_timeout_s,
            inband_dtmf=self.inband_dtmf,
            rtp_path=self.rtp_path,
            opus=OpusSettings(bitrate=self.opus_bitrate, complexity=self.opus_complexity),
        )

    def provider_kwargs(self) -> dict:
        """Arguments for :func:`gateway.providers.make_provider`; raises on missing credentials."""
        if self.provider == "360dialog":
            if not self.d360_api_key:
                raise ConfigError("WACALL_D360_API_KEY is required for the 360dialog provider")
            kwargs = {"api_key": self.d360_api_key}
            if self.inbound_provider_recording:
                raise ConfigError("WACALL_INBOUND_PROVIDER_RECORDING needs the meta provider: 360dialog does not "
                                  "document WhatsApp's call recording fields yet")
        else:
            missing = [n for n, v in (("WACALL_META_TOKEN", self.meta_token),
                                      ("WACALL_PHONE_NUMBER_ID", self.phone_number_id)) if not v]
            if missing:
                raise ConfigError(f"{' and '.join(missing)} required for the meta provider")
            kwargs = {"token": self.meta_token, "phone_number_id": self.phone_number_id,
                      "version": self.graph_version}
        if self.base_url:
            kwargs["base_url"] = self.base_url
        return kwargs

    def secret_values(self) -> list[str]:
        """Every configured secret's value (what logs and API answers must never show)."""
        values = []
        for name in _SECRETS:
            value = getattr(self, name)
            if isinstance(value, tuple):  # webhook_header: (name, value)
                value = value[1]
            if isinstance(value, str) and value:
                values.append(value)
        return values

    def masked(self) -> dict:
        """The effective settings with every secret masked (safe to print or log)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url" and value:
                value = _without_userinfo(value)
            elif f.name == "webhook_header" and value:
                value = f"{value[0]}: {mask_secret(value[1])}"
            elif f.name in _SECRETS and value:
                value = mask_secret(value)
            elif f.name == "ice_servers":
                value = [s.url + (" (with credentials)" if s.credential else "") for s in value]
            elif f.name == "event_webhooks":
                value = [_without_userinfo(url.split("?", 1)[0]) for url in value]
            elif f.name in ("base_url", "sandbox_webhook_url", "redis_url") and value:
                value = _without_userinfo(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["media_dir"] = str(self.media_root)
        return out


def _without_userinfo(url: str) -> str:
    """``https://user:pass@host/x`` -> ``https://***@host/x``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


#: How each setting is parsed, from its declaration.
_PARSERS: dict[str, Callable[[Any], Any]] = {f.name: f.metadata["parse"] for f in fields(Settings)}
_SECRETS = {f.name for f in fields(Settings) if f.metadata["secret"]}
#: The settings of each concern, in declaration order.
GROUPS: dict[str, list[str]] = {}
for _f in fields(Settings):
    GROUPS.setdefault(_f.metadata["group"], []).append(_f.name)


def _parse(name: str, raw: Any, where: str) -> Any:
    try:
        return _PARSERS[name](raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
