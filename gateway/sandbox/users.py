"""Simulated WhatsApp users: how each one behaves when called.

Any E.164 number is a simulated user. By default a user answers after about a second,
never hangs up first and says nothing (the phone still sends silence, like a real one).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

from ..numbers import is_bsuid, normalize_recipient

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
    #: This user's business-scoped user id (webhooks carry it next to the number; the
    #: user can be called and asked by it).
    bsuid: str | None = None
    #: The user adopted a username: webhooks carry only the BSUID, no phone number.
    username: bool = False

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
        if self.bsuid is not None:
            if not is_bsuid(self.bsuid):
                raise ValueError("bsuid must be a business-scoped user id (CC.id) or null")
            self.bsuid = normalize_recipient(self.bsuid)
        if not isinstance(self.username, bool):
            raise ValueError("username must be true or false")
        if self.username and self.bsuid is None:
            raise ValueError("a user with a username needs a bsuid (webhooks carry only that)")
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

    def canonical(self, user: str) -> str:
        """The sandbox's key for a user named by number or BSUID: the number when a
        user with that number has that BSUID, else what was given (normalised)."""
        key = normalize_recipient(user)
        if is_bsuid(key):
            for number, behaviour in self._users.items():
                if behaviour.bsuid == key and not is_bsuid(number):
                    return number
        return key

    def get(self, number: str) -> UserBehaviour:
        return self._users.get(self.canonical(number), self.default)

    def update(self, number: str, changes: dict) -> UserBehaviour:
        key = self.canonical(number)
        behaviour = self.get(key).updated(changes)
        if is_bsuid(key) and behaviour.bsuid not in (None, key):
            raise ValueError("a user named by BSUID has that bsuid")
        self._users[key] = behaviour
        return behaviour

    def ids(self, user: str, phone_field: str, id_field: str) -> dict[str, str]:
        """The user as a webhook names them: ``{phone_field: number, id_field: bsuid}``,
        each only when known (no number for a user with a username)."""
        key = self.canonical(user)
        if is_bsuid(key):
            return {id_field: key}
        behaviour = self._users.get(key, self.default)
        out = {} if behaviour.username else {phone_field: key}
        if behaviour.bsuid:
            out[id_field] = behaviour.bsuid
        return out
