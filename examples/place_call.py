"""Place a call through a running `wacall serve` and wait for it to end, over Server-Sent
Events: the smallest client of the control API.

    WACALL_API_TOKEN=… python examples/place_call.py +4915112345678 --url http://127.0.0.1:8080
"""

import argparse
import asyncio
import json
import os

import aiohttp


async def main(to: str, url: str, play: list[str]) -> dict:
    headers = {"Authorization": f"Bearer {os.environ['WACALL_API_TOKEN']}"}
    async with aiohttp.ClientSession(base_url=url, headers=headers) as http:
        async with http.get("/v1/events") as events:  # listen first: no event is missed
            async with http.post("/v1/calls", json={"to": to, "play": play}) as resp:
                call = await resp.json()
                if resp.status != 201:
                    raise SystemExit(f"refused ({resp.status}): {call['error']['message']}")
            print(f"call {call['id']}: {call['state']}", flush=True)
            async for line in events.content:  # text/event-stream: "data: {json}" lines
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event["call_id"] == call["id"]:
                        print(f"call {call['id']}: {event['type']}", flush=True)
                        if event["type"] == "call.ended":
                            return event["data"]["call"]
    raise SystemExit("the event stream ended")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("to", help="the user's number, E.164")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--play", action="append", default=[], help="a file in WACALL_MEDIA_DIR (repeatable)")
    args = parser.parse_args()
    ended = asyncio.run(main(args.to, args.url, args.play))
    print(json.dumps({k: ended[k] for k in ("id", "state", "end_reason", "connected_seconds")}))
