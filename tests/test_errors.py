"""Error-code table, typed errors and redaction helpers."""

from __future__ import annotations

import pytest

from gateway.errors import (
    CODES,
    CallLimitExceededError,
    InvalidSdpError,
    NoPermissionError,
    PermissionExpiredError,
    ProviderError,
    ProviderUnavailableError,
    TooManyPermissionRequestsError,
    WacallError,
    WebhookFormatError,
    error_for,
)
from gateway.redact import mask_phone, mask_secret, mask_text

SEED_TABLE = [
    (138006, NoPermissionError),
    (138010, PermissionExpiredError),
    (138011, TooManyPermissionRequestsError),
    (138012, CallLimitExceededError),
    (138014, InvalidSdpError),
]

DOC_CODES = [100, 613, 131009, 131026, 131030, 131044, 131047, 131055, *range(138000, 138016),
             *range(138017, 138024)]


@pytest.mark.parametrize(("code", "cls"), SEED_TABLE)
def test_seed_codes_map_to_typed_errors(code: int, cls: type[ProviderError]) -> None:
    err = error_for(code)
    assert type(err) is cls
    assert isinstance(err, ProviderError) and isinstance(err, WacallError)
    assert err.code == code
    assert err.message == CODES[code].meaning
    assert err.resolution == CODES[code].resolution


def test_no_permission_texts() -> None:
    err = error_for(138006, http_status=401, fbtrace_id="AbC")
    assert err.to_dict() == {
        "code": 138006,
        "message": "No approved call permission",
        "resolution": "Request call permission (CPR) before initiating a call",
    }
    assert err.http_status == 401 and err.fbtrace_id == "AbC"
    assert "138006" in str(err) and "HTTP 401" in str(err)


def test_138008_is_invalid_sdp_too() -> None:
    err = error_for(138008, "(#138008) SDP validation error", details="extra fingerprint")
    assert isinstance(err, InvalidSdpError)
    assert err.code == 138008
    assert err.message == "(#138008) SDP validation error"
    assert err.title == "SDP validation failed"
    assert err.to_dict()["details"] == "extra fingerprint"


@pytest.mark.parametrize("code", DOC_CODES)
def test_every_documented_code_has_text(code: int) -> None:
    err = error_for(code)
    assert err.code == code
    assert err.message and err.resolution
    assert err.message != "Provider error"
    assert len(err.resolution) < 100


def test_unknown_code_still_gives_provider_error() -> None:
    err = error_for(999999, "something new")
    assert type(err) is ProviderError
    assert err.to_dict() == {"code": 999999, "message": "something new",
                             "resolution": err.resolution}
    assert err.resolution
    assert type(error_for(None)) is ProviderError
    assert error_for(None).code is None


def test_provider_message_wins_over_table_meaning() -> None:
    err = error_for(138012, "limit hit", details="next call after 1767300000")
    assert isinstance(err, CallLimitExceededError)
    assert err.message == "limit hit"
    assert err.to_dict() == {"code": 138012, "message": "limit hit",
                             "resolution": CODES[138012].resolution,
                             "details": "next call after 1767300000"}


def test_typed_class_without_code_uses_its_default() -> None:
    err = NoPermissionError()
    assert err.code == 138006 and err.message == "No approved call permission"


def test_provider_unavailable() -> None:
    err = ProviderUnavailableError("timeout")
    assert isinstance(err, ProviderError)
    assert err.code is None
    assert "retry" in err.resolution
    assert err.to_dict()["message"] == "timeout"


def test_webhook_format_error_is_value_error() -> None:
    assert issubclass(WebhookFormatError, ValueError)
    assert issubclass(WebhookFormatError, WacallError)


@pytest.mark.parametrize(("raw", "masked"), [
    ("4915112345678", "*********5678"),
    ("+4915112345678", "+*********5678"),
    ("+49 151 12345678", "+** *** ****5678"),
    (4915112345678, "*********5678"),
    ("1234", "****"),
    ("", ""),
    (None, ""),
])
def test_mask_phone(raw: object, masked: str) -> None:
    assert mask_phone(raw) == masked  # type: ignore[arg-type]


def test_mask_secret() -> None:
    secret = "abcd" + "x" * 36
    assert mask_secret(secret) == "abcd…(40 chars)"
    assert "xxxx" not in mask_secret(secret)
    assert mask_secret("short-key") == "****(9 chars)"
    assert mask_secret(None) == "" and mask_secret("") == ""


def test_mask_text_hides_numbers_in_messages() -> None:
    text = "Recipient 4915112345678 not allowed (#131030)"
    assert mask_text(text) == "Recipient *********5678 not allowed (#131030)"
    assert mask_text(None) == ""
