"""Meta Graph call actions (``POST {base}/{version}/{phone_number_id}/calls``).

Authenticated with a system-user or business token (``Authorization: Bearer``)
that has ``whatsapp_business_messaging``. Calling needs Graph v23.0 or later;
older versions fail with obscure SDP validation errors. With SIP enabled on the
number these endpoints answer 131055.
"""

from __future__ import annotations

import aiohttp

from gateway.numbers import is_bsuid
from gateway.providers.base import CallingProvider

__all__ = ["MetaProvider"]

DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_VERSION = "v23.0"


class MetaProvider(CallingProvider):
    """Calling client for one business phone number on the WhatsApp Cloud API."""

    name = "meta"

    def __init__(
        self,
        token: str,
        phone_number_id: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        version: str = DEFAULT_VERSION,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not token:
            raise ValueError("a Meta access token is required")
        if not str(phone_number_id).strip():
            raise ValueError("phone_number_id is required")
        super().__init__(base_url=base_url, session=session, timeout=timeout)
        self._token = token
        self.phone_number_id = str(phone_number_id).strip()
        self.version = version.strip("/")

    @property
    def calls_url(self) -> str:
        return f"{self._number_url}/calls"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    @property
    def _number_url(self) -> str:
        return f"{self.base_url}/{self.version}/{self.phone_number_id}"

    @property
    def messages_url(self) -> str:
        return f"{self._number_url}/messages"

    supports_bsuid = True
    supports_recording = True

    def _permissions_request(self, user: str) -> tuple[str, dict[str, str] | None]:
        key = "recipient" if is_bsuid(user) else "user_wa_id"
        return f"{self._number_url}/call_permissions", {key: user}

    @property
    def settings_url(self) -> str:
        return f"{self._number_url}/settings"

    def _templates_url(self, waba_id: str | None) -> str:
        if not waba_id:
            raise ValueError("creating a template on Meta needs the WhatsApp Business Account id")
        return f"{self.base_url}/{self.version}/{waba_id}/message_templates"
