"""Eval jobs: a dataset's samples become chat-completion batch lines; the replies are scored against answers.

`POST /eval/jobs {model_id, name, dataset_ref, metrics, max_samples, per_example_logging, max_tokens,
temperature, top_p, seed, system_prompt}`. The samples are copied into the job's directory when the job is
created (`inputs.jsonl`), so a dataset edited while the job runs cannot skew its scoring. When the batch
ends, each reply is scored under every metric (lb/jobs/answers.py); `samples.jsonl` holds one line per sample
and the result `{accuracy, total_samples, correct, failed, metrics}` counts the first metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lb.jobs import datasets
from lb.jobs.answers import METRICS, extract_math_answer, score
from lb.jobs.job_store import INPUTS, Job, JobSpec
from lb.jobs.records import index_of, read_jsonl, reply_of, write_jsonl
from lb.jobs.request_fields import GENERATION_FIELDS, Fields, Generation, InvalidField

ENDPOINT = "/v1/chat/completions"
SAMPLES = "samples.jsonl"
FIELDS = frozenset({"model_id", "name", "dataset_ref", "metrics", "max_samples", "per_example_logging"})
DEFAULT_SYSTEM = None  # the dataset's own prompt decides the answer format
MAX_TOKENS = 256


def parse(body: dict[str, Any], datasets_dir: Path, max_lines: int) -> JobSpec:
    """Check every field and every dataset line; raises a 400/404 naming the field (or line) at fault."""
    fields = Fields(body, FIELDS | GENERATION_FIELDS)
    model_id = fields.required_string("model_id")
    ref = fields.required_string("dataset_ref")
    metrics = fields.strings("metrics", ["accuracy"]) or ["accuracy"]
    for metric in metrics:
        if metric not in METRICS:
            raise InvalidField(
                f"metrics: unknown metric {metric!r}; one of {', '.join(METRICS)}", param="metrics"
            )
    max_samples = fields.integer("max_samples", None, 1)
    logging = fields.boolean("per_example_logging", True)
    generation = Generation.read(fields, MAX_TOKENS, 0.0, DEFAULT_SYSTEM)
    path = datasets.resolve(datasets_dir, ref)
    samples = datasets.read(path, need_answer=True, limit=max_samples, max_lines=max_lines)
    request = {
        "model_id": model_id,
        "name": fields.string("name") or f"eval {ref}",
        "dataset_ref": ref,
        "metrics": list(dict.fromkeys(metrics)),
        "max_samples": max_samples,
        "per_example_logging": logging,
        "generation": generation.as_dict(),
        "lines_per_phase": len(samples),
    }
    return JobSpec(request, [s.as_record() for s in samples])


class EvalKind:
    """The eval job's pre- and post-processing, for the job runner."""

    type = "eval"

    def phases(self, job: Job) -> int:
        return 1

    def lines(
        self, job: Job, job_dir: Path, phase: int, earlier: list[list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        generation = Generation(**job.request["generation"])
        lines = []
        for record in read_jsonl(job_dir / INPUTS):
            sample = _sample(record)
            body = generation.body(job.model_id, sample.chat_messages(generation.system_prompt))
            lines.append(
                {"custom_id": f"{job.id}-0-{sample.index}", "method": "POST", "url": ENDPOINT, "body": body}
            )
        return lines

    def finish(self, job: Job, job_dir: Path, results: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Score every sample that came back; samples without a reply count as failed (and not correct)."""
        metrics: list[str] = job.request["metrics"]
        replies = {index_of(r["custom_id"]): reply_of(r) for r in results[0]}
        totals = dict.fromkeys(metrics, 0)
        total = failed = 0
        rows = []
        for record in read_jsonl(job_dir / INPUTS):
            index = record["index"]
            if index not in replies:
                continue  # never ran: the batch was cancelled or expired before this line
            reply = replies[index]
            total += 1
            failed += reply.text is None
            scores = {m: reply.text is not None and score(m, reply.text, record["answer"]) for m in metrics}
            for metric, ok in scores.items():
                totals[metric] += ok
            rows.append(
                {
                    **record,
                    "response": reply.text,
                    "extracted": extract_math_answer(reply.text or ""),
                    "correct": scores[metrics[0]],
                    "scores": scores,
                    "finish_reason": reply.finish_reason,
                    "error": reply.error,
                }
            )
        logged = job.request["per_example_logging"]
        if logged:
            write_jsonl(job_dir / SAMPLES, rows)
        correct = totals[metrics[0]]
        return {
            "accuracy": correct / total if total else 0.0,
            "total_samples": total,
            "correct": correct,
            "failed": failed,
            "metric": metrics[0],
            "metrics": {m: (totals[m] / total if total else 0.0) for m in metrics},
            "samples_file": SAMPLES if logged else None,
        }


def _sample(record: dict[str, Any]) -> datasets.Sample:
    return datasets.Sample(
        record["index"], record.get("prompt"), record.get("messages"), record.get("answer")
    )
