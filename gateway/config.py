"""Settings, read from ``WACALL_*`` environment variables (documented in the README).

Every setting has a default that works against the embedded sandbox; a real deployment
sets the provider credentials and, usually, the public URL and ICE servers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from media.peer import IceServer, PeerConfig

from .redact import mask_secret

PROVIDERS = ("360dialog", "meta")


class ConfigError(ValueError):
    """A setting has a value wacall cannot use."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def parse_ice_servers(raw: str) -> list[IceServer]:
    """``stun:host:port,turn:user:secret@host:port?transport=udp`` -> ICE servers."""
    servers = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        scheme, sep, rest = item.partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise ConfigError(f"WACALL_ICE_SERVERS: {item!r} is not a stun:/turn: URL")
        username = credential = None
        if "@" in rest:
            auth, rest = rest.rsplit("@", 1)
            username, _, credential = auth.partition(":")
        servers.append(IceServer(f"{scheme}:{rest}", username or None, credential or None))
    return servers


_SECRETS = {"d360_api_key", "meta_token", "api_token", "app_secret", "verify_token"}


@dataclass(slots=True)
class Settings:
    provider: str = "360dialog"
    base_url: str | None = None
    d360_api_key: str | None = None
    meta_token: str | None = None
    phone_number_id: str | None = None
    graph_version: str = "v23.0"
    api_token: str | None = None
    app_secret: str | None = None
    verify_token: str | None = None
    data_dir: Path = field(default_factory=lambda: Path("wacall-data"))
    host: str = "127.0.0.1"
    port: int = 8080
    ice_servers: list[IceServer] = field(default_factory=list)
    media_addresses: list[str] | None = None
    ring_timeout_s: float = 60.0
    max_duration_s: float = 3600.0
    gather_timeout_s: float = 5.0
    media_timeout_s: float = 20.0
    #: Sandbox only: where the sandbox POSTs its webhooks (default: this service's own
    #: ``/webhooks/whatsapp``). Lets a separate ``wacall call`` process use the sandbox.
    sandbox_webhook_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        provider = env.get("WACALL_PROVIDER", "360dialog").strip().lower()
        if provider == "d360":
            provider = "360dialog"
        if provider not in PROVIDERS:
            raise ConfigError(f"WACALL_PROVIDER must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        addresses = env.get("WACALL_MEDIA_ADDRESSES", "").strip()
        return cls(
            provider=provider,
            base_url=env.get("WACALL_BASE_URL") or None,
            d360_api_key=env.get("WACALL_D360_API_KEY") or None,
            meta_token=env.get("WACALL_META_TOKEN") or None,
            phone_number_id=env.get("WACALL_PHONE_NUMBER_ID") or None,
            graph_version=env.get("WACALL_GRAPH_VERSION") or "v23.0",
            api_token=env.get("WACALL_API_TOKEN") or None,
            app_secret=env.get("WACALL_APP_SECRET") or None,
            verify_token=env.get("WACALL_VERIFY_TOKEN") or None,
            data_dir=Path(env.get("WACALL_DATA_DIR") or "wacall-data"),
            host=env.get("WACALL_HOST") or "127.0.0.1",
            port=_int(env, "WACALL_PORT", 8080),
            ice_servers=parse_ice_servers(env.get("WACALL_ICE_SERVERS", "")),
            media_addresses=[a.strip() for a in addresses.split(",") if a.strip()] or None,
            ring_timeout_s=_float(env, "WACALL_RING_TIMEOUT_S", 60.0),
            max_duration_s=_float(env, "WACALL_MAX_DURATION_S", 3600.0),
            gather_timeout_s=_float(env, "WACALL_GATHER_TIMEOUT_S", 5.0),
            media_timeout_s=_float(env, "WACALL_MEDIA_TIMEOUT_S", 20.0),
            sandbox_webhook_url=env.get("WACALL_SANDBOX_WEBHOOK_URL") or None,
        )

    def peer_config(self) -> PeerConfig:
        return PeerConfig(
            ice_servers=list(self.ice_servers),
            host_addresses=self.media_addresses,
            gather_timeout_s=self.gather_timeout_s,
            connect_timeout_s=self.media_timeout_s,
        )

    def provider_kwargs(self) -> dict:
        """Arguments for :func:`gateway.providers.make_provider`; raises on missing credentials."""
        if self.provider == "360dialog":
            if not self.d360_api_key:
                raise ConfigError("WACALL_D360_API_KEY is required for the 360dialog provider")
            kwargs = {"api_key": self.d360_api_key}
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

    def masked(self) -> dict:
        """The effective settings with every secret masked (safe to print or log)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRETS and value:
                value = mask_secret(value)
            elif f.name == "ice_servers":
                value = [s.url + (" (with credentials)" if s.credential else "") for s in value]
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out
