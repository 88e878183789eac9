"""Call permissions end to end: the gateway's ledger, the sandbox's rules, and the webhooks between."""

import asyncio
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.errors import (
    CallLimitExceededError,
    NoPermissionError,
    PermissionExpiredError,
    ProviderError,
    TooManyPermissionRequestsError,
)
from gateway.permissions import DAY, WEEK, PermissionState
from tests.helpers import until

USER = "+4915199990000"
TIMEOUT = 20


def gateway_status(service, user=USER):
    return service.ledger.status(user.lstrip("+"))


def sandbox_status(service, user=USER):
    return service.sandbox.messaging.ledger.status(user.lstrip("+"))


async def request_and_wait(service, user=USER, **kwargs):
    """Send a request through the gateway and wait for the user's answer to arrive."""
    before = len(service.sandbox.messaging.sent)
    message_id = await service.gate.request(user, **kwargs)
    assert len(service.sandbox.messaging.sent) == before + 1
    return message_id


async def finish(service, call, *, answered: bool):
    sandbox_call = service.sandbox.calls[call.wacid]
    if answered:
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        await call.hangup()
    await call.wait_finished(TIMEOUT)
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    await until(lambda: not service.sandbox.messaging._tasks)  # revoke webhooks delivered


async def call(service, *, answered=True, user=USER):
    service.sandbox.users.update(user, {"on_call": "answer" if answered else "reject", "answer_after_ms": 0})
    placed = await service.manager.place_call(user)
    await finish(service, placed, answered=answered)
    return placed


async def test_no_permission_is_refused_locally_before_any_network_call(service):
    with pytest.raises(NoPermissionError) as info:
        await service.manager.place_call(USER)
    assert info.value.code == 138006 and info.value.resolution and info.value.retry_at is None
    assert service.sandbox.calls == {} and service.sandbox.messaging.sent == []


async def test_request_grant_then_call(service):
    await request_and_wait(service)
    await until(lambda: gateway_status(service).status is PermissionState.GRANTED)
    status = gateway_status(service)
    now = service.sandbox.clock.now()
    assert status.expires_at == pytest.approx(now + WEEK, abs=5)
    assert status.requests_last_7d == 1
    placed = await call(service)
    assert placed.end_reason is EndReason.BUSINESS_HANGUP
    assert gateway_status(service).calls_last_24h == 1


async def test_two_requests_per_seven_days(service):
    service.sandbox.users.update(USER, {"on_permission_request": "ignore"})
    first = service.sandbox.clock.now()
    await request_and_wait(service)
    service.sandbox.clock.advance(DAY)
    await request_and_wait(service)
    with pytest.raises(TooManyPermissionRequestsError) as info:
        await service.gate.request(USER)
    assert info.value.code == 138011
    assert info.value.retry_at == pytest.approx(first + WEEK, abs=2)
    service.sandbox.clock.advance(6 * DAY - 5)  # just before the window ends: still refused
    with pytest.raises(TooManyPermissionRequestsError):
        await service.gate.request(USER)
    service.sandbox.clock.advance(10)
    await request_and_wait(service)  # exactly 7 days later the first one no longer counts


async def test_five_calls_per_day_and_the_sixth_is_refused_with_retry_at(service):
    await service.sandbox.grant(USER, permanent=True)
    first = service.sandbox.clock.now()
    for _ in range(5):
        await call(service)
    with pytest.raises(CallLimitExceededError) as info:
        await service.manager.place_call(USER)
    assert info.value.code == 138012
    assert info.value.retry_at == pytest.approx(first + DAY, abs=5)
    assert len(service.sandbox.calls) == 5  # refused locally
    service.sandbox.clock.advance(DAY)
    await call(service)


async def test_four_unanswered_calls_revoke(service):
    await request_and_wait(service)
    await until(lambda: gateway_status(service).status is PermissionState.GRANTED)
    for n in range(3):
        await call(service, answered=False)
        assert gateway_status(service).unanswered_in_a_row == n + 1
    await call(service, answered=True)  # an answered call resets the count
    assert gateway_status(service).unanswered_in_a_row == 0
    service.sandbox.clock.advance(DAY)
    for _ in range(4):
        await call(service, answered=False)
    await until(lambda: gateway_status(service).status is PermissionState.REVOKED)
    assert sandbox_status(service).status is PermissionState.REVOKED
    with pytest.raises(NoPermissionError):
        await service.manager.place_call(USER)


async def test_permission_expires_after_seven_days(service):
    await request_and_wait(service)
    await until(lambda: gateway_status(service).status is PermissionState.GRANTED)
    service.sandbox.clock.advance(WEEK - 60)
    await call(service)
    service.sandbox.clock.advance(60)
    with pytest.raises(PermissionExpiredError) as info:
        await service.manager.place_call(USER)
    assert info.value.code == 138010
    assert gateway_status(service).status is PermissionState.EXPIRED


@pytest.mark.parametrize("behaviour, reason", [("reject", EndReason.PERMISSION_DENIED),
                                               ("ignore", EndReason.PERMISSION_TIMEOUT)])
async def test_ask_then_call_ends_when_declined_or_unanswered(service, behaviour, reason):
    service.sandbox.users.update(USER, {"on_permission_request": behaviour, "permission_after_ms": 0})
    placed = await service.manager.place_call(USER, if_no_permission="request", permission_wait_s=0.5)
    assert placed.state is CallState.CREATED
    await placed.wait_finished(TIMEOUT)
    assert placed.end_reason is reason
    assert "permission request" in placed.end_detail
    assert service.sandbox.calls == {}


async def test_ask_then_call_dials_on_granted(service):
    service.sandbox.users.update(USER, {"permission_after_ms": 100, "answer_after_ms": 0})
    placed = await service.manager.place_call(USER, if_no_permission="request")
    await placed.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    names = [e.name for e in placed.timeline]
    assert names.index("permission_requested") < names.index("permission_granted") < names.index("offer_sent")
    await placed.hangup()


async def test_template_request(service):
    provider = service.provider
    created = await provider.create_permission_template(
        name="order_call_ok", language="en", body_text="Can we call you about order {{1}}?",
        example_values=["8812"], footer="Thanks", category="UTILITY")
    assert created["status"] == "APPROVED"
    from gateway.gatekeeper import PermissionRequest

    await request_and_wait(service, how=PermissionRequest("template", template={
        "name": "order_call_ok", "language": "en", "parameters": ["8812"]}))
    await until(lambda: gateway_status(service).status is PermissionState.GRANTED)


async def test_callback_permission_grants_on_inbound_call(settings):
    async with Service(replace(settings, callback_permission=True), sandbox=True) as service:
        assert service.sandbox.messaging.settings["callback_permission_status"] == "ENABLED"
        sandbox_call = await service.sandbox.user_calls(USER, hangup_after_s=0.2)
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
        await until(lambda: gateway_status(service).status is PermissionState.GRANTED)
        assert sandbox_status(service).status is PermissionState.GRANTED
        await call(service)


async def test_provider_refusal_corrects_the_ledger(service):
    # The gateway believes in a grant the provider never saw (e.g. a stale ledger).
    service.ledger.reply(USER.lstrip("+"), True)
    placed = await service.manager.place_call(USER)
    await placed.wait_finished(TIMEOUT)
    assert isinstance(placed.error, NoPermissionError)
    assert gateway_status(service).status is not PermissionState.GRANTED
    with pytest.raises(NoPermissionError):
        await service.manager.place_call(USER)


async def test_360dialog_permission_webhook_shape(settings):
    async with Service(settings, sandbox=True) as service:
        service.sandbox.messaging.webhook_shape = "360dialog"
        await request_and_wait(service)
        await until(lambda: gateway_status(service).status is PermissionState.GRANTED)


async def test_reconcile_from_the_provider_state(service):
    await service.sandbox.grant(USER, permanent=True, notify=False)  # the webhook was lost
    with pytest.raises(NoPermissionError):
        await service.manager.place_call(USER)
    service.gate.reconcile = True
    await call(service)
    assert gateway_status(service).permanent


async def test_ledger_survives_a_restart(settings):
    async with Service(settings, sandbox=True) as service:
        await request_and_wait(service)
        await until(lambda: gateway_status(service).status is PermissionState.GRANTED)
        await call(service, answered=False)
        before = gateway_status(service).to_dict()
        offset = service.sandbox.clock.offset
    async with Service(settings, sandbox=True) as service:
        service.sandbox.clock.offset = offset
        after = gateway_status(service).to_dict()
    moving = ("next_call_allowed_at", "next_request_allowed_at")  # "now" when allowed: time moved on
    assert {k: v for k, v in after.items() if k not in moving} == {k: v for k, v in before.items() if k not in moving}
    assert before["status"] == "granted" and before["unanswered_in_a_row"] == 1
    assert before["requests_last_7d"] == 1 and before["calls_last_24h"] == 1
    for key in moving:
        assert after[key][:16] == before[key][:16]  # same minute: allowed at once, both times


# -- the gateway and the provider always agree ------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("request"), st.sampled_from(["grant", "reject", "ignore"])),
    st.tuples(st.just("call"), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([3600.0, DAY, 2 * DAY, WEEK])),
), min_size=1, max_size=8)


def _allowed(check, user) -> int | None:
    try:
        check(user)
        return None
    except ProviderError as exc:
        return exc.code


async def _scenario(settings, ops) -> None:
    async with Service(settings, sandbox=True) as service:
        user = USER.lstrip("+")
        gw, sb = service.ledger, service.sandbox.messaging.ledger

        def agree():
            assert _allowed(gw.check_call, user) == _allowed(sb.check_call, user)
            assert _allowed(gw.check_request, user) == _allowed(sb.check_request, user)
            g, s = gw.status(user), sb.status(user)
            assert (g.status, g.permanent, g.calls_last_24h, g.requests_last_7d, g.unanswered_in_a_row) == \
                   (s.status, s.permanent, s.calls_last_24h, s.requests_last_7d, s.unanswered_in_a_row)

        for op, arg in ops:
            if op == "advance":
                service.sandbox.clock.advance(arg)
            elif op == "request":
                service.sandbox.users.update(USER, {"on_permission_request": arg, "permission_after_ms": 0})
                if _allowed(gw.check_request, user) is None:
                    await request_and_wait(service)
                    await until(lambda: not service.sandbox.messaging._tasks)  # answer delivered
            elif op == "call" and _allowed(gw.check_call, user) is None:
                await call(service, answered=arg)
            agree()


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_gateway_and_sandbox_agree_on_every_sequence(tmp_path_factory, ops):
    from gateway.config import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("agree"), port=0, media_addresses=["127.0.0.1"],
                        ring_timeout_s=30.0, media_timeout_s=10.0)
    asyncio.run(_scenario(settings, ops))
