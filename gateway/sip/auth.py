"""HTTP Digest authentication for SIP (RFC 2617, RFC 7616 algorithms, RFC 8760 for SIP):
MD5 and SHA-256 (and their ``-sess`` variants), ``qop=auth`` (and ``auth-int``) with
``nc``/``cnonce``, or no qop for old servers.

Client side: :func:`authorization` answers a ``WWW-Authenticate``/``Proxy-Authenticate``
challenge. Server side: :class:`DigestServer` issues stateless, expiring nonces (an HMAC of
their timestamp) and verifies credentials. Passwords are never logged.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sipmessage import AuthChallenge, AuthCredentials

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _hash(algorithm: str, text: str) -> str:
    base = algorithm.upper().removesuffix("-SESS")
    return _HASHES[base](text.encode()).hexdigest()


def supported(algorithm: str) -> bool:
    """Whether an algorithm name (``MD5``, ``SHA-256``, their ``-sess``) is supported."""
    return algorithm.upper().removesuffix("-SESS") in _HASHES


def digest_response(*, algorithm: str, username: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, qop: str | None = None, nc: str = "", cnonce: str = "", body: bytes = b"") -> str:
    """The ``response`` value of RFC 2617 §3.2.2.1 / RFC 7616 §3.4.1."""
    ha1 = _hash(algorithm, f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = _hash(algorithm, f"{ha1}:{nonce}:{cnonce}")
    if qop == "auth-int":
        ha2 = _hash(algorithm, f"{method}:{uri}:{_hash(algorithm, body.decode('latin-1'))}")
    else:
        ha2 = _hash(algorithm, f"{method}:{uri}")
    if qop:
        return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed Digest challenge."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False

    @classmethod
    def parse(cls, value: str) -> Challenge | None:
        """A Digest challenge header value; ``None`` for another scheme or an
        unsupported algorithm."""
        try:
            ch = AuthChallenge.parse(value)
        except ValueError:
            return None
        if ch.scheme.lower() != "digest" or "nonce" not in ch.parameters:
            return None
        p = ch.parameters
        algorithm = p.get("algorithm", "MD5")
        if not supported(algorithm):
            return None
        qop = tuple(q.strip() for q in p.get("qop", "").split(",") if q.strip())
        return cls(realm=p.get("realm", ""), nonce=p["nonce"], algorithm=algorithm, qop=qop,
                   opaque=p.get("opaque"), stale=p.get("stale", "").lower() == "true")


def best_challenge(values: list[str]) -> Challenge | None:
    """The strongest supported challenge among header values (SHA-256 before MD5)."""
    parsed = [c for c in (Challenge.parse(v) for v in values) if c is not None]
    parsed.sort(key=lambda c: 0 if c.algorithm.upper().startswith("SHA-256") else 1)
    return parsed[0] if parsed else None


def authorization(challenge: Challenge, *, username: str, password: str, method: str, uri: str,
                  nc: int = 1, body: bytes = b"", cnonce: str | None = None) -> str:
    """The ``Authorization``/``Proxy-Authorization`` value answering ``challenge``."""
    qop = "auth" if "auth" in challenge.qop else ("auth-int" if "auth-int" in challenge.qop else None)
    cnonce = cnonce or secrets.token_hex(8)
    ncs = f"{nc:08x}"
    response = digest_response(algorithm=challenge.algorithm, username=username, realm=challenge.realm,
                               password=password, method=method, uri=uri, nonce=challenge.nonce,
                               qop=qop, nc=ncs, cnonce=cnonce, body=body)
    parts = [f"username={_quote(username)}", f"realm={_quote(challenge.realm)}",
             f"nonce={_quote(challenge.nonce)}", f"uri={_quote(uri)}", f"response={_quote(response)}",
             f"algorithm={challenge.algorithm}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    if qop:
        parts += [f"qop={qop}", f"nc={ncs}", f"cnonce={_quote(cnonce)}"]
    return "Digest " + ", ".join(parts)


class Verdict(enum.Enum):
    """The outcome of :meth:`DigestServer.verify`."""

    OK = "ok"
    MISSING = "missing"     # no credentials for our realm: challenge
    STALE = "stale"         # right password, expired nonce: challenge with stale=true
    INVALID = "invalid"     # wrong password, unknown user or forged nonce: 403


class DigestServer:
    """Challenges and verifies requests for ``realm`` against ``users`` (name ->
    password). Nonces carry their issue time and an HMAC, so no state is kept; they
    expire after ``nonce_ttl`` seconds."""

    def __init__(self, realm: str, users: Mapping[str, str], *, algorithm: str = "MD5",
                 nonce_ttl: float = 300.0) -> None:
        if not supported(algorithm):
            raise ValueError(f"unsupported digest algorithm {algorithm}")
        self.realm = realm
        self._users = dict(users)
        self.algorithm = algorithm
        self.nonce_ttl = nonce_ttl
        self._key = secrets.token_bytes(32)
        self._opaque = secrets.token_hex(8)

    def _sign(self, stamp: str) -> str:
        return hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:32]

    def nonce(self, now: float | None = None) -> str:
        """A fresh nonce."""
        stamp = f"{int((now if now is not None else time.time()) * 1000):x}"
        return f"{stamp}.{self._sign(stamp)}"

    def challenge(self, *, stale: bool = False) -> str:
        """A ``WWW-Authenticate`` value."""
        value = (f'Digest realm={_quote(self.realm)}, nonce={_quote(self.nonce())}, '
                 f'opaque={_quote(self._opaque)}, algorithm={self.algorithm}, qop="auth"')
        return value + (", stale=true" if stale else "")

    def _nonce_state(self, nonce: str) -> str:
        stamp, _, sig = nonce.partition(".")
        if not sig or not hmac.compare_digest(sig, self._sign(stamp)):
            return "forged"
        try:
            issued = int(stamp, 16) / 1000
        except ValueError:
            return "forged"
        return "fresh" if time.time() - issued <= self.nonce_ttl else "stale"

    def verify(self, method: str, value: str | None, body: bytes = b"") -> tuple[Verdict, str | None]:
        """Check an ``Authorization`` value; the verdict and the user name."""
        if not value:
            return Verdict.MISSING, None
        try:
            cred = AuthCredentials.parse(value)
        except ValueError:
            return Verdict.INVALID, None
        p = cred.parameters
        if cred.scheme.lower() != "digest" or p is None or p.get("realm") != self.realm:
            return Verdict.MISSING, None
        user = p.get("username", "")
        nonce, uri, response = p.get("nonce", ""), p.get("uri", ""), p.get("response", "")
        algorithm = p.get("algorithm", "MD5")
        state = self._nonce_state(nonce)
        if state == "forged":
            return Verdict.MISSING, user
        password = self._users.get(user)
        if password is None or algorithm.upper() != self.algorithm.upper():
            return Verdict.INVALID, user
        qop = p.get("qop")
        expected = digest_response(algorithm=algorithm, username=user, realm=self.realm, password=password,
                                   method=method, uri=uri, nonce=nonce, qop=qop, nc=p.get("nc", ""),
                                   cnonce=p.get("cnonce", ""), body=body)
        if not hmac.compare_digest(expected, response):
            return Verdict.INVALID, user
        if state == "stale":
            return Verdict.STALE, user
        return Verdict.OK, user
