"""Calling providers: Meta's Graph API directly, or through 360dialog."""

from __future__ import annotations

from typing import Any

from gateway.providers.base import CallingProvider
from gateway.providers.d360 import D360Provider
from gateway.providers.meta import MetaProvider

__all__ = ["CallingProvider", "D360Provider", "MetaProvider", "PROVIDERS", "make_provider"]

PROVIDERS: dict[str, type[CallingProvider]] = {
    "360dialog": D360Provider,
    "d360": D360Provider,
    "meta": MetaProvider,
}


def make_provider(name: str, **kw: Any) -> CallingProvider:
    """Build a provider by name ('360dialog' or 'd360', 'meta'); ``kw`` go to its constructor."""
    cls = PROVIDERS.get(str(name).strip().lower())
    if cls is None:
        valid = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown provider {name!r}; valid names: {valid}")
    return cls(**kw)
