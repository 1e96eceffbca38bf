"""Request bodies in, validated `GenerationRequest`s out: each field's type, range and support is checked.

Parameters the engines honour: max_tokens / max_completion_tokens, temperature, top_p, top_k,
repetition_penalty, stop (string or list), seed, n, ignore_eos, stream, stream_options.include_usage.
Accepted because clients (the OpenAI SDK, `vllm bench serve`) send them harmlessly: `model`, `user`, and
these only at their neutral value: frequency_penalty 0, presence_penalty 0, logprobs null/false,
top_logprobs null/0, echo false, best_of null/1, logit_bias null/{}, suffix null, tools null/[],
tool_choice null/"none", response_format null/{"type": "text"}, parallel_tool_calls, store null/false,
metadata null. With the dllm engine also its own fields (workers/diffusion_fields.py). Anything else is
refused with a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from workers.diffusion_fields import DIFFUSION_KEYS, parse_diffusion
from workers.engines.base import DiffusionParams, SamplingParams
from workers.errors import InvalidRequest, ModelNotFound, UnsupportedParameter
from workers.fields import Fields

Endpoint = Literal["completions", "chat", "generate"]
MAX_N = 64  # samples per request; each is one engine request
MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context

_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "ignore_eos"}
_OPENAI_KEYS = _SAMPLING_KEYS | {"model", "user", "n", "stream", "stream_options", "max_tokens"}
_NEUTRAL: dict[str, tuple[Any, ...]] = {  # key -> the values that change nothing
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (None, False),
    "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}),
    "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None,),
}
_ANY_VALUE = {"parallel_tool_calls"}
ALLOWED_KEYS: dict[Endpoint, set[str]] = {
    "completions": _OPENAI_KEYS | {"prompt", "max_completion_tokens"},
    "chat": _OPENAI_KEYS | {"messages", "max_completion_tokens"},
    "generate": _SAMPLING_KEYS | {"model", "prompt", "max_new_tokens", "do_sample", "num_return_sequences",
                                  "stream"},
}
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation request. `max_tokens` None = up to the end of the context."""

    endpoint: Endpoint
    prompt: str | None  # completions / generate
    messages: list[dict[str, str]] | None  # chat, content flattened to text
    params: SamplingParams  # max_new_tokens is a placeholder (1) when max_tokens is None
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool

    @property
    def prompt_field(self) -> str:
        return "messages" if self.endpoint == "chat" else "prompt"


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def parse_request(
    endpoint: Endpoint, body: dict[str, Any], model: str, max_model_len: int, *, diffusion: bool = False,
) -> GenerationRequest:
    """Validate `body` for `endpoint` against the served `model` name and the context length.

    `diffusion`: the worker runs the dllm engine, so its extra fields (diffusion_fields.py) are allowed.
    """
    _check_keys(endpoint, body, DIFFUSION_KEYS if diffusion else frozenset())
    fields = Fields(body)
    overrides = parse_diffusion(fields) if diffusion else DiffusionParams()
    requested_model = fields.string("model", None)
    if requested_model is not None and requested_model != model:
        raise ModelNotFound(f"the model {requested_model!r} does not exist; this worker serves {model!r}",
                            param="model")
    fields.string("user", None)
    if endpoint == "generate":
        return _parse_generate(fields, max_model_len, overrides)
    prompt = _parse_prompt(body) if endpoint == "completions" else None
    messages = _parse_messages(body) if endpoint == "chat" else None
    max_tokens = fields.integer("max_completion_tokens", None, minimum=1)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", None, minimum=1)
    else:
        fields.integer("max_tokens", None, minimum=1)
    if overrides.gen_length is not None:  # the diffusion engine's name for the generated length
        max_tokens = overrides.gen_length
    if max_tokens is None and endpoint == "completions":
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    _check_max_tokens(max_tokens, max_model_len, "gen_length" if overrides.gen_length else "max_tokens")
    stream = fields.boolean("stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    stream_options = stream_options or {}
    unknown = sorted(set(stream_options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise UnsupportedParameter(f"unsupported stream_options: {', '.join(unknown)}",
                                   param="stream_options")
    if stream_options.get("continuous_usage_stats"):
        raise UnsupportedParameter("stream_options.continuous_usage_stats is not supported",
                                   param="stream_options")
    include_usage = Fields(stream_options, "stream_options.").boolean("include_usage", False)
    return GenerationRequest(
        endpoint=endpoint, prompt=prompt, messages=messages,
        params=_sampling(fields, max_tokens or 1, greedy=False, diffusion=overrides),
        max_tokens=max_tokens, n=fields.integer("n", 1, minimum=1, maximum=MAX_N),
        stream=stream, include_usage=include_usage,
    )


def _parse_generate(fields: Fields, max_model_len: int, overrides: DiffusionParams) -> GenerationRequest:
    """The native endpoint: HF `generate` semantics, so sampling happens only with do_sample true."""
    prompt = _parse_prompt(fields.body)
    max_tokens = fields.integer("max_new_tokens", SamplingParams.max_new_tokens, minimum=1)
    if overrides.gen_length is not None:
        max_tokens = overrides.gen_length
    _check_max_tokens(max_tokens, max_model_len, "gen_length" if overrides.gen_length else "max_new_tokens")
    do_sample = fields.boolean("do_sample", False)
    return GenerationRequest(
        endpoint="generate", prompt=prompt, messages=None,
        params=_sampling(fields, max_tokens, greedy=not do_sample, diffusion=overrides),
        max_tokens=max_tokens,
        n=fields.integer("num_return_sequences", 1, minimum=1, maximum=MAX_N),
        stream=fields.boolean("stream", False), include_usage=False,
    )


def _sampling(
    fields: Fields, max_new_tokens: int, *, greedy: bool, diffusion: DiffusionParams,
) -> SamplingParams:
    top_k = fields.integer("top_k", 0, minimum=-1)
    temperature = fields.number("temperature", SamplingParams.temperature, minimum=0.0)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=fields.number("top_p", 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True),
        top_k=max(top_k, 0),  # vLLM spells "off" as -1
        repetition_penalty=fields.number("repetition_penalty", 1.0, minimum=0.0, exclusive_minimum=True),
        stop=_parse_stop(fields.body.get("stop")),
        seed=fields.integer("seed", None),
        ignore_eos=fields.boolean("ignore_eos", False),
        diffusion=diffusion,
    )


def _check_keys(endpoint: Endpoint, body: dict[str, Any], extra: frozenset[str]) -> None:
    allowed = ALLOWED_KEYS[endpoint] | extra
    openai = endpoint != "generate"
    for key, value in body.items():
        if key in allowed or (openai and key in _ANY_VALUE):
            continue
        if openai and key in _NEUTRAL:
            if _is_neutral(value, _NEUTRAL[key]):
                continue
            raise UnsupportedParameter(f"{key}={json.dumps(value)} is not supported by this worker; "
                                       "only its neutral value is accepted", param=key)
        raise UnsupportedParameter(f"unsupported parameter: {key}", param=key)


def _is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    for neutral in neutrals:
        if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
            if value is neutral:  # None, True and False only match themselves (False is not 0)
                return True
        elif value == neutral:
            return True
    return False


def _check_max_tokens(max_tokens: int | None, max_model_len: int, param: str) -> None:
    if max_tokens is not None and max_tokens >= max_model_len:
        raise InvalidRequest(f"{param}={max_tokens} leaves no room for the prompt in this model's context of "
                             f"{max_model_len} tokens", param=param, code="context_length_exceeded")


def _parse_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("prompt is required", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif all(isinstance(p, str) for p in prompt):
            raise UnsupportedParameter("prompt as a list must hold exactly one string (send one request per "
                                       "prompt)", param="prompt")
        else:
            raise UnsupportedParameter("prompt as token ids is not supported; send text", param="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", param="prompt")
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    return prompt


def _parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of message objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}",
                                 param=f"{where}.role")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise UnsupportedParameter(f"{where}: unsupported field(s) {', '.join(extra)}", param=where)
        out.append({"role": role, "content": _message_text(message.get("content"), f"{where}.content")})
    return out


def _message_text(content: Any, where: str) -> str:
    """Content as a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise UnsupportedParameter(f"{where}[{j}]: only text parts are supported, got {kind!r}",
                                       param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop may hold at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(s for s in items if s)
