"""A stub worker that answers with known texts, for scoring tests through the real balancer (a fixture only).

`python -m tests.answer_stub --port N [--delay S] [--model NAME]` serves /health, /v1/models and
/v1/chat/completions under the model name NAME (default `answer-stub`). The reply depends on the last user
message:
- `A + B` (two integers): a worked solution ending in the sum, except when the sum is a multiple of 3, where
  it states the sum plus one (a wrong answer on purpose), so a test knows which samples are right;
- `code: ...`: an explanation and one fenced python block (CODE below);
- anything else: `echo: <message>`.
`GET /received` lists the user messages of every completed request, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

from aiohttp import web

MODEL = "answer-stub"
CODE = "def add(a, b):\n    return a + b"
_SUM = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*$")


def is_right(a: int, b: int) -> bool:
    """Whether the stub answers `a + b` correctly."""
    return (a + b) % 3 != 0


def reply(message: str) -> str:
    match = _SUM.match(message)
    if match:
        a, b = int(match.group(1)), int(match.group(2))
        stated = a + b if is_right(a, b) else a + b + 1
        return f"We add {a} and {b}. The total is {stated}.\nThe answer is \\boxed{{{stated}}}."
    if message.startswith("code:"):
        return f"Add the two numbers.\n```python\n{CODE}\n```\nThat is all."
    return f"echo: {message}"


def make_app(delay: float, model: str) -> web.Application:
    received: list[str] = []

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": model})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        message = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        await asyncio.sleep(delay)
        text = reply(message)
        received.append(message)
        return web.json_response(
            {
                "id": f"chatcmpl-{len(received)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len(message.split()),
                    "completion_tokens": len(text.split()),
                    "total_tokens": len(message.split()) + len(text.split()),
                },
            }
        )

    async def get_received(request: web.Request) -> web.Response:
        return web.json_response(received)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/received", get_received)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--model", default=MODEL, help="the served model name")
    args = parser.parse_args()
    web.run_app(
        make_app(args.delay, args.model), host="127.0.0.1", port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
