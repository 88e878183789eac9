"""Error types for wacall and the WhatsApp calling error-code table.

Graph (Meta) and 360dialog report failures with a numeric code: in the HTTP
error body of an API call, or in ``errors[]`` of a ``terminate`` webhook.
:func:`error_for` turns a code into a :class:`ProviderError` (a typed subclass
where callers are expected to react differently) that always carries a readable
meaning and a short resolution, also for codes not in the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "CODES",
    "CallLimitExceededError",
    "ErrorInfo",
    "InvalidSdpError",
    "NoPermissionError",
    "PermissionExpiredError",
    "ProviderError",
    "ProviderUnavailableError",
    "TooManyPermissionRequestsError",
    "WacallError",
    "WebhookFormatError",
    "error_for",
]


class WacallError(Exception):
    """Base class of every error raised by wacall."""


class WebhookFormatError(WacallError, ValueError):
    """A webhook body is not the envelope Meta documents (answered with HTTP 400)."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What a provider error code means and what to do about it."""

    name: str
    meaning: str
    resolution: str


# Codes from Meta's calling troubleshooting page and the 360dialog outbound-calls
# guide. HTTP statuses Meta documents for them are in the protocol notes (§6).
CODES: dict[int, ErrorInfo] = {
    100: ErrorInfo("invalid_parameter", "Invalid parameter",
                   "Fix the request; the error details name the field (often the SDP)"),
    613: ErrorInfo("permission_lookup_rate_limited", "Call-permission lookup rate limit hit",
                   "Slow down permission lookups and retry later"),
    131009: ErrorInfo("voice_call_unsupported",
                      "Call-button messages are not supported for this sender",
                      "Send a deep link or a plain message instead"),
    131026: ErrorInfo("message_undeliverable",
                      "Message undeliverable (e.g. permission request to an old app)",
                      "Ask the user to update WhatsApp, or reach them another way"),
    131030: ErrorInfo("recipient_not_allowed",
                      "Recipient is not in the test number's allowed list",
                      "Add the recipient to the allowed list or use a production number"),
    131044: ErrorInfo("no_payment_method", "No valid payment method on the account",
                      "Add a valid payment method to the WhatsApp Business account"),
    131047: ErrorInfo("reengagement_required",
                      "Customer-service window closed (re-engagement required)",
                      "Send an approved template instead of a free-form message"),
    131055: ErrorInfo("sip_enabled", "Calling API unavailable: the number uses SIP",
                      "Disable SIP in call settings, or place the call over SIP"),
    138000: ErrorInfo("calling_not_enabled", "Calling is not enabled on this number",
                      "Enable calling in the number's call settings"),
    138001: ErrorInfo("receiver_uncallable",
                      "Receiver cannot be called (not on WhatsApp or unsupported client)",
                      "Check the number; the user may need to update WhatsApp"),
    138002: ErrorInfo("concurrent_calls_limit", "Concurrent call limit (1000) reached",
                      "Wait for ongoing calls to end before placing more"),
    138003: ErrorInfo("duplicate_call", "A call with this user is already ongoing",
                      "Wait for the current call to end; do not redial"),
    138004: ErrorInfo("connection_error", "Connection error while setting up the call",
                      "Retry later and check the connection parameters"),
    138005: ErrorInfo("call_rate_limited", "Call rate limit exceeded for this number",
                      "Place fewer calls per minute and retry later"),
    138006: ErrorInfo("no_permission", "No approved call permission",
                      "Request call permission (CPR) before initiating a call"),
    138007: ErrorInfo("connect_timeout", "SDP offer/answer was not applied in time",
                      "Apply the answer promptly and check the media setup"),
    # Not in Meta's table; seen in the wild when the offer carries sha-384/512
    # fingerprints (subcode 2593093). Meta's page uses it for SDP validation.
    138008: ErrorInfo("invalid_sdp", "SDP validation failed",
                      "Send a single sha-256 fingerprint and a valid RFC 8866 SDP"),
    138009: ErrorInfo("permission_request_limit",
                      "Call-permission request limit hit for this user",
                      "Wait until the limit resets; a connected call also resets it"),
    # 138010 and 138011 come from 360dialog's guide only; Meta's page lacks them.
    138010: ErrorInfo("permission_expired", "Call permission expired",
                      "Ask the user for call permission again"),
    138011: ErrorInfo("too_many_permission_requests", "Too many call-permission requests",
                      "Send at most 1 request per 24 h and 2 per 7 days"),
    138012: ErrorInfo("call_limit_exceeded",
                      "Business-initiated call limit per 24 h reached",
                      "Wait until the time in the error details, or call less often"),
    # pywa documents an older meaning: permission-fetch rate limit (now 613).
    138013: ErrorInfo("bic_unavailable",
                      "Business-initiated calling unavailable for this number",
                      "Use a business number from a country where outbound calls are allowed"),
    # Seed (360dialog guide): 138014 = invalid SDP. Meta's current troubleshooting
    # page calls 138014 "calling temporarily disabled (low quality)" and uses
    # 138008 for SDP validation. We follow the seed; both map to InvalidSdpError.
    138014: ErrorInfo("invalid_sdp", "Invalid SDP",
                      "Ensure the SDP complies with RFC 8866 (one sha-256 fingerprint)"),
    138015: ErrorInfo("calling_not_eligible",
                      "Calling cannot be enabled (messaging limit below 2000)",
                      "Raise the number's messaging limit first"),
    138017: ErrorInfo("permanent_permission_exists",
                      "Permission request refused: permanent permission already exists",
                      "Skip the request and place the call"),
    138018: ErrorInfo("prerequisites_missing",
                      "Technical prerequisites missing (no app subscribed to 'calls')",
                      "Subscribe your app to the 'calls' webhook field"),
    138019: ErrorInfo("client_setup_failed", "Call setup failed on the user's device",
                      "Retry later; check that your SDP and media setup are valid"),
    138020: ErrorInfo("relay_unreachable", "User's device could not reach the media relay",
                      "Retry later; usually a network problem on the user's side"),
    138021: ErrorInfo("media_receive_timeout", "User's device received no media",
                      "Make sure you send RTP from the start, also during silence"),
    138022: ErrorInfo("media_transmit_timeout", "User's device could not send media",
                      "Check ICE/DTLS connectivity and your public reachability"),
    138023: ErrorInfo("no_media", "Call accepted but ended without media",
                      "Check ICE/DTLS connectivity and that media starts after accept"),
}

_GENERIC = ErrorInfo("provider_error", "Provider error",
                     "See the provider message; contact the provider if it persists")


class ProviderError(WacallError):
    """An error reported by the calling provider (Meta Graph or 360dialog).

    Attributes: ``code`` (provider code, ``None`` when it gave none), ``message``
    (provider text, else the table meaning), ``title`` (table meaning),
    ``resolution``, ``http_status``, ``details`` (``error_data.details``),
    ``subcode`` and ``fbtrace_id`` (quote it to Meta support).
    """

    default_code: ClassVar[int | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        code: int | None = None,
        resolution: str | None = None,
        http_status: int | None = None,
        details: str | None = None,
        subcode: int | None = None,
        fbtrace_id: str | None = None,
    ) -> None:
        self.code = code if code is not None else self.default_code
        info = CODES.get(self.code, _GENERIC) if self.code is not None else _GENERIC
        self.title = info.meaning
        self.message = message or info.meaning
        self.resolution = resolution or info.resolution
        self.http_status = http_status
        self.details = details
        self.subcode = subcode
        self.fbtrace_id = fbtrace_id
        super().__init__(self._summary())

    def _summary(self) -> str:
        code = f" {self.code}" if self.code is not None else ""
        http = f" (HTTP {self.http_status})" if self.http_status is not None else ""
        return f"{type(self).__name__}{code}: {self.message}{http}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary for API responses: code, message, resolution (+details)."""
        out: dict[str, Any] = {
            "code": self.code, "message": self.message, "resolution": self.resolution,
        }
        if self.details:
            out["details"] = self.details
        return out


class ProviderUnavailableError(ProviderError):
    """The provider could not be reached: network error, timeout or a bare 5xx.

    The outcome of the request is unknown. Never retry ``connect`` blindly: the
    user's phone may already be ringing (a second attempt hits 138003).
    """

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        kw.setdefault("resolution",
                      "Check connectivity and provider status; do not blindly retry a connect")
        super().__init__(message or "Provider unavailable", **kw)


class NoPermissionError(ProviderError):
    """138006: the user has not granted call permission (or it lapsed)."""

    default_code = 138006


class PermissionExpiredError(ProviderError):
    """138010: the user's call permission expired (temporary grants last 7 days)."""

    default_code = 138010


class TooManyPermissionRequestsError(ProviderError):
    """138011: permission-request limit hit (1 per 24 h, 2 per 7 days per user)."""

    default_code = 138011


class CallLimitExceededError(ProviderError):
    """138012: connected business-initiated calls per 24 h exhausted (currently 100).

    ``details`` carries the next allowed time when Meta provides it.
    """

    default_code = 138012


class InvalidSdpError(ProviderError):
    """138014 (per 360dialog) or 138008: the SDP offer/answer was rejected."""

    default_code = 138014


_TYPED: dict[int, type[ProviderError]] = {
    138006: NoPermissionError,
    138008: InvalidSdpError,
    138010: PermissionExpiredError,
    138011: TooManyPermissionRequestsError,
    138012: CallLimitExceededError,
    138014: InvalidSdpError,
}


def error_for(
    code: int | None,
    message: str | None = None,
    *,
    http_status: int | None = None,
    details: str | None = None,
    subcode: int | None = None,
    fbtrace_id: str | None = None,
) -> ProviderError:
    """Build the error for a provider code: a typed subclass if one exists.

    Unknown or missing codes give a plain :class:`ProviderError`.
    """
    cls = _TYPED.get(code, ProviderError) if code is not None else ProviderError
    return cls(message, code=code, http_status=http_status, details=details,
               subcode=subcode, fbtrace_id=fbtrace_id)


#: Provider codes that mean "not allowed", "not now" and "busy with another call".
FORBIDDEN_CODES = frozenset({138006, 138010, 138000, 138001})
TOO_MANY_CODES = frozenset({138011, 138012, 138009, 138002, 138005, 613})
CONFLICT_CODES = frozenset({138017, 138003})


def refusal_kind(exc: ProviderError) -> str:
    """What a provider error means to whoever asked: ``"unavailable"`` (the provider
    could not be reached), ``"forbidden"``, ``"too_many"`` (try later), ``"conflict"`` or
    ``"failed"`` (anything else). The API maps these to 503/403/429/409/502, the SIP
    trunk to 503/403/480/486/502."""
    if isinstance(exc, ProviderUnavailableError):
        return "unavailable"
    if exc.code in FORBIDDEN_CODES:
        return "forbidden"
    if exc.code in TOO_MANY_CODES or exc.http_status == 429:
        return "too_many"
    if exc.code in CONFLICT_CODES:
        return "conflict"
    return "failed"
