"""`POST /solve/math` and `POST /solve/coding`: one chat completion on any worker, its answer extracted.

    /solve/math   {problem, model?, max_tokens?, temperature?, top_p?, seed?, system_prompt?}
                  -> {problem, solution, answer, generation_time, model, usage}
    /solve/coding {problem, language?, ...as above}
                  -> {problem, solution, code, generation_time, model, usage}

The request goes through the balancer's admission and policy like any interactive request (bulk with
`X-LB-Priority: bulk`); the answer is read by lb/jobs/answers.py, as eval jobs read theirs. A worker's error
(4xx, or a 5xx after the retries) comes back with its status and body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from lb.admission import is_bulk
from lb.errors import answers_errors
from lb.jobs.answers import extract_code, extract_math_answer
from lb.jobs.auth import owner_of
from lb.jobs.request_fields import GENERATION_FIELDS, Fields, Generation, json_object
from lb.state import STATE

MATH_SYSTEM = "Solve the math problem step by step. End with the final answer in the form \\boxed{ANSWER}."
CODING_SYSTEM = (
    "Solve the programming problem in {language}. Explain briefly, then give the complete solution in one "
    "fenced code block (```{language} ... ```)."
)
MAX_TOKENS = 1024
CHAT = "/v1/chat/completions"


async def _solve(
    request: web.Request,
    extra: frozenset[str],
    system: Callable[[Fields], str],
    extract: tuple[str, Callable[[str], str | None]],
) -> web.Response:
    owner_of(request)  # the API key, as for /v1 paths
    fields = Fields(await json_object(request), frozenset({"problem", "model"}) | GENERATION_FIELDS | extra)
    problem = fields.required_string("problem")
    model = fields.string("model")
    generation = Generation.read(fields, MAX_TOKENS, 0.0, system(fields))
    messages = [
        {"role": "system", "content": generation.system_prompt or ""},
        {"role": "user", "content": problem},
    ]
    started = time.perf_counter()
    status, body = await request.app[STATE].batches.send_one(
        CHAT, generation.body(model, messages), bulk=is_bulk(request.raw_headers)
    )
    elapsed = time.perf_counter() - started
    if status != 200:
        return web.json_response(body, status=status)
    solution = _content(body)
    key, extractor = extract
    return web.json_response(
        {
            "problem": problem,
            "solution": solution,
            key: extractor(solution),
            "generation_time": round(elapsed, 4),
            "model": body.get("model"),
            "usage": body.get("usage"),
        }
    )


def _content(body: dict[str, Any]) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


async def solve_math(request: web.Request) -> web.Response:
    return await _solve(request, frozenset(), lambda _f: MATH_SYSTEM, ("answer", extract_math_answer))


async def solve_coding(request: web.Request) -> web.Response:
    def system(fields: Fields) -> str:
        return CODING_SYSTEM.format(language=fields.string("language", "python"))

    return await _solve(request, frozenset({"language"}), system, ("code", extract_code))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/solve/math", answers_errors(solve_math))
    app.router.add_post("/solve/coding", answers_errors(solve_coding))
