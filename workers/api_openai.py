"""POST /v1/completions and /v1/chat/completions in OpenAI's wire format, streamed (SSE) or not."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from workers.errors import APIError, as_api_error
from workers.generation import Choice, Generation
from workers.protocol import Endpoint, GenerationRequest, parse_json_body, parse_request
from workers.sse import SSEStream
from workers.state import STATE, WorkerState


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    info = state.engine.info
    gen = parse_request(endpoint, parse_json_body(await request.read()), info.model, info.max_model_len,
                        diffusion=info.engine == "dllm")
    if gen.messages is not None:
        prompt = await state.batcher.render_chat(gen.messages)
    else:
        assert gen.prompt is not None
        prompt = gen.prompt
    shape = _ChatShape(info.model) if endpoint == "chat" else _CompletionShape(info.model)
    async with Generation(state, gen, prompt, shape.id_prefix) as run:  # 429 / 400 raised here
        if gen.stream:
            return await _stream(request, state, gen, run, shape)
        async for _ in run.events():
            pass
        return web.json_response(shape.response(run))


async def _stream(
    request: web.Request, state: WorkerState, gen: GenerationRequest, run: Generation, shape: _Shape
) -> web.StreamResponse:
    sse = SSEStream(request)
    await sse.start()
    for chunk in shape.opening_chunks(run):
        await sse.send(chunk)
    try:
        async for choice, event in run.events():
            if (event.text or event.finished) and not await sse.send(shape.chunk(run, choice, event.text)):
                return sse.response  # the client left: leaving `run` cancels the rest
    except APIError as exc:
        await sse.send(exc.body())
    except Exception as exc:  # the stream already started: report in-band
        await sse.send(as_api_error(exc).body())
    else:
        if gen.include_usage:
            await sse.send({**shape.envelope(run, chunk=True), "choices": [], "usage": run.usage()})
    await sse.done()
    return sse.response


class _Shape:
    """How one endpoint spells responses and stream chunks."""

    id_prefix = ""
    object = ""
    chunk_object = ""

    def __init__(self, model: str) -> None:
        self.model = model

    def envelope(self, run: Generation, *, chunk: bool) -> dict[str, Any]:
        return {"id": run.id, "object": self.chunk_object if chunk else self.object, "created": run.created,
                "model": self.model}

    def opening_chunks(self, run: Generation) -> list[dict[str, Any]]:
        return []

    def chunk(self, run: Generation, choice: Choice, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, run: Generation) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def chunk(self, run: Generation, choice: Choice, text: str) -> dict[str, Any]:
        finish = choice.finish_reason
        return {**self.envelope(run, chunk=True), "choices": [
            {"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish}]}

    def response(self, run: Generation) -> dict[str, Any]:
        return {**self.envelope(run, chunk=False), "choices": [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for c in run.choices], "usage": run.usage()}


class _ChatShape(_Shape):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening_chunks(self, run: Generation) -> list[dict[str, Any]]:
        """OpenAI opens each choice's stream with the role and empty content."""
        return [{**self.envelope(run, chunk=True), "choices": [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for c in run.choices]

    def chunk(self, run: Generation, choice: Choice, text: str) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {**self.envelope(run, chunk=True), "choices": [
            {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason}]}

    def response(self, run: Generation) -> dict[str, Any]:
        return {**self.envelope(run, chunk=False), "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason} for c in run.choices], "usage": run.usage()}
