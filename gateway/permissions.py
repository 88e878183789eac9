"""Call-permission ledger: who may be called, and who may be asked, right now.

WhatsApp only lets a business call a user who granted call permission, and
limits permission requests and calls per user. The ledger records every fact
the gateway learns (request sent/delivered, the user's reply, calls placed and
their outcome, inbound calls, provider refusals and the provider's permission
state) and answers two questions before anything goes on the network:
:meth:`PermissionLedger.check_call` and :meth:`PermissionLedger.check_request`.
Both raise the error the provider would return (138006, 138010, 138012,
138011, 138017) with a ``retry_at`` attribute: unix seconds when the action
becomes possible by waiting alone, or ``None`` when it needs the user (or the
provider) to act first.

Rules (defaults from 360dialog's outbound-call guide, :meth:`PermissionLimits.seed`;
Meta's current numbers are :meth:`PermissionLimits.meta`):

* A temporary permission lasts ``validity_s`` (7 days) from the grant; a
  permanent one never expires. A request nobody answered lapses ``validity_s``
  after delivery (after sending while no delivery is known); a decline lapses
  ``validity_s`` after it was given. Lapsed, it reads ``expired``.
* The newest fact wins, in arrival order: a reply (or callback grant, revoke,
  provider correction) replaces the previous permission, so a reply to a new
  request supersedes the old one.
* Request limits: any number of ``(max, window)`` pairs (seed: 2 per 7 days;
  Meta: 1 per 24 h and 2 per 7 days, and a connected call resets them).
* Call limit: ``max_calls`` per ``call_window_s`` (seed: 5 per 24 h counted when
  placed; Meta: 100 per 24 h counting only connected calls, when answered).
* ``unanswered_revoke_after`` (4) unanswered calls in a row revoke the
  permission; an answered call, and every new grant, resets the count.
* With ``callback_enabled`` (call setting ``callback_permission_status``), a call
  the user places to the business grants a temporary permission.

Window edges: an event at ``t`` counts in ``[t, t + window)``. Exactly one
window later it no longer counts, so a refusal's ``retry_at`` is the moment the
oldest blocking event turns ``window`` old. Likewise a permission granted at
``t`` is valid in ``[t, t + validity_s)`` and expired at ``t + validity_s``.
Events stamped in the future (clock skew) already count.

Provider truth: :meth:`PermissionLedger.apply_provider_state` takes the
permission-state endpoint's response. Its ``actions[].limits`` replace the local
limits for that action, its ``current_usage`` replaces the local count of
everything before the snapshot (events after it are added on top) until the
period has passed (or ``limit_expiration_time``), and ``can_perform_action:
false`` with no exhausted limit blocks the action until the permission changes
locally or a newer snapshot says otherwise. :meth:`PermissionLedger.provider_refused`
corrects the ledger from an error code the provider returned anyway.

Idempotency: webhooks are redelivered for up to 7 days. Facts carrying an id
(request message id, reply message id, call id) are applied once; ids are
remembered for ``dedupe_horizon_s`` (8 days). A call's first outcome wins.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from gateway.errors import ProviderError, error_for
from gateway.events import MAX_TIMESTAMP
from gateway.numbers import is_bsuid
from gateway.store import PermissionStore, SQLitePermissionStore

__all__ = [
    "DAY",
    "WEEK",
    "Clock",
    "ManualClock",
    "PermissionLedger",
    "PermissionLimits",
    "PermissionState",
    "PermissionStatus",
    "RateLimit",
    "SystemClock",
    "iso",
    "parse_duration",
]

DAY = 86_400.0
WEEK = 7 * DAY

START_CALL = "start_call"
SEND_REQUEST = "send_call_permission_request"

_RECORD_VERSION = 1


# --------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Source of the current time in unix seconds."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock (:func:`time.time`)."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("ManualClock.advance: seconds must be >= 0 (use set() to go back)")
        self._t += float(seconds)
        return self._t

    def set(self, t: float) -> None:
        self._t = float(t)


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``max_allowed`` events in any ``window_s`` seconds."""

    max_allowed: int
    window_s: float

    def __post_init__(self) -> None:
        if self.max_allowed < 0 or self.window_s <= 0:
            raise ValueError(f"invalid rate limit {self.max_allowed} per {self.window_s} s")


@dataclass(frozen=True, slots=True)
class PermissionLimits:
    """Every rule the ledger enforces; the defaults are 360dialog's (the seed)."""

    validity_s: float = WEEK
    request_limits: tuple[RateLimit, ...] = (RateLimit(2, WEEK),)
    max_calls: int = 5
    call_window_s: float = DAY
    #: Meta counts only calls the user picked up (at the time they were answered).
    count_only_connected_calls: bool = False
    unanswered_revoke_after: int = 4
    #: Meta: any connected call (either direction) resets the request limits.
    reset_requests_on_connected_call: bool = False

    def __post_init__(self) -> None:
        if self.validity_s <= 0:
            raise ValueError("validity_s must be > 0")
        if self.unanswered_revoke_after < 1:
            raise ValueError("unanswered_revoke_after must be >= 1")
        object.__setattr__(self, "request_limits", tuple(self.request_limits))
        RateLimit(self.max_calls, self.call_window_s)  # validates

    @classmethod
    def seed(cls) -> PermissionLimits:
        """360dialog's rules: 7-day permission, 2 requests / 7 days, 5 calls / 24 h."""
        return cls()

    @classmethod
    def meta(cls) -> PermissionLimits:
        """Meta's current rules: 100 connected calls / 24 h, requests 1 / 24 h and
        2 / 7 days (reset by a connected call), 7-day permission, revoke after 4."""
        return cls(request_limits=(RateLimit(1, DAY), RateLimit(2, WEEK)), max_calls=100,
                   count_only_connected_calls=True, reset_requests_on_connected_call=True)

    @property
    def call_limit(self) -> RateLimit:
        return RateLimit(self.max_calls, self.call_window_s)


# --------------------------------------------------------------------------- status


class PermissionState(StrEnum):
    NONE = "none"
    REQUESTED = "requested"
    GRANTED = "granted"
    REJECTED = "rejected"
    REVOKED = "revoked"
    EXPIRED = "expired"


#: Unix seconds wacall believes (1970 to 9999, as webhooks are parsed): else no time at all.
MAX_TIME = float(MAX_TIMESTAMP)


def valid_time(t: object) -> float | None:
    """``t`` as unix seconds if it is a finite number from 1970 to 9999, else ``None``."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    t = float(t)
    return t if math.isfinite(t) and 0.0 <= t <= MAX_TIME else None


def iso(t: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with ``Z`` (milliseconds only when needed); a time
    outside 1970-9999 (a stored value from before the range checks) is ``None``."""
    t = valid_time(t)
    if t is None:
        return None
    spec = "seconds" if float(t).is_integer() else "milliseconds"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PermissionStatus:
    """``GET /v1/permissions/{user}``. Times are unix seconds (``to_dict`` renders ISO).

    ``expires_at``: when the current status turns ``expired`` (a temporary grant, a
    pending request, a decline), else ``None``. ``next_*_allowed_at``: the earliest
    time the action is allowed if nothing else happens (now, when allowed now);
    ``None`` when waiting alone will not do (no permission, permanent permission for
    requests, provider block).
    """

    status: PermissionState
    permanent: bool
    expires_at: float | None
    requests_last_7d: int
    calls_last_24h: int
    unanswered_in_a_row: int
    next_request_allowed_at: float | None
    next_call_allowed_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "permanent": self.permanent,
            "expires_at": iso(self.expires_at),
            "requests_last_7d": self.requests_last_7d,
            "calls_last_24h": self.calls_last_24h,
            "unanswered_in_a_row": self.unanswered_in_a_row,
            "next_request_allowed_at": iso(self.next_request_allowed_at),
            "next_call_allowed_at": iso(self.next_call_allowed_at),
        }


# --------------------------------------------------------------------------- record
# One JSON document per user. ``seq`` numbers facts in arrival order, which decides
# "newest fact wins" independently of timestamps.


@dataclass(slots=True)
class _Decision:
    state: str  # granted | rejected | revoked
    at: float
    seq: int
    permanent: bool = False
    expires_at: float | None = None  # temporary grants only
    source: str = "user_action"  # user_action | automatic | callback | revoke | provider


@dataclass(slots=True)
class _Request:
    message_id: str
    sent_at: float
    seq: int
    delivered_at: float | None = None


@dataclass(slots=True)
class _Call:
    call_id: str
    placed_at: float | None  # None: outcome known, placement never recorded
    seq: int
    outcome: str | None = None  # answered | unanswered
    outcome_at: float | None = None
    outcome_seq: int | None = None


@dataclass(slots=True)
class _ProviderLimit:
    window_s: float
    max_allowed: int
    usage: int
    expires_at: float | None = None  # limit_expiration_time

    def usage_at(self, t: float, snapshot_at: float) -> int:
        """Usage the provider reported, as it ages: all of it until the limit's
        expiration time, then at most ``max - 1`` until a full period has passed."""
        if self.expires_at is not None and t < self.expires_at:
            return self.usage
        if t < snapshot_at + self.window_s:
            return self.usage if self.expires_at is None else min(self.usage,
                                                                  max(self.max_allowed - 1, 0))
        return 0


@dataclass(slots=True)
class _ProviderAction:
    at: float
    seq: int
    can_perform: bool | None
    limits: list[_ProviderLimit]
    opaque_block: bool  # can_perform false, and no limit explains it


@dataclass(slots=True)
class _Block:
    code: int
    at: float
    seq: int
    until: float


@dataclass(slots=True)
class _Record:
    user: str
    seq: int = 0
    decision: _Decision | None = None
    requests: list[_Request] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)
    unanswered: int = 0
    reset_seq: int = -1  # requests with seq <= reset_seq were reset by a connected call
    provider: dict[str, _ProviderAction] = field(default_factory=dict)
    blocks: dict[str, _Block] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def to_json(self) -> dict[str, Any]:
        return {"v": _RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Record:
        dec = d.get("decision")
        return cls(
            user=d["user"], seq=d["seq"],
            decision=_Decision(**dec) if dec else None,
            requests=[_Request(**r) for r in d["requests"]],
            calls=[_Call(**c) for c in d["calls"]],
            unanswered=d["unanswered"], reset_seq=d["reset_seq"],
            provider={k: _ProviderAction(**{**a, "limits": [_ProviderLimit(**x) for x in a["limits"]]})
                      for k, a in d["provider"].items()},
            blocks={k: _Block(**b) for k, b in d["blocks"].items()},
            seen=dict(d["seen"]),
        )


@dataclass(frozen=True, slots=True)
class _Window:
    """One limit as evaluated: local events (after ``after_seq``) plus provider usage."""

    window_s: float
    max_allowed: int
    base: _ProviderLimit | None = None
    base_at: float = 0.0
    after_seq: int | None = None

    def usage(self, events: list[tuple[float, int]], t: float) -> int:
        n = sum(1 for at, seq in events
                if (self.after_seq is None or seq > self.after_seq) and t < at + self.window_s)
        return n + (self.base.usage_at(t, self.base_at) if self.base else 0)

    def edges(self, events: list[tuple[float, int]]) -> Iterable[float]:
        """Times at which the usage can drop."""
        yield from (at + self.window_s for at, _ in events)
        if self.base:
            yield self.base_at + self.window_s
            if self.base.expires_at is not None:
                yield self.base.expires_at


# --------------------------------------------------------------------------- parsing

_ISO_DURATION = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")
_SHORT_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<u>s|m|h|d|w)$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": WEEK}


def parse_duration(value: object) -> float | None:
    """``PT24H``/``P7D`` (ISO 8601), ``24h``/``7d`` (Meta's API reference) or seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    m = _ISO_DURATION.match(text.upper())
    if m and text.upper() not in ("P", "PT"):
        seconds = (int(m["w"] or 0) * WEEK + int(m["d"] or 0) * DAY + int(m["h"] or 0) * 3600
                   + int(m["m"] or 0) * 60 + float(m["s"] or 0))
        return seconds or None
    m = _SHORT_DURATION.match(text.lower())
    if m:
        return float(m["n"]) * _UNIT[m["u"]] or None
    return None


def _timestamp(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _refusal(code: int, message: str, retry_at: float | None) -> ProviderError:
    err = error_for(code, message, details=f"retry_at={iso(retry_at)}" if retry_at is not None else None)
    err.retry_at = retry_at  # type: ignore[attr-defined]
    return err


# --------------------------------------------------------------------------- ledger


class PermissionLedger:
    """Records permission facts per user and gates calls and permission requests.

    Every mutator takes an optional ``at`` (unix seconds, e.g. the webhook's
    timestamp; default: now) and returns ``True`` when it changed something,
    ``False`` for a duplicate or a fact that does not apply.
    """

    def __init__(self, store: PermissionStore, clock: Clock | None = None,
                 limits: PermissionLimits | None = None, *, callback_enabled: bool = False,
                 dedupe_horizon_s: float = 8 * DAY) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.limits = limits or PermissionLimits.seed()
        #: Call setting ``callback_permission_status`` (may change at runtime).
        self.callback_enabled = callback_enabled
        self.dedupe_horizon_s = dedupe_horizon_s

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str], clock: Clock | None = None,
                    limits: PermissionLimits | None = None, **kw: Any) -> PermissionLedger:
        """A ledger on ``<data_dir>/permissions.sqlite3``."""
        return cls(SQLitePermissionStore.in_data_dir(data_dir), clock, limits, **kw)

    # ------------------------------------------------------------------ facts

    def request_sent(self, user: str, message_id: str, at: float | None = None) -> bool:
        """A call-permission request (free-form or template) was sent; counts from now."""
        rec, now, at = self._begin(user, at)
        if not self._first(rec, f"request:{message_id}", now):
            return False
        rec.requests.append(_Request(message_id, at, rec.next_seq()))
        self._save(rec, now)
        return True

    def request_delivered(self, user: str, message_id: str, at: float | None = None) -> bool:
        """The request was delivered: an unanswered request lapses ``validity_s`` later."""
        rec, now, at = self._begin(user, at)
        for req in rec.requests:
            if req.message_id == message_id and req.delivered_at is None:
                req.delivered_at = at
                self._save(rec, now)
                return True
        return False

    def reply(self, user: str, granted: bool, permanent: bool = False,
              expires_at: float | None = None, source: str = "user_action",
              message_id: str | None = None, at: float | None = None) -> bool:
        """The user's answer (Meta ``call_permission_reply``, 360dialog GRANTED/REJECTED).

        ``source="automatic"``: an accept is a callback grant, a reject is the revoke
        after unanswered calls. ``message_id`` is the reply's own id (deduplication).
        """
        if source not in ("user_action", "automatic"):
            raise ValueError(f"reply source must be 'user_action' or 'automatic', not {source!r}")
        rec, now, at = self._begin(user, at)
        if message_id is not None and not self._first(rec, f"reply:{message_id}", now):
            return False
        expires_at = valid_time(expires_at) if expires_at is not None else None
        if granted:
            exp = None if permanent else (expires_at if expires_at is not None
                                          else at + self.limits.validity_s)
            self._grant(rec, at, permanent=permanent, expires_at=exp, source=source)
        else:
            self._decide(rec, "revoked" if source == "automatic" else "rejected", at, source=source)
        self._save(rec, now)
        return True

    def revoked(self, user: str, at: float | None = None, key: str | None = None) -> bool:
        """The permission was withdrawn or expired (360dialog ``REVOKED``)."""
        rec, now, at = self._begin(user, at)
        if key is not None and not self._first(rec, f"revoked:{key}", now):
            return False
        self._decide(rec, "revoked", at, source="revoke")
        self._save(rec, now)
        return True

    def call_placed(self, user: str, call_id: str, at: float | None = None) -> bool:
        """A business-initiated call was placed (the provider accepted ``connect``)."""
        rec, now, at = self._begin(user, at)
        if not self._first(rec, f"call:{call_id}", now):
            return False
        call = self._call(rec, call_id)
        if call is None:
            rec.calls.append(_Call(call_id, at, rec.next_seq()))
        elif call.placed_at is None:  # its outcome arrived first
            call.placed_at, call.seq = at, rec.next_seq()
        else:
            self._save(rec, now)  # known from before the horizon: remember the id again
            return False
        self._save(rec, now)
        return True

    def call_answered(self, user: str, call_id: str, at: float | None = None) -> bool:
        """The user picked up: resets the unanswered count (and, for Meta, the request limits)."""
        return self._outcome(user, call_id, "answered", at)

    def call_unanswered(self, user: str, call_id: str, at: float | None = None) -> bool:
        """The call ended without being picked up (rejected, timed out, failed)."""
        return self._outcome(user, call_id, "unanswered", at)

    def inbound_call(self, user: str, call_id: str | None = None, *, answered: bool = False,
                     at: float | None = None) -> bool:
        """The user called the business. With ``callback_enabled`` this grants a
        temporary permission (a permanent one is kept). ``answered=True`` (again with
        the same ``call_id`` once connected) counts as a connected call."""
        rec, now, at = self._begin(user, at)
        changed = False
        if call_id is None or self._first(rec, f"inbound:{call_id}", now):
            changed = True
            if self.callback_enabled and not self._permanent(rec, at):
                current = rec.decision
                exp = at + self.limits.validity_s
                if current and current.state == "granted" and current.expires_at is not None \
                        and current.expires_at > at:
                    exp = max(exp, current.expires_at)
                self._grant(rec, at, permanent=False, expires_at=exp, source="callback")
        if answered and (call_id is None or self._first(rec, f"inbound-answered:{call_id}", now)):
            changed = True
            self._connected(rec)
        if changed:
            self._save(rec, now)
        return changed

    def provider_refused(self, user: str, code: int, retry_at: float | None = None,
                         at: float | None = None) -> bool:
        """The provider refused a call or request with ``code`` despite the local gate:
        138006 revokes a local grant, 138010 expires it, 138012 blocks calls and
        138011/138009 block requests until ``retry_at`` (default: one full window),
        138017 records a permanent permission. Other codes are ignored."""
        rec, now, at = self._begin(user, at)
        state, _ = self._permission(rec, at)
        if code == 138006:
            if state is not PermissionState.GRANTED:
                return False
            self._decide(rec, "revoked", at, source="provider")
        elif code == 138010:
            if state is not PermissionState.GRANTED:
                return False
            dec = rec.decision
            assert dec is not None
            dec.permanent, dec.expires_at, dec.source = False, at, "provider"
        elif code == 138012:
            window = max(w.window_s for w in self._windows(rec, START_CALL))
            self._block(rec, START_CALL, code, at, retry_at if retry_at is not None else at + window)
        elif code in (138011, 138009):
            window = max((w.window_s for w in self._windows(rec, SEND_REQUEST)), default=WEEK)
            self._block(rec, SEND_REQUEST, code, at, retry_at if retry_at is not None else at + window)
        elif code == 138017:
            if self._permanent(rec, at):
                return False
            self._grant(rec, at, permanent=True, expires_at=None, source="provider")
        else:
            return False
        self._save(rec, now)
        return True

    def apply_provider_state(self, user: str, state: Mapping[str, Any],
                             at: float | None = None) -> bool:
        """Apply the permission-state endpoint's response (``GET …/call_permissions``).

        ``permission.status``: ``temporary``/``permanent`` (or M-API ``granted``) set
        the grant (``expiration_time`` wins); ``no_permission``/``pending``/``denied``/
        ``expired`` (and anything unknown) only correct a local grant. ``actions[]``
        replace the local limits and counts for that action (see module docs).
        """
        rec, now, at = self._begin(user, at)
        perm = state.get("permission")
        if isinstance(perm, Mapping):
            self._apply_provider_permission(rec, perm, at)
        actions = state.get("actions")
        for action in actions if isinstance(actions, list) else []:
            if not isinstance(action, Mapping) or action.get("action_name") not in (START_CALL,
                                                                                     SEND_REQUEST):
                continue
            name = str(action["action_name"])
            can = action.get("can_perform_action")
            can = can if isinstance(can, bool) else None
            limits = [lim for raw in action.get("limits") or [] if (lim := self._parse_limit(raw))]
            exhausted = any(lim.usage >= lim.max_allowed for lim in limits)
            rec.provider[name] = _ProviderAction(at, rec.next_seq(), can, limits,
                                                 opaque_block=can is False and not exhausted)
            if can is not None or limits:  # newer provider truth replaces a refusal's block
                rec.blocks.pop(name, None)
        self._save(rec, now)
        return True

    # ------------------------------------------------------------------ gates

    def check_call(self, user: str) -> None:
        """Raise the provider's error if a call to ``user`` would be refused now."""
        rec, now = self._load(user), self.clock.now()
        state, expires_at = self._permission(rec, now)
        if state is PermissionState.EXPIRED:
            raise _refusal(138010, "Call permission expired; ask the user again", None)
        if state is not PermissionState.GRANTED:
            raise _refusal(138006, f"No call permission (status {state})", None)
        if self._opaque(rec, START_CALL):
            raise _refusal(138006, "Provider reports that calling this user is not allowed", None)
        when = self._earliest(rec, START_CALL, now)
        if when != now:
            retry = when if when is not None and (expires_at is None or when < expires_at) else None
            raise _refusal(138012, self._limit_text(rec, START_CALL, now, "calls"), retry)

    def check_request(self, user: str) -> None:
        """Raise the provider's error if a permission request to ``user`` would be refused."""
        rec, now = self._load(user), self.clock.now()
        if self._permanent(rec, now):
            raise _refusal(138017, "A permanent call permission exists; place the call", None)
        if self._opaque(rec, SEND_REQUEST):
            raise _refusal(138011, "Provider reports that no permission request may be sent", None)
        when = self._earliest(rec, SEND_REQUEST, now)
        if when != now:
            raise _refusal(138011, self._limit_text(rec, SEND_REQUEST, now, "requests"), when)

    def status(self, user: str) -> PermissionStatus:
        rec, now = self._load(user), self.clock.now()
        state, expires_at = self._permission(rec, now)
        dec = rec.decision
        permanent = state is PermissionState.GRANTED and dec is not None and dec.permanent
        next_call = None
        if state is PermissionState.GRANTED and not self._opaque(rec, START_CALL):
            when = self._earliest(rec, START_CALL, now)
            if when is not None and (expires_at is None or when < expires_at):
                next_call = when
        next_request = None
        if not permanent and not self._opaque(rec, SEND_REQUEST):
            next_request = self._earliest(rec, SEND_REQUEST, now)
        return PermissionStatus(
            status=state, permanent=permanent, expires_at=expires_at,
            requests_last_7d=self._count(rec, SEND_REQUEST, WEEK, now),
            calls_last_24h=self._count(rec, START_CALL, DAY, now),
            unanswered_in_a_row=rec.unanswered,
            next_request_allowed_at=next_request, next_call_allowed_at=next_call)

    # ------------------------------------------------------------------ internals: records

    def key(self, user: str) -> str:
        """The ledger entry for ``user``: a BSUID known to belong to a phone number
        (:meth:`link`) is that number's entry, so webhooks carrying only one of the two
        count for the same user."""
        key = _user_key(user)
        if is_bsuid(key):
            alias = self.store.load(_ALIAS + key)
            if alias and isinstance(alias.get("phone"), str):
                return alias["phone"]
        return key

    def link(self, bsuid: str, phone: str) -> bool:
        """Remember that ``bsuid`` and ``phone`` are one user (a webhook carried both).
        An entry kept so far under the BSUID alone moves to the number; if both have
        one, the number's wins (as the provider's ``to`` wins over ``recipient``).
        True if this was news."""
        bsuid, phone = _user_key(bsuid), _user_key(phone)
        if not is_bsuid(bsuid) or is_bsuid(phone):
            raise ValueError("link(bsuid, phone) takes a BSUID and a phone number")
        known = self.store.load(_ALIAS + bsuid)
        if known and known.get("phone") == phone:
            return False
        own = self.store.load(bsuid)
        if own and not self.store.load(phone):
            moved = _Record.from_json(own)
            moved.user = phone
            self.store.save(phone, moved.to_json())
        self.store.save(_ALIAS + bsuid, {"phone": phone})
        return True

    def _load(self, user: str) -> _Record:
        key = self.key(user)
        data = self.store.load(key)
        return _Record.from_json(data) if data else _Record(key)

    def _begin(self, user: str, at: float | None) -> tuple[_Record, float, float]:
        now = self.clock.now()
        return self._load(user), now, now if valid_time(at) is None else float(at)

    def _first(self, rec: _Record, key: str, now: float) -> bool:
        """Remember ``key``; ``False`` if it was seen within the dedupe horizon."""
        seen = rec.seen.get(key)
        if seen is not None and now - seen < self.dedupe_horizon_s:
            return False
        rec.seen[key] = now
        return True

    def _save(self, rec: _Record, now: float) -> None:
        horizon = self.dedupe_horizon_s
        rec.seen = {k: t for k, t in rec.seen.items() if now - t < horizon}
        keep = max([horizon, self.limits.validity_s]
                   + [w.window_s for a in (START_CALL, SEND_REQUEST) for w in self._windows(rec, a)])
        last = rec.requests[-1:] if rec.requests else []
        rec.requests = [r for r in rec.requests[:-1] if r.sent_at + keep > now] + last
        rec.calls = [c for c in rec.calls
                     if max(c.placed_at or -1e18, c.outcome_at or -1e18) + keep > now]
        rec.blocks = {k: b for k, b in rec.blocks.items() if b.until > now}
        self.store.save(rec.user, rec.to_json())

    @staticmethod
    def _call(rec: _Record, call_id: str) -> _Call | None:
        return next((c for c in rec.calls if c.call_id == call_id), None)

    def _outcome(self, user: str, call_id: str, outcome: str, at: float | None) -> bool:
        rec, now, at = self._begin(user, at)
        if not self._first(rec, f"outcome:{call_id}", now):
            return False
        call = self._call(rec, call_id)
        if call is None:
            call = _Call(call_id, None, rec.next_seq())
            rec.calls.append(call)
        elif call.outcome is not None:
            self._save(rec, now)  # keeps the key, so later duplicates stop earlier
            return False
        call.outcome, call.outcome_at, call.outcome_seq = outcome, at, rec.next_seq()
        if outcome == "answered":
            rec.unanswered = 0
            self._connected(rec)
        else:
            rec.unanswered += 1
            if rec.unanswered >= self.limits.unanswered_revoke_after and \
                    self._permission(rec, at)[0] is PermissionState.GRANTED:
                self._decide(rec, "revoked", at, source="automatic")
        self._save(rec, now)
        return True

    def _connected(self, rec: _Record) -> None:
        if self.limits.reset_requests_on_connected_call:
            rec.reset_seq = rec.next_seq()

    def _decide(self, rec: _Record, state: str, at: float, *, source: str,
                permanent: bool = False, expires_at: float | None = None) -> None:
        rec.decision = _Decision(state, at, rec.next_seq(), permanent, expires_at, source)
        for action in rec.provider.values():  # the provider's opaque "no" was about the old state
            action.opaque_block = False

    def _grant(self, rec: _Record, at: float, *, permanent: bool, expires_at: float | None,
               source: str) -> None:
        self._decide(rec, "granted", at, source=source, permanent=permanent, expires_at=expires_at)
        rec.unanswered = 0

    def _block(self, rec: _Record, action: str, code: int, at: float, until: float) -> None:
        old = self._active_block(rec, action)
        rec.blocks[action] = _Block(code, at, rec.next_seq(), max(until, old.until) if old else until)

    def _apply_provider_permission(self, rec: _Record, perm: Mapping[str, Any], at: float) -> None:
        status = str(perm.get("status", "")).strip().lower()
        exp = _timestamp(perm.get("expiration_time"))
        state, _ = self._permission(rec, at)
        dec = rec.decision
        granted = state is PermissionState.GRANTED and dec is not None
        if status == "permanent":
            if not (granted and dec.permanent):  # type: ignore[union-attr]
                self._grant(rec, at, permanent=True, expires_at=None, source="provider")
        elif status in ("temporary", "granted"):
            if granted and not dec.permanent:  # type: ignore[union-attr]
                if exp is not None:
                    dec.expires_at = exp  # type: ignore[union-attr]
            else:
                self._grant(rec, at, permanent=False, source="provider",
                            expires_at=exp if exp is not None else at + self.limits.validity_s)
        elif granted:  # no_permission, pending, denied, expired, unknown
            if status == "expired":
                dec.permanent, dec.expires_at, dec.source = False, at, "provider"  # type: ignore[union-attr]
            else:
                self._decide(rec, "rejected" if status == "denied" else "revoked", at,
                             source="provider")

    @staticmethod
    def _parse_limit(raw: object) -> _ProviderLimit | None:
        if not isinstance(raw, Mapping):
            return None
        window = parse_duration(raw.get("time_period"))
        max_allowed = _int(raw.get("max_allowed"))
        if window is None or max_allowed is None:
            return None
        return _ProviderLimit(window, max_allowed, _int(raw.get("current_usage")) or 0,
                              _timestamp(raw.get("limit_expiration_time")))

    # ------------------------------------------------------------------ internals: rules

    def _permission(self, rec: _Record, now: float) -> tuple[PermissionState, float | None]:
        """Status and when it turns ``expired`` (newest fact wins, by arrival order)."""
        dec = rec.decision
        if dec and dec.state == "granted" and (dec.permanent or (dec.expires_at or 0) > now):
            return PermissionState.GRANTED, None if dec.permanent else dec.expires_at
        req = rec.requests[-1] if rec.requests else None
        if req is not None and (dec is None or req.seq > dec.seq):
            start = req.delivered_at if req.delivered_at is not None else req.sent_at
            lapse = start + self.limits.validity_s
            return (PermissionState.REQUESTED, lapse) if now < lapse else (PermissionState.EXPIRED, None)
        if dec is None:
            return PermissionState.NONE, None
        if dec.state == "granted":
            return PermissionState.EXPIRED, None
        if dec.state == "rejected":
            lapse = dec.at + self.limits.validity_s
            return (PermissionState.REJECTED, lapse) if now < lapse else (PermissionState.EXPIRED, None)
        return PermissionState.REVOKED, None

    def _permanent(self, rec: _Record, now: float) -> bool:
        state, _ = self._permission(rec, now)
        return state is PermissionState.GRANTED and rec.decision is not None and rec.decision.permanent

    def _opaque(self, rec: _Record, action: str) -> bool:
        snap = rec.provider.get(action)
        return snap is not None and snap.opaque_block

    def _events(self, rec: _Record, action: str) -> list[tuple[float, int]]:
        """(time, seq) of everything that counts against ``action``'s limits."""
        if action == SEND_REQUEST:
            return [(r.sent_at, r.seq) for r in rec.requests if r.seq > rec.reset_seq]
        if self.limits.count_only_connected_calls:
            return [(c.outcome_at, c.outcome_seq) for c in rec.calls  # type: ignore[misc]
                    if c.outcome == "answered"]
        return [(c.placed_at, c.seq) for c in rec.calls if c.placed_at is not None]

    def _snapshot_valid(self, rec: _Record, action: str, seq: int) -> bool:
        """A connected call after a snapshot/block resets what it said about requests."""
        return not (action == SEND_REQUEST and self.limits.reset_requests_on_connected_call
                    and rec.reset_seq > seq)

    def _windows(self, rec: _Record, action: str) -> list[_Window]:
        snap = rec.provider.get(action)
        if snap is None or not snap.limits:
            local = self.limits.request_limits if action == SEND_REQUEST else (self.limits.call_limit,)
            return [_Window(lim.window_s, lim.max_allowed) for lim in local]
        valid = self._snapshot_valid(rec, action, snap.seq)
        return [_Window(lim.window_s, lim.max_allowed, lim if valid else None, snap.at, snap.seq)
                for lim in snap.limits]

    def _active_block(self, rec: _Record, action: str) -> _Block | None:
        block = rec.blocks.get(action)
        if block is None or not self._snapshot_valid(rec, action, block.seq):
            return None
        return block

    def _earliest(self, rec: _Record, action: str, now: float) -> float | None:
        """Earliest time >= now at which ``action`` passes every limit, if nothing else
        happens. Usage only drops at window edges, so those are the only candidates."""
        windows, events = self._windows(rec, action), self._events(rec, action)
        block = self._active_block(rec, action)
        candidates = {now}
        for w in windows:
            candidates.update(w.edges(events))
        if block is not None:
            candidates.add(block.until)
        for t in sorted(c for c in candidates if c >= now):
            if (block is None or t >= block.until) and \
                    all(w.usage(events, t) < w.max_allowed for w in windows):
                return t
        return None

    def _count(self, rec: _Record, action: str, window_s: float, now: float) -> int:
        """Usage over a fixed window (for the status counters), provider-corrected."""
        snap = rec.provider.get(action)
        lim = next((x for x in snap.limits if x.window_s == window_s), None) if snap else None
        if snap is not None and lim is not None:
            base = lim if self._snapshot_valid(rec, action, snap.seq) else None
            w = _Window(window_s, lim.max_allowed, base, snap.at, snap.seq)
        else:
            w = _Window(window_s, 0)
        return w.usage(self._events(rec, action), now)

    def _limit_text(self, rec: _Record, action: str, now: float, noun: str) -> str:
        parts = []
        events = self._events(rec, action)
        for w in self._windows(rec, action):
            used = w.usage(events, now)
            if used >= w.max_allowed:
                parts.append(f"{used} {noun} in {span(w.window_s)} (max {w.max_allowed})")
        block = self._active_block(rec, action)
        if block is not None and block.until > now:
            parts.append(f"provider refused with {block.code}")
        return "Limit reached: " + ("; ".join(parts) or noun)

    # Last in the class body, so ``list`` still means the builtin in annotations above.
    def list(self) -> list[str]:
        """Every user the ledger knows, sorted."""
        return [u for u in self.store.users() if not u.startswith(_ALIAS)]


#: Store keys of BSUID -> phone number links (not users themselves).
_ALIAS = "alias/"


def _user_key(user: str) -> str:
    key = str(user).strip().lstrip("+")
    if not key:
        raise ValueError("user must be a non-empty WhatsApp id or phone number")
    return key


def span(seconds: float) -> str:
    """A window as people say it: ``24 h``, ``7 days``, ``6 h``, ``90 s``."""
    if seconds % DAY == 0:
        return f"{int(seconds // DAY) * 24} h" if seconds == DAY else f"{int(seconds // DAY)} days"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    return f"{seconds:g} s"
