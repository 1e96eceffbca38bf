"""POST /generate, the seed model server's native API (HF `generate` vocabulary), streamed or not.

Body: {prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample,
num_return_sequences, stream} (+ stop, seed, ignore_eos, model). Answer: {prompt, generated_text,
generation_time (s), tokens_generated, finish_reason}; with num_return_sequences > 1, generated_text and
finish_reason are lists. Streaming sends `{"index", "text"}` events, then the full answer, then [DONE].
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from workers.errors import APIError, as_api_error
from workers.generation import Generation
from workers.protocol import parse_json_body, parse_request
from workers.sse import SSEStream
from workers.state import STATE


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    info = state.engine.info
    gen = parse_request("generate", parse_json_body(await request.read()), info.model, info.max_model_len,
                        diffusion=info.engine == "dllm")
    assert gen.prompt is not None
    async with Generation(state, gen, gen.prompt, "gen") as run:
        if not gen.stream:
            async for _ in run.events():
                pass
            return web.json_response(_answer(run))
        sse = SSEStream(request)
        await sse.start()
        try:
            async for choice, event in run.events():
                if event.text and not await sse.send({"index": choice.index, "text": event.text}):
                    return sse.response
        except APIError as exc:
            await sse.send(exc.body())
        except Exception as exc:  # the stream already started: report in-band
            await sse.send(as_api_error(exc).body())
        else:
            await sse.send(_answer(run))
        await sse.done()
        return sse.response


def _answer(run: Generation) -> dict[str, Any]:
    texts = [c.text for c in run.choices]
    reasons = [c.finish_reason for c in run.choices]
    single = len(texts) == 1
    return {
        "prompt": run.request.prompt,
        "generated_text": texts[0] if single else texts,
        "generation_time": round(run.elapsed, 6),
        "tokens_generated": run.completion_tokens,
        "finish_reason": reasons[0] if single else reasons,
    }
