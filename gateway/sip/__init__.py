"""A focused SIP user agent on asyncio (RFC 3261 with RFC 3581 rport, RFC 4028 session
timers, Digest auth): dial a SIP URI and take INVITEs, for the ``SipLeg``.

A standalone layer: it imports nothing from ``media`` nor ``gateway`` (but
``gateway.redact``). SDP bodies are opaque bytes.
"""

from gateway.sip.auth import Challenge, DigestServer, Verdict
from gateway.sip.call import (
    Call,
    CallFailed,
    Dtmf,
    EndKind,
    EndReason,
    IncomingCall,
    OutgoingCall,
    Provisional,
)
from gateway.sip.dialog import Dialog
from gateway.sip.keepalive import Keepalive, PeerState
from gateway.sip.registration import Registration, RegistrationState
from gateway.sip.transaction import Timers
from gateway.sip.transport import Peer
from gateway.sip.ua import UserAgent, UserAgentConfig

__all__ = [
    "Call", "CallFailed", "Challenge", "Dialog", "DigestServer", "Dtmf", "EndKind", "EndReason",
    "IncomingCall", "Keepalive", "OutgoingCall", "Peer", "PeerState", "Provisional", "Registration",
    "RegistrationState", "Timers", "UserAgent", "UserAgentConfig", "Verdict",
]
