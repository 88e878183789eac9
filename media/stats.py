"""Per-call media statistics from aiortc's ``getStats()`` and the ICE agent.

One flat dict per call, the numbers an operator asks for: packets and bytes each way,
packets lost, jitter, round-trip time, and which candidate pair carried the media.
"""

from __future__ import annotations

from typing import Any

from aiortc import RTCPeerConnection

from . import aiortc_hooks

#: RTP clock rate of Opus; aiortc reports jitter in timestamp units.
_CLOCK_RATE = 48_000


def _selected_pair(pc: RTCPeerConnection) -> str | None:
    for transceiver in pc.getTransceivers():
        pair = aiortc_hooks.nominated_pair(transceiver)
        if pair is not None:
            return f"{pair.local_candidate.type}/{pair.remote_candidate.type}"
    return None


async def collect(pc: RTCPeerConnection) -> dict[str, Any]:
    out: dict[str, Any] = {
        "packets_sent": 0, "bytes_sent": 0, "packets_received": 0, "bytes_received": 0,
        "packets_lost": 0, "jitter_s": None, "round_trip_s": None, "fraction_lost": None,
        "candidate_pair": _selected_pair(pc),
    }
    if pc.connectionState == "closed":
        return out
    report = await pc.getStats()
    for stats in report.values():
        kind = stats.type
        if kind == "outbound-rtp":
            out["packets_sent"] += stats.packetsSent
            out["bytes_sent"] += stats.bytesSent
        elif kind == "inbound-rtp":
            out["packets_received"] += stats.packetsReceived
            out["packets_lost"] += max(0, stats.packetsLost)
            out["jitter_s"] = round(stats.jitter / _CLOCK_RATE, 6)
        elif kind == "transport":
            out["bytes_received"] += stats.bytesReceived
        elif kind == "remote-inbound-rtp":
            if stats.roundTripTime is not None:
                out["round_trip_s"] = round(stats.roundTripTime, 6)
            out["fraction_lost"] = stats.fractionLost
    return out
