"""The call as a pure state machine (gateway.domain.call): a clock and inputs in, timeline
entries and actions out. No event loop, no media, no provider."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from gateway.domain import events as ev
from gateway.domain.call import (
    AcceptSent, AnswerMade, ApplyAnswer, BotJoined, BotLeft, Call, CallState, CancelTimer, Dialed,
    PermissionAsked, PermissionGiven,
    DtmfIn, End, EndReason, MediaLost, MediaReady, OfferMade, Offered, PreAcceptSent, RecordingStopped,
    StartAudio, StartTimer, Teardown, TerminateLate, TimelineEntry, TimerFired, TornDown, TRANSITIONS,
    WatchMedia,
)
from gateway.errors import CallLimitExceededError
from gateway.events import (
    CallConnect, CallStatus, CallStatusKind, CallTerminate, Direction, TerminateStatus, WebhookError,
)

OUT = Direction.BUSINESS_INITIATED
IN = Direction.USER_INITIATED


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - 1_000_000_000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_call(direction: Direction = OUT, clock: FakeClock | None = None, **kw) -> Call:
    return Call("call_test", user="15550001111", direction=direction, ring_timeout_s=60.0,
                max_duration_s=3600.0, media_end_grace_s=2.0,
                wacid=None if direction is OUT else "wacid.in", clock=clock or FakeClock(), **kw)


def status(kind: CallStatusKind) -> CallStatus:
    return CallStatus("wacid.1", kind, kind.value, 1_800_000_000, None, None, None)


def connect(sdp: str | None = "v=0 answer") -> CallConnect:
    return CallConnect("wacid.1", OUT, None, None, None, sdp, "answer", None, None)


def terminate(direction: Direction = OUT, errors: tuple = (), duration: int | None = 7) -> CallTerminate:
    return CallTerminate("wacid.1", direction, None, None, None, TerminateStatus.COMPLETED, None, None,
                         duration, None, errors, None)


def names(outputs) -> list[str]:
    """Entries by event name, actions by their class name."""
    return [o.name if isinstance(o, TimelineEntry) else type(o).__name__ for o in outputs]


def test_an_outbound_call_from_dial_to_user_hangup():
    clock = FakeClock()
    call = new_call(clock=clock)
    assert call.state is CallState.CREATED and names(call.timeline) == ["created"]
    assert names(call.feed(OfferMade())) == ["offer_created"]
    clock.advance(0.5)
    out = call.feed(Dialed("wacid.1"))
    assert names(out) == ["offer_sent", "StartTimer"] and out[1] == StartTimer("ring", 60.0)
    assert call.state is CallState.OFFER_SENT and call.wacid == "wacid.1"
    assert out[0].elapsed_s == 0.5 and out[0].event == ev.OfferSent(wacid="wacid.1")
    assert names(call.feed(status(CallStatusKind.RINGING))) == ["ringing"]
    out = call.feed(connect())
    assert names(out) == ["answer_received", "ApplyAnswer"] and out[1] == ApplyAnswer("v=0 answer")
    assert names(call.feed(MediaReady())) == ["media_up", "WatchMedia"]
    out = call.feed(status(CallStatusKind.ACCEPTED))
    assert names(out) == ["accepted", "CancelTimer", "StartTimer", "media_connected", "StartAudio"]
    assert out[1] == CancelTimer("ring") and out[2] == StartTimer("max_duration", 3600.0)
    clock.advance(30)
    out = call.feed(terminate())
    assert out == [CancelTimer("max_duration"), Teardown(None)]  # the user hung up: nothing to tell
    assert call.ending and not call.ended and call.end_reason is EndReason.USER_HANGUP
    out = call.feed(TornDown())
    assert names(out) == ["ended"] and out[0].event == ev.CallEnded("user_hangup")
    assert call.ended and call.duration_s == 7
    assert call.as_dict()["connected_seconds"] == 30.0
    assert call.feed(status(CallStatusKind.ACCEPTED)) == []  # after the end: nothing


def test_playback_waits_for_both_accept_and_media():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    out = call.feed(status(CallStatusKind.ACCEPTED))
    assert "StartAudio" not in names(out) and call.state is CallState.ACCEPTED
    out = call.feed(MediaReady())
    assert names(out) == ["media_up", "WatchMedia", "media_connected", "StartAudio"]


def test_late_and_repeated_webhooks_change_nothing():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(status(CallStatusKind.ACCEPTED))
    assert call.feed(status(CallStatusKind.RINGING)) == []  # backwards
    assert call.feed(status(CallStatusKind.ACCEPTED)) == []  # repeated
    assert names(call.feed(connect())) == ["answer_received", "ApplyAnswer"]
    assert call.feed(connect("v=0 other")) == []  # a second answer is not applied


def test_a_connect_without_an_answer_is_a_media_failure_told_to_the_provider():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    out = call.feed(connect(sdp=None))
    assert out[-1] == Teardown("terminate") and call.end_reason is EndReason.MEDIA_FAILURE
    assert call.end_detail == "connect webhook without an SDP answer"


def test_each_timer_means_one_end_reason_and_a_cancelled_timer_is_ignored():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    out = call.feed(TimerFired("ring"))
    assert out == [Teardown("terminate")] and call.end_reason is EndReason.RING_TIMEOUT
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(status(CallStatusKind.ACCEPTED))  # cancels "ring"
    assert call.feed(TimerFired("ring")) == [] and not call.ending
    out = call.feed(TimerFired("max_duration"))
    assert out == [Teardown("terminate")] and call.end_reason is EndReason.MAX_DURATION


def test_lost_media_gets_a_grace_period_for_the_terminate_webhook():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(MediaReady())
    call.feed(status(CallStatusKind.ACCEPTED))
    assert call.feed(MediaLost("ICE failed")) == [StartTimer("media_grace", 2.0)]
    assert call.feed(MediaLost("DTLS closed")) == []  # one grace period
    out = call.feed(terminate())  # the user hung up: the webhook came in time
    assert call.end_reason is EndReason.USER_HANGUP and out[-1] == Teardown(None)
    assert CancelTimer("media_grace") in out

    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(MediaReady())
    call.feed(MediaLost("ICE failed"))
    assert call.feed(TimerFired("media_grace"))[-1] == Teardown("terminate")
    assert (call.end_reason, call.end_detail) == (EndReason.MEDIA_FAILURE, "ICE failed")


def test_how_a_terminate_webhook_ends_the_call():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(terminate())
    assert call.end_reason is EndReason.NOT_ANSWERED  # never accepted
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(terminate(errors=(WebhookError(138012, "limit", "2 calls a day"),)))
    assert call.end_reason is EndReason.PROVIDER_ERROR
    assert isinstance(call.error, CallLimitExceededError) and call.error.code == 138012
    call.feed(TornDown())
    assert call.timeline[-1].event.error["code"] == 138012
    call = new_call(IN)
    call.feed(terminate(direction=IN))
    assert call.end_reason is EndReason.USER_HANGUP  # the caller hung up


def test_status_rejected_ends_without_telling_the_provider():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    assert call.feed(status(CallStatusKind.REJECTED)) == [CancelTimer("ring"), Teardown(None)]
    assert call.end_reason is EndReason.REJECTED


def test_an_inbound_call_not_yet_accepted_is_rejected_then_terminated():
    call = new_call(IN)
    call.feed(Offered())
    call.feed(AnswerMade())
    call.feed(PreAcceptSent())
    assert names(call.feed(MediaReady())) == ["media_up"]  # watched only from our accept on
    assert call.feed(End(EndReason.SHUTDOWN, notify=True)) == [Teardown("reject")]

    call = new_call(IN)
    for step in (Offered(), AnswerMade(), PreAcceptSent(), MediaReady()):
        call.feed(step)
    out = call.feed(AcceptSent())
    assert names(out) == ["accepted", "StartTimer", "WatchMedia", "media_connected", "StartAudio"]
    assert [e.name for e in call.timeline] == ["created", "offer_received", "answer_created", "pre_accepted",
                                               "media_up", "accepted", "media_connected"]
    assert call.feed(End(EndReason.BUSINESS_HANGUP, notify=True))[-1] == Teardown("terminate")


def test_no_provider_call_id_means_nothing_to_tell_the_provider():
    call = new_call()
    assert call.feed(End(EndReason.MEDIA_FAILURE, notify=True, detail="no offer")) == [Teardown(None)]


def test_a_call_the_provider_names_after_its_end_is_terminated_there():
    call = new_call()
    call.feed(OfferMade())
    call.feed(End(EndReason.BUSINESS_HANGUP, notify=True))
    call.feed(TornDown())
    assert call.feed(Dialed("wacid.late")) == [TerminateLate("wacid.late")]
    assert call.state is CallState.ENDED and call.wacid == "wacid.late"


def test_bot_dtmf_and_recording_events():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    assert names(call.feed(BotJoined("twilio"))) == ["bot_connected"]
    assert names(call.feed(DtmfIn("5", 160, "rfc4733"))) == ["dtmf"] and call.dtmf_received == ["5"]
    out = call.feed(RecordingStopped("disk_full", "no space left"))
    assert names(out) == ["recording_failed"]
    assert call.recording_error == {"code": "disk_full", "reason": "no space left"}
    assert call.feed(RecordingStopped("io_error", "again")) == []  # the first reason stays
    assert call.feed(BotLeft("local", "stopped")) == []  # we hung up on it
    out = call.feed(BotLeft("remote", "goodbye"))
    assert out[-1] == Teardown("terminate") and call.end_reason is EndReason.BOT_HANGUP
    assert call.end_detail == "bot: goodbye"


def test_the_first_end_wins():
    call = new_call()
    call.feed(Dialed("wacid.1"))
    call.feed(End(EndReason.BUSINESS_HANGUP, notify=True))
    assert call.feed(End(EndReason.MEDIA_FAILURE, notify=True)) == []
    assert call.feed(terminate()) == []
    call.feed(TornDown())
    assert [e.name for e in call.timeline].count("ended") == 1
    assert call.end_reason is EndReason.BUSINESS_HANGUP


INPUTS = st.sampled_from([
    OfferMade(), Dialed("wacid.1"), Offered(), AnswerMade(), PreAcceptSent(), MediaReady(), AcceptSent(),
    connect(), connect(None), status(CallStatusKind.RINGING), status(CallStatusKind.ACCEPTED),
    status(CallStatusKind.REJECTED), terminate(), MediaLost("x"), TimerFired("ring"),
    TimerFired("max_duration"), TimerFired("media_grace"), End(EndReason.BUSINESS_HANGUP, notify=True),
    BotLeft("remote", "bye"), DtmfIn("1", 100, "rfc4733"), TornDown(),
])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([OUT, IN]), st.lists(INPUTS, max_size=25))
def test_any_input_order_moves_only_forward_and_ends_once(direction, inputs):
    call = new_call(direction)
    teardowns = watches = 0
    for item in inputs:
        if isinstance(item, TornDown) and not call.ending:
            continue  # (only ever fed after a Teardown)
        out = call.feed(item)
        teardowns += sum(isinstance(o, Teardown) for o in out)
        watches += sum(isinstance(o, WatchMedia) for o in out)
        started = [o for o in out if isinstance(o, StartAudio)]
        if started:
            assert call.state is CallState.MEDIA_CONNECTED and call.media_ready
    states = [CallState(e.event.state) for e in call.timeline if e.event.state is not None]
    for before, after in zip(states, states[1:]):  # each step is in the table (or the end)
        assert after in TRANSITIONS[before] or after is CallState.ENDED, states
    assert states[-1] is call.state
    assert teardowns == (1 if call.ending else 0)
    assert [e.name for e in call.timeline].count("ended") == (1 if call.ended else 0)
    assert watches <= 1


def test_a_stored_timeline_comes_back_the_same():
    clock = FakeClock()
    clock.now = 1_796_615_422.454  # (a time whose milliseconds do not survive float math)
    call = new_call(clock=clock)
    call.feed(PermissionAsked("wamid.1"))
    stored = [e.as_dict() for e in call.timeline]
    clock.advance(30)
    again = new_call(clock=clock)
    again.restore(stored)
    assert [e.as_dict() for e in again.timeline] == stored
    assert names(again.feed(PermissionGiven())) == ["permission_granted"]
    assert again.timeline[-1].elapsed_s == 30.0  # its age counts from the stored creation
