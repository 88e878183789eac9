"""gateway.logs: JSON lines, call id context, redaction, idempotent configure."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest

from gateway.logs import (
    JsonFormatter,
    RedactingFilter,
    bind_call_id,
    configure,
    current_call_id,
    redact_text,
)
from gateway.redact import mask_secret

PHONE = "+4915112345678"
WACID = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCAyODRQIAFRoA"
SECRET = "EAAGm0PX4ZCpsBA" + "x" * 40  # a Meta-style access token
SHORT_SECRET = "hunter2pass"


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_wacall_handler", False)]


# -- JSON format --------------------------------------------------------------------------


def test_json_lines_have_core_fields(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    log.info("hello %s", "world")
    log.debug("not shown at INFO")
    log.warning("second")
    rows = lines(out)
    assert len(rows) == 2
    first = rows[0]
    assert first["msg"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "wacall.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "call_id" not in first and "exc" not in first
    assert rows[1]["level"] == "WARNING"


def test_level_argument(out):
    configure(stream=out, level=logging.DEBUG)
    logging.getLogger("wacall.test").debug("shown")
    assert lines(out)[0]["msg"] == "shown"


def test_call_id_from_context_and_extra(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    assert current_call_id() is None
    with bind_call_id("call_1a2b3c") as cid:
        assert cid == "call_1a2b3c"
        assert current_call_id() == "call_1a2b3c"
        log.info("in context")
        log.info("explicit", extra={"call_id": "call_ffffff"})
        with bind_call_id("call_000001"):
            log.info("nested")
        log.info("back")
    log.info("outside")
    assert current_call_id() is None
    rows = lines(out)
    assert [r.get("call_id") for r in rows] == [
        "call_1a2b3c", "call_ffffff", "call_000001", "call_1a2b3c", None,
    ]


async def test_call_id_follows_asyncio_tasks(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")

    async def work(cid: str) -> None:
        with bind_call_id(cid):
            await asyncio.sleep(0)
            log.info("step 1")
            await asyncio.sleep(0.01)
            log.info("step 2")

    await asyncio.gather(work("call_aaaaaa"), work("call_bbbbbb"))
    by_id: dict[str, int] = {}
    for r in lines(out):
        by_id[r["call_id"]] = by_id.get(r["call_id"], 0) + 1
    assert by_id == {"call_aaaaaa": 2, "call_bbbbbb": 2}


def test_extra_fields(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    log.info("with extras", extra={"state": "ringing", "attempt": 2, "meta": {"a": [1, 2]},
                                    "obj": object(), "level": "clash"})
    row = lines(out)[0]
    assert row["state"] == "ringing"
    assert row["attempt"] == 2
    assert row["meta"] == {"a": [1, 2]}
    assert "obj" not in row  # not JSON-serialisable: left out, line still written
    assert row["level"] == "INFO"
    assert row["extra_level"] == "clash"


def test_exception_included(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    row = lines(out)[0]
    assert row["msg"] == "failed"
    assert row["level"] == "ERROR"
    assert "Traceback" in row["exc"]
    assert "ValueError: boom" in row["exc"]


def test_one_object_per_line_even_with_newlines(out):
    configure(stream=out)
    logging.getLogger("wacall.test").info("line one\nline two")
    rows = lines(out)
    assert len(rows) == 1
    assert rows[0]["msg"] == "line one\nline two"


# -- redaction ----------------------------------------------------------------------------


def test_phone_in_args_is_masked(out):
    configure(stream=out)
    logging.getLogger("wacall.test").info("calling %s", PHONE)
    text = out.getvalue()
    assert "4915112345678" not in text
    assert lines(out)[0]["msg"] == "calling +*********5678"


def test_phone_in_message_and_spaced_forms_masked(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    log.info(f"user {PHONE[1:]} answered")
    log.info("to +49 151 1234 5678 and +1 (555) 123-4567")
    text = out.getvalue()
    assert "4915112345678" not in text
    assert "1234 5678" not in text
    assert "123-4567" not in text
    rows = lines(out)
    assert rows[0]["msg"] == "user *********5678 answered"
    assert rows[1]["msg"].endswith("+* (***) ***-4567")


def test_secrets_masked_in_message_args_and_extra(out):
    configure(stream=out, secrets=[SECRET, SHORT_SECRET, None, ""])
    log = logging.getLogger("wacall.test")
    log.info("token is %s", SECRET)
    log.info(f"Authorization: Bearer {SECRET}; pw={SHORT_SECRET}")
    log.info("extra", extra={"headers": {"Authorization": f"Bearer {SECRET}"}, "to": PHONE})
    text = out.getvalue()
    assert SECRET not in text
    assert SHORT_SECRET not in text
    assert "4915112345678" not in text
    rows = lines(out)
    assert rows[0]["msg"] == f"token is {mask_secret(SECRET)}"
    assert rows[1]["msg"] == f"Authorization: Bearer {mask_secret(SECRET)}; pw={mask_secret(SHORT_SECRET)}"
    assert rows[2]["headers"] == {"Authorization": f"Bearer {mask_secret(SECRET)}"}
    assert rows[2]["to"] == "+*********5678"


def test_exception_text_redacted(out):
    configure(stream=out, secrets=[SECRET])
    log = logging.getLogger("wacall.test")
    try:
        raise RuntimeError(f"provider said: number {PHONE} invalid (token {SECRET})")
    except RuntimeError:
        log.exception("connect failed")
    text = out.getvalue()
    assert "4915112345678" not in text
    assert SECRET not in text
    assert "+*********5678" in lines(out)[0]["exc"]


def test_ids_not_mangled(out):
    configure(stream=out)
    log = logging.getLogger("wacall.test")
    digit_wacid = "wacid.ABGGFlA5FpafAgo6EhJfS2Y5NzE1NTI4MjgVAgARGCAy1234567890=="
    log.info("call %s (%s): ringing", "call_1a2b3c", WACID)
    log.info("call %s ended, wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEjU4 acked", "call_123456789abc")
    log.info("odd id %s", digit_wacid)
    with bind_call_id("call_1234567890ab"):
        log.info("bound")
    rows = lines(out)
    assert rows[0]["msg"] == f"call call_1a2b3c ({WACID}): ringing"
    assert rows[1]["msg"] == "call call_123456789abc ended, wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEjU4 acked"
    assert rows[2]["msg"] == f"odd id {digit_wacid}"
    assert rows[3]["call_id"] == "call_1234567890ab"


def test_phone_next_to_id_still_masked():
    text = redact_text(f"{WACID} {PHONE}, call_1a2b3c:{PHONE[1:]}")
    assert text == f"{WACID} +*********5678, call_1a2b3c:*********5678"


def test_bad_format_args_do_not_leak_or_raise(out, capsys):
    handler = configure(stream=out)
    # pytest's own capture handler on the root logger would raise on the bad args, so
    # send this record to our handler only.
    log = logging.getLogger("wacall.test.isolated")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.info("one %s two %s", PHONE)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    row = lines(out)[0]
    assert "log format error" in row["msg"]
    assert "4915112345678" not in out.getvalue()
    assert "Logging error" not in capsys.readouterr().err


def test_filter_alone_clears_args():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "dial %s with %s", (PHONE, SECRET), None)
    assert RedactingFilter([SECRET]).filter(record) is True
    assert record.args is None
    assert record.getMessage() == f"dial +*********5678 with {mask_secret(SECRET)}"


def test_json_formatter_without_filter_reads_context():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hi", (), None)
    with bind_call_id("call_abcdef"):
        row = json.loads(JsonFormatter().format(record))
    assert row["call_id"] == "call_abcdef"


# -- human format, configure ----------------------------------------------------------------


def test_human_format_redacts(out):
    configure(json=False, stream=out, secrets=[SECRET])
    log = logging.getLogger("wacall.test")
    with bind_call_id("call_1a2b3c"):
        log.info("calling %s with %s", PHONE, SECRET)
    log.warning("plain")
    first, second = out.getvalue().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO wacall\.test \[call_1a2b3c\] ", first)
    assert first.endswith(f"calling +*********5678 with {mask_secret(SECRET)}")
    assert "WARNING wacall.test plain" in second
    assert "4915112345678" not in out.getvalue() and SECRET not in out.getvalue()


def test_human_format_exception(out):
    configure(json=False, stream=out)
    try:
        raise KeyError(PHONE)
    except KeyError:
        logging.getLogger("wacall.test").error("lookup failed", exc_info=True)
    text = out.getvalue()
    assert "Traceback" in text and "KeyError" in text
    assert "4915112345678" not in text


def test_configure_is_idempotent(out):
    before = len(logging.getLogger().handlers)
    first = configure(stream=out)
    configure(stream=out)
    second = configure(stream=out)
    assert len(our_handlers()) == 1
    assert our_handlers() == [second] and first is not second
    assert len(logging.getLogger().handlers) == before + 1
    logging.getLogger("wacall.test").info("once")
    assert len(lines(out)) == 1


def test_reconfigure_switches_format(out):
    configure(json=True, stream=out)
    other = io.StringIO()
    configure(json=False, stream=other)
    logging.getLogger("wacall.test").info("now human")
    assert out.getvalue() == ""
    assert "INFO wacall.test now human" in other.getvalue()


async def test_every_http_request_is_one_access_line_with_secrets_masked(settings, caplog):
    import logging

    import aiohttp

    from gateway.app import Service

    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with Service(settings, sandbox=True) as service, aiohttp.ClientSession() as http:
            async with http.get(f"{service.url}/webhooks/whatsapp",
                                params={"hub.mode": "subscribe", "hub.verify_token": "vt-s3cret", "hub.challenge": "1"}):
                pass
            async with http.get(f"{service.url}/healthz"):
                pass
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert any(line.startswith("GET /healthz 200") for line in lines), lines
    handshake = next(line for line in lines if "/webhooks/whatsapp" in line)
    assert "vt-s3cret" not in handshake and "hub.verify_token=***" in handshake and " 403 " in handshake
