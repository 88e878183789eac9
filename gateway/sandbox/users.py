"""Simulated WhatsApp users: how each one behaves when called.

Any E.164 number is a simulated user. By default a user answers after about a second,
never hangs up first and says nothing (the phone still sends silence, like a real one).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

from ..numbers import normalize_number

ON_CALL = ("answer", "reject", "ignore")
ON_PERMISSION_REQUEST = ("grant", "reject", "ignore")
#: Steps of a business-initiated call as the provider performs them. ``response`` is the
#: HTTP response to ``connect``; the others are webhooks. Tests reorder them.
CALL_STEPS = ("response", "connect", "ringing", "accepted")
DEFAULT_ORDER = CALL_STEPS

@dataclass(slots=True)
class UserBehaviour:
    on_call: str = "answer"
    answer_after_ms: int = 1000
    hangup_after_s: float | None = None
    say: str | None = None
    on_permission_request: str = "grant"
    #: How long the user takes to answer a permission request.
    permission_after_ms: int = 300
    #: Order of the provider's steps for a call to this user (a permutation of
    #: :data:`CALL_STEPS`); ``None`` = the usual order.
    event_order: tuple[str, ...] | None = None

    def updated(self, changes: dict) -> UserBehaviour:
        """A copy with ``changes`` applied; ValueError naming the first bad field."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown user settings: {', '.join(unknown)}")
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        new._validate()
        return new

    def _validate(self) -> None:
        if self.on_call not in ON_CALL:
            raise ValueError(f"on_call must be one of {', '.join(ON_CALL)}")
        if self.on_permission_request not in ON_PERMISSION_REQUEST:
            raise ValueError(f"on_permission_request must be one of {', '.join(ON_PERMISSION_REQUEST)}")
        for name in ("answer_after_ms", "permission_after_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        if self.hangup_after_s is not None and (
            not isinstance(self.hangup_after_s, (int, float)) or self.hangup_after_s <= 0
        ):
            raise ValueError("hangup_after_s must be a positive number or null")
        if self.say is not None and not isinstance(self.say, str):
            raise ValueError("say must be a file path or null")
        if self.event_order is not None:
            order = tuple(self.event_order)
            if sorted(order) != sorted(CALL_STEPS):
                raise ValueError(f"event_order must be a permutation of {', '.join(CALL_STEPS)}")
            self.event_order = order

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.event_order is not None:
            data["event_order"] = list(self.event_order)
        return data


class UserDirectory:
    def __init__(self, default: UserBehaviour | None = None):
        self.default = default or UserBehaviour()
        self._users: dict[str, UserBehaviour] = {}

    def get(self, number: str) -> UserBehaviour:
        return self._users.get(normalize_number(number), self.default)

    def update(self, number: str, changes: dict) -> UserBehaviour:
        key = normalize_number(number)
        behaviour = self.get(key).updated(changes)
        self._users[key] = behaviour
        return behaviour
