"""A voice bot for wacall, in ~30 lines: it speaks Twilio Media Streams over a WebSocket
and sends the caller's audio straight back (an echo), so you hear yourself.

    python examples/echo_bot.py --port 8765
    # then: POST /v1/calls {"to": "+49…", "bot": {"protocol": "twilio", "url": "ws://127.0.0.1:8765/"}}
"""

import argparse
import json

from aiohttp import WSMsgType, web


async def media_stream(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    stream_sid = None
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        event = json.loads(message.data)
        if event["event"] == "start":  # who is calling: event["start"]["customParameters"]
            stream_sid = event["start"]["streamSid"]
        elif event["event"] == "media" and stream_sid:  # 20 ms of μ-law 8 kHz, base64: send it back
            await ws.send_json({"event": "media", "streamSid": stream_sid,
                                "media": {"payload": event["media"]["payload"]}})
        elif event["event"] == "stop":
            break
    return ws


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/", media_stream)
    web.run_app(app, host=args.host, port=args.port, print=lambda *_: print(f"echo bot on ws://{args.host}:{args.port}/", flush=True))
