"""Data-generation jobs: prompts (or self-instruct seed tasks) become batch lines, replies JSONL shards.

`POST /data_gen/jobs {model_id, name, strategy: "prompts" | "self_instruct", config: {num_examples, ...}}`.
- `prompts`: `config.prompts` (a list) or `config.dataset_ref` (a JSONL of prompt / messages lines); the
  prompts are used in turn until `num_examples` lines are made (default: one per prompt); with a temperature
  above 0 each line carries its own seed (the request's `seed` + its index), so repeats differ and a rerun
  gives the same data.
- `self_instruct`: two phases (lb/jobs/self_instruct.py): write `num_examples` new instructions from
  `config.seed_tasks`, then answer each of them; records `{id, instruction, input, output, model}`.
Shards are `shard-00000.jsonl`, ... of `config.shard_size` records each, in example order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lb.jobs import datasets, self_instruct
from lb.jobs.job_store import INPUTS, Job, JobSpec
from lb.jobs.records import index_of, read_jsonl, reply_of, write_jsonl
from lb.jobs.request_fields import GENERATION_FIELDS, Fields, Generation, InvalidField, MissingField

ENDPOINT = "/v1/chat/completions"
STRATEGIES = ("prompts", "self_instruct")
FIELDS = frozenset({"model_id", "name", "strategy", "config"})
CONFIG_FIELDS = {
    "prompts": frozenset({"num_examples", "prompts", "dataset_ref", "shard_size"}) | GENERATION_FIELDS,
    "self_instruct": frozenset({"num_examples", "seed_tasks", "num_demos", "shard_size"}) | GENERATION_FIELDS,
}
MAX_TOKENS = 256
TEMPERATURE = 0.8


def parse(body: dict[str, Any], datasets_dir: Path, max_examples: int) -> JobSpec:
    fields = Fields(body, FIELDS)
    model_id = fields.required_string("model_id")
    strategy = fields.required_string("strategy")
    if strategy not in STRATEGIES:
        raise InvalidField(
            f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}", param="strategy"
        )
    config = Fields(fields.mapping("config"), CONFIG_FIELDS[strategy], prefix="config.")
    generation = Generation.read(config, MAX_TOKENS, TEMPERATURE)
    shard_size = config.integer("shard_size", 1000, 1)
    if strategy == "prompts":
        inputs = _prompts(config, datasets_dir, max_examples)
        num_examples = config.integer("num_examples", len(inputs), 1, max_examples)
        extra: dict[str, Any] = {}
    else:
        seed_tasks = config.strings("seed_tasks", list(self_instruct.DEFAULT_SEED_TASKS)) or []
        inputs = [{"prompt": task} for task in seed_tasks]
        num_examples = config.integer("num_examples", None, 1, max_examples)
        if num_examples is None:
            raise MissingField(
                "config.num_examples is required for self_instruct", param="config.num_examples"
            )
        extra = {"num_demos": config.integer("num_demos", 3, 1, 20)}
    request = {
        "model_id": model_id,
        "name": fields.string("name") or f"{strategy} x{num_examples}",
        "strategy": strategy,
        "num_examples": num_examples,
        "shard_size": shard_size,
        "generation": generation.as_dict(),
        "lines_per_phase": num_examples,
        **extra,
    }
    return JobSpec(request, inputs)


def _prompts(config: Fields, datasets_dir: Path, max_lines: int) -> list[dict[str, Any]]:
    prompts = config.strings("prompts", None)
    ref = config.string("dataset_ref")
    if (prompts is None) == (ref is None):
        raise MissingField(
            "config needs exactly one of 'prompts' (a list) and 'dataset_ref'", param="config.prompts"
        )
    if prompts is not None:
        return [{"prompt": p} for p in prompts]
    path = datasets.resolve(datasets_dir, ref, param="config.dataset_ref")
    samples = datasets.read(path, need_answer=False, max_lines=max_lines, param="config.dataset_ref")
    return [{k: v for k, v in s.as_record().items() if k != "index"} for s in samples]


class DataGenKind:
    """The data-generation job's pre- and post-processing, for the job runner."""

    type = "data_gen"

    def phases(self, job: Job) -> int:
        return 2 if job.request["strategy"] == "self_instruct" else 1

    def lines(
        self, job: Job, job_dir: Path, phase: int, earlier: list[list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        generation = Generation(**job.request["generation"])
        inputs = list(read_jsonl(job_dir / INPUTS))
        if job.request["strategy"] == "prompts":
            chats = (
                (i, _messages(inputs[i % len(inputs)], generation))
                for i in range(job.request["num_examples"])
            )
        elif phase == 0:
            tasks = [r["prompt"] for r in inputs]
            chats = (
                (
                    i,
                    [
                        {
                            "role": "user",
                            "content": self_instruct.instruction_prompt(
                                tasks, job.request["num_demos"], job.id, i
                            ),
                        }
                    ],
                )
                for i in range(job.request["num_examples"])
            )
        else:
            chats = ((i, _messages({"prompt": text}, generation)) for i, text in _instructions(earlier[0]))
        return [
            {
                "custom_id": f"{job.id}-{phase}-{i}",
                "method": "POST",
                "url": ENDPOINT,
                "body": generation.body(job.model_id, messages, _seed(generation, i)),
            }
            for i, messages in chats
        ]

    def finish(self, job: Job, job_dir: Path, results: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Write the examples that came back, in index order, as shards; failed lines are only counted."""
        requested = job.request["num_examples"]
        if job.request["strategy"] == "prompts":
            inputs = list(read_jsonl(job_dir / INPUTS))
            records = {}
            for result in results[0]:
                i, reply = index_of(result["custom_id"]), reply_of(result)
                if reply.text is not None:
                    records[i] = {
                        "id": i,
                        **inputs[i % len(inputs)],
                        "response": reply.text,
                        "finish_reason": reply.finish_reason,
                        "model": job.model_id,
                    }
        else:
            instructions = dict(_instructions(results[0]))
            records = {}
            for result in results[1] if len(results) > 1 else []:
                i, reply = index_of(result["custom_id"]), reply_of(result)
                if reply.text is not None:
                    records[i] = {
                        "id": i,
                        "instruction": instructions[i],
                        "input": "",
                        "output": reply.text,
                        "model": job.model_id,
                    }
        ordered = [records[i] for i in sorted(records)]
        size = job.request["shard_size"]
        shards = []
        for number, start in enumerate(range(0, len(ordered), size)):
            name = f"shard-{number:05d}.jsonl"
            shards.append(
                {"file": name, "examples": write_jsonl(job_dir / name, ordered[start : start + size])}
            )
        return {
            "num_examples": len(ordered),
            "requested": requested,
            "failed": requested - len(ordered),
            "strategy": job.request["strategy"],
            "shards": shards,
        }


def _messages(record: dict[str, Any], generation: Generation) -> list[dict[str, str]]:
    sample = datasets.Sample(0, record.get("prompt"), record.get("messages"), None)
    return sample.chat_messages(generation.system_prompt)


def _seed(generation: Generation, index: int) -> int | None:
    return (generation.seed or 0) + index if generation.temperature > 0 else None


def _instructions(results: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(index, instruction) for every phase-one line that came back with one, in index order."""
    found = []
    for result in results:
        reply = reply_of(result)
        instruction = self_instruct.instruction_of(reply.text) if reply.text else None
        if instruction:
            found.append((index_of(result["custom_id"]), instruction))
    return sorted(found)
