"""Call-permission ledger: rules, window edges, provider truth, persistence.

The last part drives random sequences of facts through the ledger and compares
every answer with a small reference model kept in plain lists of timestamps.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.errors import (
    CallLimitExceededError,
    NoPermissionError,
    PermissionExpiredError,
    ProviderError,
    TooManyPermissionRequestsError,
)
from gateway.permissions import (
    DAY,
    WEEK,
    ManualClock,
    PermissionLedger,
    PermissionLimits,
    PermissionState,
    PermissionStatus,
    RateLimit,
    SystemClock,
    iso,
    parse_duration,
)
from gateway.store import (
    MemoryPermissionStore,
    PermissionStore,
    SQLitePermissionStore,
    StoreSchemaError,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
U = "4915112345678"


def make(limits: PermissionLimits | None = None, *, callback: bool = False,
         store: PermissionStore | None = None) -> tuple[PermissionLedger, ManualClock]:
    clock = ManualClock(T0)
    return PermissionLedger(store or MemoryPermissionStore(), clock, limits,
                            callback_enabled=callback), clock


def refusal(fn, user: str = U) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        fn(user)
    return info.value


def granted_ledger(limits: PermissionLimits | None = None) -> tuple[PermissionLedger, ManualClock]:
    ledger, clock = make(limits)
    ledger.request_sent(U, "wamid.req1")
    ledger.reply(U, True, message_id="wamid.reply1")
    return ledger, clock


# --------------------------------------------------------------------------- limits, clock, parsing


def test_seed_limits_are_the_default() -> None:
    seed = PermissionLimits.seed()
    assert seed == PermissionLimits()
    assert seed.validity_s == 7 * 86_400
    assert seed.request_limits == (RateLimit(2, 7 * 86_400),)
    assert (seed.max_calls, seed.call_window_s) == (5, 86_400)
    assert seed.unanswered_revoke_after == 4
    assert not seed.count_only_connected_calls and not seed.reset_requests_on_connected_call


def test_meta_preset() -> None:
    meta = PermissionLimits.meta()
    assert meta.request_limits == (RateLimit(1, DAY), RateLimit(2, WEEK))
    assert (meta.max_calls, meta.call_window_s) == (100, DAY)
    assert meta.count_only_connected_calls and meta.reset_requests_on_connected_call
    assert meta.validity_s == WEEK and meta.unanswered_revoke_after == 4


@pytest.mark.parametrize("kwargs", [{"validity_s": 0}, {"max_calls": -1}, {"call_window_s": 0},
                                    {"unanswered_revoke_after": 0}])
def test_invalid_limits_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PermissionLimits(**kwargs)


def test_clocks() -> None:
    clock = ManualClock(100)
    assert clock.now() == 100
    assert clock.advance(5.5) == 105.5
    clock.set(7)
    assert clock.now() == 7
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert abs(SystemClock().now() - time.time()) < 5


@pytest.mark.parametrize(("text", "seconds"), [
    ("PT24H", DAY), ("P7D", WEEK), ("P1W", WEEK), ("PT90M", 5400), ("PT30S", 30),
    ("24h", DAY), ("7d", WEEK), ("24 H", DAY), (3600, 3600),
    ("P", None), ("PT", None), ("soon", None), (None, None), (True, None), (0, None), ("P0D", None),
])
def test_parse_duration(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_iso_rendering() -> None:
    assert iso(T0) == "2026-01-01T00:00:00Z"
    assert iso(T0 + 0.25) == "2026-01-01T00:00:00.250Z"
    assert iso(None) is None


# --------------------------------------------------------------------------- validity


def test_grant_is_valid_for_exactly_seven_days() -> None:
    ledger, clock = granted_ledger()
    st_ = ledger.status(U)
    assert st_.status is PermissionState.GRANTED and st_.expires_at == T0 + WEEK
    clock.set(T0 + WEEK - 1)
    ledger.check_call(U)
    clock.set(T0 + WEEK)
    err = refusal(ledger.check_call)
    assert isinstance(err, PermissionExpiredError) and err.code == 138010 and err.retry_at is None
    assert ledger.status(U).status is PermissionState.EXPIRED
    assert ledger.status(U).expires_at is None
    clock.set(T0 + WEEK + 1)
    assert ledger.status(U).status is PermissionState.EXPIRED


def test_reply_expiration_timestamp_wins_over_local_validity() -> None:
    ledger, clock = make()
    ledger.reply(U, True, expires_at=T0 + 3600)
    clock.set(T0 + 3599)
    ledger.check_call(U)
    clock.set(T0 + 3600)
    assert isinstance(refusal(ledger.check_call), PermissionExpiredError)


def test_permanent_permission_never_expires_and_refuses_requests() -> None:
    ledger, clock = make()
    ledger.reply(U, True, permanent=True)
    clock.set(T0 + 400 * DAY)
    ledger.check_call(U)
    st_ = ledger.status(U)
    assert (st_.status, st_.permanent, st_.expires_at) == (PermissionState.GRANTED, True, None)
    assert st_.next_request_allowed_at is None and st_.next_call_allowed_at == clock.now()
    err = refusal(ledger.check_request)
    assert err.code == 138017 and err.retry_at is None


def test_unanswered_request_expires_seven_days_after_delivery() -> None:
    ledger, clock = make()
    ledger.request_sent(U, "wamid.r")
    clock.set(T0 + 100)
    assert ledger.request_delivered(U, "wamid.r")
    assert not ledger.request_delivered(U, "wamid.r")  # first delivery counts
    assert not ledger.request_delivered(U, "wamid.unknown")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.REQUESTED and st_.expires_at == T0 + 100 + WEEK
    assert isinstance(refusal(ledger.check_call), NoPermissionError)
    clock.set(T0 + 100 + WEEK - 1)
    assert ledger.status(U).status is PermissionState.REQUESTED
    clock.set(T0 + 100 + WEEK)
    assert ledger.status(U).status is PermissionState.EXPIRED
    assert isinstance(refusal(ledger.check_call), PermissionExpiredError)


def test_unanswered_request_without_delivery_lapses_from_sending() -> None:
    ledger, clock = make()
    ledger.request_sent(U, "wamid.r")
    clock.set(T0 + WEEK - 1)
    assert ledger.status(U).status is PermissionState.REQUESTED
    clock.set(T0 + WEEK)
    assert ledger.status(U).status is PermissionState.EXPIRED


def test_decline_is_rejected_then_expires_after_seven_days() -> None:
    ledger, clock = make()
    ledger.request_sent(U, "wamid.r")
    clock.set(T0 + 50)
    ledger.reply(U, False, message_id="wamid.no")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.REJECTED and st_.expires_at == T0 + 50 + WEEK
    err = refusal(ledger.check_call)
    assert isinstance(err, NoPermissionError) and err.code == 138006 and err.retry_at is None
    clock.set(T0 + 50 + WEEK - 1)
    assert ledger.status(U).status is PermissionState.REJECTED
    clock.set(T0 + 50 + WEEK)
    assert ledger.status(U).status is PermissionState.EXPIRED


def test_reply_to_a_new_request_supersedes_the_previous_permission() -> None:
    ledger, clock = granted_ledger()
    clock.advance(DAY)
    ledger.request_sent(U, "wamid.req2")
    # The pending new request does not touch the grant ...
    assert ledger.status(U).status is PermissionState.GRANTED
    ledger.check_call(U)
    # ... the user's answer to it does.
    ledger.reply(U, False, message_id="wamid.reply2")
    assert ledger.status(U).status is PermissionState.REJECTED
    assert isinstance(refusal(ledger.check_call), NoPermissionError)
    ledger.reply(U, True, message_id="wamid.reply3")  # changed their mind
    assert ledger.status(U).expires_at == T0 + DAY + WEEK


def test_pending_request_shows_after_the_grant_it_outlives_expires() -> None:
    ledger, clock = granted_ledger()
    clock.set(T0 + 2 * DAY)
    ledger.request_sent(U, "wamid.req2")
    clock.set(T0 + WEEK)
    st_ = ledger.status(U)
    assert st_.status is PermissionState.REQUESTED and st_.expires_at == T0 + 2 * DAY + WEEK
    clock.set(T0 + 2 * DAY + WEEK)
    assert ledger.status(U).status is PermissionState.EXPIRED


def test_revoked_by_provider_webhook() -> None:
    ledger, _ = granted_ledger()
    assert ledger.revoked(U, key="evt1")
    assert ledger.status(U).status is PermissionState.REVOKED
    assert isinstance(refusal(ledger.check_call), NoPermissionError)
    ledger.reply(U, True, message_id="wamid.again")
    assert not ledger.revoked(U, key="evt1")  # redelivered REVOKED does not undo the new grant
    assert ledger.status(U).status is PermissionState.GRANTED


# --------------------------------------------------------------------------- request limit


def test_two_requests_per_seven_days_with_exact_edges() -> None:
    ledger, clock = make()
    ledger.request_sent(U, "m1")
    clock.set(T0 + 10)
    ledger.check_request(U)
    ledger.request_sent(U, "m2")
    err = refusal(ledger.check_request)
    assert isinstance(err, TooManyPermissionRequestsError) and err.code == 138011
    assert err.retry_at == T0 + WEEK
    assert ledger.status(U).requests_last_7d == 2
    assert ledger.status(U).next_request_allowed_at == T0 + WEEK
    clock.set(T0 + WEEK - 1)
    assert refusal(ledger.check_request).retry_at == T0 + WEEK
    clock.set(T0 + WEEK)  # the first request no longer counts
    ledger.check_request(U)
    assert ledger.status(U).requests_last_7d == 1
    assert ledger.status(U).next_request_allowed_at == T0 + WEEK
    ledger.request_sent(U, "m3")
    assert refusal(ledger.check_request).retry_at == T0 + 10 + WEEK
    clock.set(T0 + 10 + WEEK + 1)
    ledger.check_request(U)


# --------------------------------------------------------------------------- call limit


def test_five_calls_per_24_hours_with_exact_edges() -> None:
    ledger, clock = granted_ledger()
    for i in range(5):
        ledger.check_call(U)
        ledger.call_placed(U, f"wacid.{i}")
        clock.advance(60)
    err = refusal(ledger.check_call)
    assert isinstance(err, CallLimitExceededError) and err.code == 138012
    assert err.retry_at == T0 + DAY
    st_ = ledger.status(U)
    assert st_.calls_last_24h == 5 and st_.next_call_allowed_at == T0 + DAY
    clock.set(T0 + DAY - 1)
    assert refusal(ledger.check_call).retry_at == T0 + DAY
    clock.set(T0 + DAY)
    ledger.check_call(U)
    assert ledger.status(U).calls_last_24h == 4


def test_call_limit_retry_beyond_the_permission_expiry_is_null() -> None:
    ledger, clock = granted_ledger()
    clock.set(T0 + WEEK - 3600)
    for i in range(5):
        ledger.call_placed(U, f"wacid.{i}")
    err = refusal(ledger.check_call)
    assert isinstance(err, CallLimitExceededError) and err.retry_at is None
    assert ledger.status(U).next_call_allowed_at is None


def test_refused_calls_count_too_when_recorded() -> None:
    ledger, _ = make()
    for i in range(5):
        ledger.call_placed(U, f"wacid.{i}")  # facts are recorded whatever the gate said
    assert ledger.status(U).calls_last_24h == 5


# --------------------------------------------------------------------------- unanswered calls


def test_four_unanswered_calls_in_a_row_revoke() -> None:
    ledger, _ = granted_ledger()
    for i in range(3):
        ledger.call_placed(U, f"c{i}")
        ledger.call_unanswered(U, f"c{i}")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.GRANTED and st_.unanswered_in_a_row == 3
    ledger.call_placed(U, "c3")
    ledger.call_unanswered(U, "c3")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.REVOKED and st_.unanswered_in_a_row == 4
    assert isinstance(refusal(ledger.check_call), NoPermissionError)
    # A new grant starts a new count.
    ledger.reply(U, True, message_id="wamid.again")
    assert ledger.status(U).unanswered_in_a_row == 0


def test_answered_call_resets_the_unanswered_count() -> None:
    ledger, clock = granted_ledger(PermissionLimits(max_calls=50))
    for i in range(3):
        ledger.call_placed(U, f"a{i}")
        ledger.call_unanswered(U, f"a{i}")
    ledger.call_placed(U, "ok")
    ledger.call_answered(U, "ok")
    assert ledger.status(U).unanswered_in_a_row == 0
    for i in range(3):
        ledger.call_placed(U, f"b{i}")
        ledger.call_unanswered(U, f"b{i}")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.GRANTED and st_.unanswered_in_a_row == 3


def test_a_calls_first_outcome_wins() -> None:
    ledger, _ = granted_ledger()
    ledger.call_placed(U, "c")
    assert ledger.call_answered(U, "c")
    assert not ledger.call_unanswered(U, "c")
    assert not ledger.call_answered(U, "c")
    assert ledger.status(U).unanswered_in_a_row == 0


# --------------------------------------------------------------------------- callback permission


def test_inbound_call_grants_only_with_callback_enabled() -> None:
    ledger, clock = make()
    assert ledger.inbound_call(U, "wacid.in1")
    assert ledger.status(U).status is PermissionState.NONE
    ledger.callback_enabled = True
    clock.advance(60)
    ledger.inbound_call(U, "wacid.in2")
    st_ = ledger.status(U)
    assert st_.status is PermissionState.GRANTED and st_.expires_at == T0 + 60 + WEEK
    assert not st_.permanent
    ledger.check_call(U)
    assert not ledger.inbound_call(U, "wacid.in2")  # duplicate


def test_inbound_call_keeps_a_permanent_permission() -> None:
    ledger, clock = make(callback=True)
    ledger.reply(U, True, permanent=True)
    ledger.inbound_call(U, "wacid.in")
    assert ledger.status(U).permanent


def test_inbound_call_regrants_after_revoke() -> None:
    ledger, _ = make(callback=True)
    ledger.reply(U, False, source="automatic")
    assert ledger.status(U).status is PermissionState.REVOKED
    ledger.inbound_call(U, "wacid.in")
    assert ledger.status(U).status is PermissionState.GRANTED


# --------------------------------------------------------------------------- Meta rules


def test_meta_counts_only_connected_calls() -> None:
    ledger, clock = granted_ledger(PermissionLimits.meta())
    for i in range(150):
        ledger.call_placed(U, f"u{i}")
        if i % 3 == 0:
            ledger.call_unanswered(U, f"u{i}")
        else:
            ledger.call_answered(U, f"u{i}")
    st_ = ledger.status(U)
    assert st_.calls_last_24h == 100  # 100 of the 150 were answered
    err = refusal(ledger.check_call)
    assert isinstance(err, CallLimitExceededError) and err.retry_at == T0 + DAY


def test_meta_request_limits_one_per_day_two_per_week() -> None:
    ledger, clock = make(PermissionLimits.meta())
    ledger.request_sent(U, "m1")
    assert refusal(ledger.check_request).retry_at == T0 + DAY
    clock.set(T0 + DAY)
    ledger.check_request(U)
    ledger.request_sent(U, "m2")
    # 1/24 h clears at T0+2d, but 2/7 d only at T0+7d.
    assert refusal(ledger.check_request).retry_at == T0 + WEEK


def test_meta_connected_call_resets_request_limits() -> None:
    ledger, clock = make(PermissionLimits.meta())
    ledger.request_sent(U, "m1")
    ledger.reply(U, True, message_id="r1")
    ledger.call_placed(U, "c1")
    ledger.call_answered(U, "c1")
    ledger.check_request(U)
    assert ledger.status(U).requests_last_7d == 0
    ledger.request_sent(U, "m2")
    assert refusal(ledger.check_request).retry_at == T0 + DAY
    ledger.inbound_call(U, "wacid.in", answered=True)  # either direction counts
    ledger.check_request(U)


def test_meta_connected_call_lifts_a_request_block_and_a_new_refusal_starts_fresh() -> None:
    ledger, _ = make(PermissionLimits.meta())
    ledger.provider_refused(U, 138011)
    assert refusal(ledger.check_request).retry_at == T0 + WEEK
    ledger.inbound_call(U, "wacid.in", answered=True)
    ledger.check_request(U)
    ledger.provider_refused(U, 138011, retry_at=T0 + 1)
    assert refusal(ledger.check_request).retry_at == T0 + 1


def test_seed_connected_call_does_not_reset_requests() -> None:
    ledger, _ = make()
    ledger.request_sent(U, "m1")
    ledger.request_sent(U, "m2")
    ledger.reply(U, True)
    ledger.call_placed(U, "c1")
    ledger.call_answered(U, "c1")
    assert isinstance(refusal(ledger.check_request), TooManyPermissionRequestsError)


# --------------------------------------------------------------------------- provider state


def test_provider_can_perform_false_blocks_when_local_counts_allow() -> None:
    ledger, _ = granted_ledger()
    ledger.apply_provider_state(U, {
        "messaging_product": "whatsapp",
        "permission": {"status": "temporary", "expiration_time": int(T0 + WEEK)},
        "actions": [{"action_name": "start_call", "can_perform_action": False,
                     "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 0}]}]})
    err = refusal(ledger.check_call)
    assert isinstance(err, NoPermissionError) and err.retry_at is None
    assert ledger.status(U).next_call_allowed_at is None
    ledger.reply(U, True, message_id="wamid.new")  # the permission changed: block lifted
    ledger.check_call(U)


def test_provider_exhausted_limit_gives_retry_at() -> None:
    ledger, clock = granted_ledger()
    ledger.apply_provider_state(U, {
        "permission": {"status": "temporary", "expiration_time": T0 + WEEK},
        "actions": [{"action_name": "start_call", "can_perform_action": False,
                     "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 100,
                                 "limit_expiration_time": T0 + 3600}]}]})
    err = refusal(ledger.check_call)
    assert isinstance(err, CallLimitExceededError) and err.retry_at == T0 + 3600
    st_ = ledger.status(U)
    assert st_.calls_last_24h == 100 and st_.next_call_allowed_at == T0 + 3600
    clock.set(T0 + 3599)
    assert refusal(ledger.check_call).retry_at == T0 + 3600
    clock.set(T0 + 3600)
    ledger.check_call(U)  # one call became free at the expiration time ...
    ledger.call_placed(U, "c1")
    # ... and after it the rest of the provider's usage lasts until a period has passed.
    assert refusal(ledger.check_call).retry_at == T0 + DAY


def test_provider_limits_win_over_local_defaults() -> None:
    ledger, clock = granted_ledger()  # seed: 5 calls / 24 h
    for i in range(5):
        ledger.call_placed(U, f"c{i}")
    assert isinstance(refusal(ledger.check_call), CallLimitExceededError)
    clock.advance(10)
    ledger.apply_provider_state(U, {
        "permission": {"status": "temporary", "expiration_time": T0 + WEEK},
        "actions": [{"action_name": "start_call", "can_perform_action": True,
                     "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 5}]}]})
    ledger.check_call(U)
    ledger.call_placed(U, "c5")
    assert ledger.status(U).calls_last_24h == 6


def test_provider_request_limits() -> None:
    ledger, clock = make()
    ledger.apply_provider_state(U, {
        "permission": {"status": "no_permission"},
        "actions": [{"action_name": "send_call_permission_request", "can_perform_action": False,
                     "limits": [{"time_period": "PT24H", "max_allowed": 1, "current_usage": 1,
                                 "limit_expiration_time": str(int(T0 + 500))},
                                {"time_period": "P7D", "max_allowed": 2, "current_usage": 1}]}]})
    err = refusal(ledger.check_request)
    assert isinstance(err, TooManyPermissionRequestsError) and err.retry_at == T0 + 500
    assert ledger.status(U).requests_last_7d == 1
    assert ledger.status(U).status is PermissionState.NONE
    clock.set(T0 + 500)
    ledger.check_request(U)
    ledger.request_sent(U, "m1")
    assert ledger.status(U).requests_last_7d == 2
    assert refusal(ledger.check_request).retry_at == T0 + WEEK  # snapshot usage ages out


def test_provider_request_block_without_limits() -> None:
    ledger, _ = make()
    ledger.apply_provider_state(U, {"actions": [
        {"action_name": "send_call_permission_request", "can_perform_action": False}]})
    err = refusal(ledger.check_request)
    assert isinstance(err, TooManyPermissionRequestsError) and err.retry_at is None
    assert ledger.status(U).next_request_allowed_at is None


@pytest.mark.parametrize(("status", "expected"), [
    ("no_permission", PermissionState.REVOKED), ("pending", PermissionState.REVOKED),
    ("denied", PermissionState.REJECTED), ("expired", PermissionState.EXPIRED),
    ("something_new", PermissionState.REVOKED),
])
def test_provider_negative_status_corrects_a_local_grant(status: str,
                                                         expected: PermissionState) -> None:
    ledger, _ = granted_ledger()
    ledger.apply_provider_state(U, {"permission": {"status": status}})
    assert ledger.status(U).status is expected
    with pytest.raises((NoPermissionError, PermissionExpiredError)):
        ledger.check_call(U)


def test_provider_negative_status_keeps_a_more_specific_local_state() -> None:
    ledger, _ = make()
    ledger.request_sent(U, "m1")
    ledger.apply_provider_state(U, {"permission": {"status": "no_permission"}})
    assert ledger.status(U).status is PermissionState.REQUESTED


def test_provider_positive_status_sets_the_grant() -> None:
    ledger, clock = make()
    ledger.apply_provider_state(U, {"permission": {"status": "temporary",
                                                   "expiration_time": T0 + 1000}})
    assert ledger.status(U).expires_at == T0 + 1000
    ledger.check_call(U)
    ledger.apply_provider_state(U, {"permission": {"status": "granted",  # M-API spelling
                                                   "expiration_time": T0 + 2000}})
    assert ledger.status(U).expires_at == T0 + 2000
    ledger.apply_provider_state(U, {"permission": {"status": "permanent"}})
    assert ledger.status(U).permanent
    assert refusal(ledger.check_request).code == 138017


def test_m_api_time_period_variant() -> None:
    ledger, _ = granted_ledger()
    ledger.apply_provider_state(U, {"actions": [{
        "action_name": "start_call", "can_perform_action": True,
        "limits": [{"time_period": "24h", "max_allowed": 100, "current_usage": 3}]}]})
    assert ledger.status(U).calls_last_24h == 3


def test_malformed_provider_state_is_tolerated() -> None:
    ledger, _ = granted_ledger()
    ledger.apply_provider_state(U, {"permission": "x", "actions": [
        "junk", {"action_name": "other"},
        {"action_name": "start_call", "limits": [{"time_period": "forever", "max_allowed": 1},
                                                 {"time_period": "PT1H"}, 5]}]})
    ledger.check_call(U)


# --------------------------------------------------------------------------- provider refusals


def test_provider_refused_138006_revokes_a_local_grant() -> None:
    ledger, _ = granted_ledger()
    assert ledger.provider_refused(U, 138006)
    assert ledger.status(U).status is PermissionState.REVOKED
    assert not ledger.provider_refused(U, 138006)


def test_provider_refused_138010_expires_a_local_grant() -> None:
    ledger, _ = make()
    ledger.reply(U, True, permanent=True)
    assert ledger.provider_refused(U, 138010)
    st_ = ledger.status(U)
    assert st_.status is PermissionState.EXPIRED and not st_.permanent
    assert isinstance(refusal(ledger.check_call), PermissionExpiredError)


def test_provider_refused_138012_blocks_calls_until_retry_at() -> None:
    ledger, clock = granted_ledger()
    assert ledger.provider_refused(U, 138012, retry_at=T0 + 7200)
    err = refusal(ledger.check_call)
    assert isinstance(err, CallLimitExceededError) and err.retry_at == T0 + 7200
    assert ledger.status(U).next_call_allowed_at == T0 + 7200
    clock.set(T0 + 7200)
    ledger.check_call(U)


def test_provider_refused_138012_without_retry_waits_one_window() -> None:
    ledger, clock = granted_ledger()
    ledger.provider_refused(U, 138012)
    assert refusal(ledger.check_call).retry_at == T0 + DAY


def test_newer_provider_state_lifts_a_refusal_block() -> None:
    ledger, _ = granted_ledger()
    ledger.provider_refused(U, 138012)
    ledger.apply_provider_state(U, {"actions": [{
        "action_name": "start_call", "can_perform_action": True,
        "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 2}]}]})
    ledger.check_call(U)


def test_provider_refused_138011_blocks_requests() -> None:
    ledger, clock = make()
    assert ledger.provider_refused(U, 138011)
    assert refusal(ledger.check_request).retry_at == T0 + WEEK
    clock.set(T0 + WEEK)
    ledger.check_request(U)
    ledger.provider_refused(U, 138009, retry_at=T0 + WEEK + 60)
    assert refusal(ledger.check_request).retry_at == T0 + WEEK + 60


def test_provider_refused_138017_records_permanent_and_unknown_codes_are_ignored() -> None:
    ledger, _ = make()
    assert ledger.provider_refused(U, 138017)
    assert ledger.status(U).permanent
    assert not ledger.provider_refused(U, 138017)
    assert not ledger.provider_refused(U, 131047)


# --------------------------------------------------------------------------- idempotency


def test_redelivered_facts_change_nothing() -> None:
    ledger, clock = make()
    assert ledger.request_sent(U, "m1")
    assert not ledger.request_sent(U, "m1")
    assert ledger.status(U).requests_last_7d == 1
    assert ledger.reply(U, True, message_id="r1")
    ledger.revoked(U, key="rev1")
    assert not ledger.reply(U, True, message_id="r1")  # an old grant must not come back
    assert ledger.status(U).status is PermissionState.REVOKED
    ledger.reply(U, True, message_id="r2")
    assert ledger.call_placed(U, "c1")
    assert not ledger.call_placed(U, "c1")
    assert ledger.status(U).calls_last_24h == 1
    assert ledger.call_unanswered(U, "c1")
    assert not ledger.call_unanswered(U, "c1")
    assert ledger.status(U).unanswered_in_a_row == 1
    before = ledger.status(U)
    clock.advance(DAY)  # retries keep coming for days
    assert not ledger.call_unanswered(U, "c1")
    assert not ledger.request_sent(U, "m1")
    clock.set(T0)
    assert ledger.status(U) == before


def test_outcome_before_placement_is_tolerated() -> None:
    ledger, _ = granted_ledger()
    ledger.call_answered(U, "c1")
    ledger.call_placed(U, "c1")
    assert ledger.status(U).calls_last_24h == 1
    assert not ledger.call_unanswered(U, "c1")


def test_reply_source_is_validated() -> None:
    ledger, _ = make()
    with pytest.raises(ValueError):
        ledger.reply(U, True, source="profile")
    with pytest.raises(ValueError):
        ledger.status("  +")


# --------------------------------------------------------------------------- status shape


def test_status_to_dict_has_exactly_the_api_fields() -> None:
    ledger, clock = granted_ledger()
    d = ledger.status(U).to_dict()
    assert d == {
        "status": "granted", "permanent": False, "expires_at": "2026-01-08T00:00:00Z",
        "requests_last_7d": 1, "calls_last_24h": 0, "unanswered_in_a_row": 0,
        "next_request_allowed_at": "2026-01-01T00:00:00Z",
        "next_call_allowed_at": "2026-01-01T00:00:00Z",
    }
    assert set(PermissionStatus.__dataclass_fields__) == set(d)
    unknown = ledger.status("4930000000").to_dict()
    assert unknown["status"] == "none" and unknown["next_call_allowed_at"] is None
    assert unknown["expires_at"] is None


def test_list_known_users_and_user_normalisation() -> None:
    ledger, _ = make()
    ledger.request_sent("+4915100000002", "m1")
    ledger.request_sent(" 4915100000001 ", "m2")
    ledger.status("4915100000003")  # reading does not create a user
    assert ledger.list() == ["4915100000001", "4915100000002"]
    assert ledger.status("4915100000002").requests_last_7d == 1


def test_refusal_carries_code_message_resolution_and_retry_at() -> None:
    ledger, _ = make()
    ledger.request_sent(U, "m1")
    ledger.request_sent(U, "m2")
    err = refusal(ledger.check_request)
    assert err.to_dict()["code"] == 138011 and err.resolution
    assert "2 requests in 7 days" in err.message
    assert err.details == f"retry_at={iso(T0 + WEEK)}"


# --------------------------------------------------------------------------- SQLite


def rich_history(ledger: PermissionLedger, clock: ManualClock) -> None:
    ledger.request_sent(U, "m1")
    ledger.request_delivered(U, "m1", at=T0 + 5)
    ledger.reply(U, True, message_id="r1", at=T0 + 30)
    for i in range(4):
        clock.advance(600)
        ledger.call_placed(U, f"c{i}")
        (ledger.call_answered if i == 1 else ledger.call_unanswered)(U, f"c{i}")
    ledger.request_sent("4930111", "x1")
    ledger.provider_refused("4930111", 138011, retry_at=T0 + 9000)
    ledger.apply_provider_state("4930222", {
        "permission": {"status": "permanent"},
        "actions": [{"action_name": "start_call", "can_perform_action": False,
                     "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 100,
                                 "limit_expiration_time": T0 + 4000}]}]})


def answers(ledger: PermissionLedger) -> list:
    out = []
    for user in ledger.list():
        out.append(ledger.status(user))
        for check in (ledger.check_call, ledger.check_request):
            try:
                check(user)
                out.append(None)
            except ProviderError as err:
                out.append((err.code, err.retry_at))
    return out


def test_sqlite_ledger_survives_a_restart(tmp_path) -> None:
    path = tmp_path / "data" / "permissions.sqlite3"
    clock = ManualClock(T0)
    store = SQLitePermissionStore(path)
    ledger = PermissionLedger(store, clock)
    rich_history(ledger, clock)
    expected = []
    for t in (clock.now(), T0 + 4000, T0 + 9000, T0 + DAY, T0 + WEEK + 10):
        clock.set(t)
        expected.append(answers(ledger))
    store.close()

    clock.set(T0 + 2400)
    reopened = PermissionLedger(SQLitePermissionStore.in_data_dir(tmp_path / "data"), clock)
    assert reopened.list() == ["4915112345678", "4930111", "4930222"]
    got = []
    for t in (clock.now(), T0 + 4000, T0 + 9000, T0 + DAY, T0 + WEEK + 10):
        clock.set(t)
        got.append(answers(reopened))
    assert got == expected
    assert not reopened.request_sent(U, "m1")  # dedupe state persisted too


def test_sqlite_file_mode_wal_and_schema_version(tmp_path) -> None:
    path = tmp_path / "p.sqlite3"
    store = SQLitePermissionStore(path)
    store.save("u", {"a": 1})
    assert store.load("u") == {"a": 1} and store.load("v") is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    assert store.schema_version == 1
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreSchemaError):
        SQLitePermissionStore(path)


def test_stores_satisfy_the_protocol(tmp_path) -> None:
    sqlite_store = SQLitePermissionStore(tmp_path / "s.db")
    for store in (MemoryPermissionStore(), sqlite_store):
        assert isinstance(store, PermissionStore)
        store.save("b", {"x": [1, 2]})
        store.save("a", {"x": None})
        store.save("b", {"x": [3]})
        assert store.users() == ["a", "b"] and store.load("b") == {"x": [3]}
        got = store.load("b")
        got["x"].append(4)  # type: ignore[index]
        assert store.load("b") == {"x": [3]}
        store.close()


# --------------------------------------------------------------------------- property test
# Reference model: plain lists of timestamps, recomputed from scratch for every
# question. Limits are drawn at random (plus both presets); all times are whole
# seconds, and the clock jumps land on window edges often.


@dataclass
class RefDecision:
    state: str
    order: int
    at: float
    permanent: bool = False
    expires: float | None = None


@dataclass
class Ref:
    limits: PermissionLimits
    callback: bool
    order: int = 0
    decision: RefDecision | None = None
    last_request: tuple[int, float, float | None] | None = None  # order, sent, delivered
    request_times: list[float] = field(default_factory=list)
    placed_times: list[float] = field(default_factory=list)
    answered_times: list[float] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    streak: int = 0
    call_block: float | None = None
    request_block: float | None = None

    def tick(self) -> int:
        self.order += 1
        return self.order

    def permission(self, now: float) -> tuple[str, float | None]:
        d, v = self.decision, self.limits.validity_s
        if d and d.state == "granted" and (d.permanent or now < d.expires):
            return "granted", d.expires
        if self.last_request and (d is None or self.last_request[0] > d.order):
            _, sent, delivered = self.last_request
            lapse = (sent if delivered is None else delivered) + v
            return ("requested", lapse) if now < lapse else ("expired", None)
        if d is None:
            return "none", None
        if d.state == "granted":
            return "expired", None
        if d.state == "rejected":
            return ("rejected", d.at + v) if now < d.at + v else ("expired", None)
        return "revoked", None

    def permanent(self, now: float) -> bool:
        return self.permission(now)[0] == "granted" and self.decision.permanent  # type: ignore[union-attr]

    def call_times(self) -> list[float]:
        return self.answered_times if self.limits.count_only_connected_calls else self.placed_times

    @staticmethod
    def retry(times: list[float], limits: list[RateLimit], now: float,
              block: float | None) -> float:
        """Earliest time the action is allowed: for each limit, the moment enough of
        the oldest counted events have left the window."""
        when = now
        for lim in limits:
            counted = sorted(t for t in times if now < t + lim.window_s)
            excess = len(counted) - lim.max_allowed + 1
            if excess > 0:
                when = max(when, counted[excess - 1] + lim.window_s)
        if block is not None and block > now:
            when = max(when, block)
        return when

    def call_retry(self, now: float) -> float:
        return self.retry(self.call_times(), [self.limits.call_limit], now, self.call_block)

    def request_retry(self, now: float) -> float:
        return self.retry(self.request_times, list(self.limits.request_limits), now,
                          self.request_block)

    def gate_call(self, now: float) -> tuple[int, float | None] | None:
        state, expires = self.permission(now)
        if state == "expired":
            return (138010, None)
        if state != "granted":
            return (138006, None)
        when = self.call_retry(now)
        if when == now:
            return None
        return (138012, when if expires is None or when < expires else None)

    def gate_request(self, now: float) -> tuple[int, float | None] | None:
        if self.permanent(now):
            return (138017, None)
        when = self.request_retry(now)
        return None if when == now else (138011, when)

    def status(self, now: float) -> dict:
        state, expires = self.permission(now)
        gate = self.gate_call(now)
        next_call = None
        if state == "granted":
            next_call = now if gate is None else gate[1]
        return {
            "status": state,
            "permanent": self.permanent(now),
            "expires_at": expires,
            "requests_last_7d": sum(1 for t in self.request_times if now < t + WEEK),
            "calls_last_24h": sum(1 for t in self.call_times() if now < t + DAY),
            "unanswered_in_a_row": self.streak,
            "next_request_allowed_at": None if self.permanent(now) else self.request_retry(now),
            "next_call_allowed_at": next_call,
        }

    # facts
    def decide(self, state: str, now: float, permanent: bool = False,
               expires: float | None = None) -> None:
        self.decision = RefDecision(state, self.tick(), now, permanent, expires)
        if state == "granted":
            self.streak = 0

    def connected(self) -> None:
        if self.limits.reset_requests_on_connected_call:
            self.request_times = []
            self.request_block = None


limits_strategy = st.one_of(
    st.just(PermissionLimits.seed()),
    st.just(PermissionLimits.meta()),
    st.builds(
        PermissionLimits,
        validity_s=st.sampled_from([3600.0, 2 * DAY, WEEK]),
        request_limits=st.lists(st.builds(RateLimit, st.integers(1, 3),
                                          st.sampled_from([600.0, DAY, 3 * DAY, WEEK])),
                                min_size=1, max_size=2).map(tuple),
        max_calls=st.integers(1, 4),
        call_window_s=st.sampled_from([600.0, 7200.0, DAY]),
        count_only_connected_calls=st.booleans(),
        unanswered_revoke_after=st.integers(1, 4),
        reset_requests_on_connected_call=st.booleans(),
    ),
)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(T0)
        self.store = MemoryPermissionStore()
        self.n = 0
        self.calls: dict[str, float] = {}  # call id -> placed at
        self.log: list[tuple[float, str, tuple, dict]] = []  # (seen at, method, args, kw)
        self.events: list[float] = [T0]

    @initialize(limits=limits_strategy, callback=st.booleans())
    def setup(self, limits: PermissionLimits, callback: bool) -> None:
        self.limits = limits
        self.ref = Ref(limits, callback)
        self.ledger = PermissionLedger(self.store, self.clock, limits, callback_enabled=callback)

    @property
    def now(self) -> float:
        return self.clock.now()

    def new_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def apply(self, method: str, *args: object, **kw: object) -> bool:
        """Call the ledger; remember applied facts (and when) for redelivery."""
        self.events.append(self.now)
        changed = getattr(self.ledger, method)(U, *args, **kw)
        if changed:
            self.log.append((self.now, method, args, kw))
        return changed

    # -- time
    @rule(seconds=st.sampled_from([1, 59, 600, 3599, 3600, 7200, DAY - 1, DAY, 2 * DAY,
                                   WEEK - 1, WEEK, 8 * DAY]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(data=st.data(), offset=st.sampled_from([-1, 0, 1]))
    def jump_to_an_edge(self, data: st.DataObject, offset: int) -> None:
        windows = {self.limits.validity_s, self.limits.call_window_s, DAY, WEEK,
                   *(lim.window_s for lim in self.limits.request_limits)}
        edges = sorted(t + w + offset for t in self.events for w in windows
                       if t + w + offset > self.now)
        if edges:
            self.clock.set(data.draw(st.sampled_from(edges[:20])))

    # -- facts
    @rule()
    def request(self) -> None:
        msg = self.new_id("wamid.req")
        assert self.apply("request_sent", msg)
        self.ref.last_request = (self.ref.tick(), self.now, None)
        self.ref.request_times.append(self.now)
        self.last_msg = msg

    @precondition(lambda self: getattr(self, "last_msg", None) is not None)
    @rule()
    def deliver(self) -> None:
        changed = self.apply("request_delivered", self.last_msg)
        order, sent, delivered = self.ref.last_request  # type: ignore[misc]
        assert changed == (delivered is None)
        if delivered is None:
            self.ref.last_request = (order, sent, self.now)

    @rule(granted=st.booleans(), permanent=st.booleans(),
          source=st.sampled_from(["user_action", "automatic"]))
    def reply(self, granted: bool, permanent: bool, source: str) -> None:
        permanent = permanent and granted and source == "user_action"
        assert self.apply("reply", granted, permanent, source=source,
                          message_id=self.new_id("wamid.reply"))
        if granted:
            self.ref.decide("granted", self.now, permanent,
                            None if permanent else self.now + self.limits.validity_s)
        else:
            self.ref.decide("revoked" if source == "automatic" else "rejected", self.now)

    @rule()
    def revoke(self) -> None:
        assert self.apply("revoked", key=self.new_id("revoke"))
        self.ref.decide("revoked", self.now)

    @rule()
    def place_call(self) -> None:
        call = self.new_id("wacid.")
        assert self.apply("call_placed", call)
        self.calls[call] = self.now
        self.ref.placed_times.append(self.now)

    @rule(data=st.data(), answered=st.booleans())
    def call_outcome(self, data: st.DataObject, answered: bool) -> None:
        # Webhooks about a call arrive within days: only calls inside the dedupe horizon.
        recent = [c for c, t in self.calls.items() if self.now - t < 7 * DAY]
        if not recent:
            return
        call = data.draw(st.sampled_from(recent))
        changed = self.apply("call_answered" if answered else "call_unanswered", call)
        ref = self.ref
        assert changed == (call not in ref.outcomes)
        if not changed:
            return
        ref.tick()
        ref.outcomes[call] = "answered" if answered else "unanswered"
        if answered:
            ref.answered_times.append(self.now)
            ref.streak = 0
            ref.connected()
        else:
            ref.streak += 1
            if ref.streak >= self.limits.unanswered_revoke_after and \
                    ref.permission(self.now)[0] == "granted":
                ref.decide("revoked", self.now)

    @rule(answered=st.booleans())
    def inbound(self, answered: bool) -> None:
        assert self.apply("inbound_call", self.new_id("wacid.in"), answered=answered)
        ref = self.ref
        if ref.callback and not ref.permanent(self.now):
            d = ref.decision
            exp = self.now + self.limits.validity_s
            if d and d.state == "granted" and d.expires is not None and d.expires > self.now:
                exp = max(exp, d.expires)
            ref.decide("granted", self.now, False, exp)
        if answered:
            ref.connected()

    @rule(code=st.sampled_from([138006, 138010, 138012, 138011]),
          wait=st.none() | st.sampled_from([1, 3600, DAY]))
    def provider_refuses(self, code: int, wait: float | None) -> None:
        retry = None if wait is None else self.now + wait
        changed = self.apply("provider_refused", code, retry)
        ref, now = self.ref, self.now
        granted = ref.permission(now)[0] == "granted"
        if code == 138006:
            assert changed == granted
            if granted:
                ref.decide("revoked", now)
        elif code == 138010:
            assert changed == granted
            if granted:
                ref.decision.permanent, ref.decision.expires = False, now  # type: ignore[union-attr]
        elif code == 138012:
            until = retry if retry is not None else now + self.limits.call_window_s
            ref.call_block = max(until, ref.call_block or until)
        else:
            window = max(lim.window_s for lim in self.limits.request_limits)
            until = retry if retry is not None else now + window
            ref.request_block = max(until, ref.request_block or until)

    @precondition(lambda self: len(self.log) > 0)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        # Meta retries a webhook for up to 7 days after the first delivery.
        recent = [e for e in self.log if self.now - e[0] < 7 * DAY and e[1] != "provider_refused"]
        if not recent:
            return
        _, method, args, kw = data.draw(st.sampled_from(recent))
        assert getattr(self.ledger, method)(U, *args, **kw) is False

    @rule()
    def restart(self) -> None:
        self.ledger = PermissionLedger(self.store, self.clock, self.limits,
                                       callback_enabled=self.ref.callback)

    # -- answers
    @invariant()
    def answers_match_the_reference(self) -> None:
        if not hasattr(self, "ledger"):
            return
        now = self.now
        got = self.ledger.status(U)
        want = self.ref.status(now)
        assert {**got.to_dict(), "status": got.status.value} == {
            **want, "expires_at": iso(want["expires_at"]),
            "next_request_allowed_at": iso(want["next_request_allowed_at"]),
            "next_call_allowed_at": iso(want["next_call_allowed_at"])}
        assert (got.expires_at, got.next_call_allowed_at, got.next_request_allowed_at) == (
            want["expires_at"], want["next_call_allowed_at"], want["next_request_allowed_at"])
        for check, expected in ((self.ledger.check_call, self.ref.gate_call(now)),
                                (self.ledger.check_request, self.ref.gate_request(now))):
            try:
                check(U)
                outcome = None
            except ProviderError as err:
                outcome = (err.code, err.retry_at)
            assert outcome == expected


LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("WACALL_PERMISSION_EXAMPLES", "400")), stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLedgerAgainstReference = LedgerMachine.TestCase
