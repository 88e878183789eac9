"""360dialog call actions (``POST {base}/calling/calls``, header ``D360-API-KEY``).

360dialog issues one API key per phone number, so the number is not in the path.
Its reference lists ``connect``, ``pre_accept``, ``accept`` and ``reject`` for this
endpoint; ``terminate`` is assumed to be proxied the same way. BSUID dialling
(``recipient``), recording and transcription are not in its request schema.
Errors come back as ``{"error": "<text>"}``.
"""

from __future__ import annotations

import aiohttp

from gateway.providers.base import CallingProvider

__all__ = ["D360Provider"]

DEFAULT_BASE_URL = "https://waba-v2.360dialog.io"


class D360Provider(CallingProvider):
    """Calling client for a 360dialog channel, authenticated by its API key."""

    name = "360dialog"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not api_key:
            raise ValueError("a 360dialog API key is required")
        super().__init__(base_url=base_url, session=session, timeout=timeout)
        self._api_key = api_key

    @property
    def calls_url(self) -> str:
        return f"{self.base_url}/calling/calls"

    def _auth_headers(self) -> dict[str, str]:
        return {"D360-API-KEY": self._api_key}

    # 360dialog proxies Meta's messaging API with the phone number implied by the key.
    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/messages"

    def _permissions_request(self, user: str) -> tuple[str, dict[str, str] | None]:
        # The seed's "collect CPR with a text message" step shows this GET; it reads the
        # permission state (it does not send a request): see the protocol notes §2.
        return f"{self.base_url}/calling/permissions/{user}", None

    @property
    def settings_url(self) -> str:
        return f"{self.base_url}/calling/settings"

    def _templates_url(self, waba_id: str | None) -> str:
        return f"{self.base_url}/v1/configs/templates"

    permission_component = "CALL_PERMISSION_REQUEST"
