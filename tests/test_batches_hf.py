"""A batch on a real model: the tiny Llama on a transformers (hf) worker, through the OpenAI SDK."""

from __future__ import annotations

from pathlib import Path

from tests.batch_support import CHAT, Cluster, jsonl, records, submit, wait_batch


def test_batch_on_the_tiny_hf_model_returns_generated_text_for_every_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    cluster = Cluster(
        tmp_path, workers=1, engine=("--engine", "hf", "--model-path", str(tiny_model_dir), "--device", "cpu")
    )
    try:
        client = cluster.client()
        model = client.models.list().data[0].id
        lines = [
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": CHAT,
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"count to {i}"}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            }
            for i in range(6)
        ]
        batch = wait_batch(client, submit(client, jsonl(lines)), timeout=120)
        assert batch.status == "completed" and batch.request_counts.completed == 6
        out = {r["custom_id"]: r["response"]["body"] for r in records(client, batch.output_file_id)}
        assert set(out) == {f"q{i}" for i in range(6)}
        for body in out.values():
            assert body["model"] == model and body["usage"]["completion_tokens"] >= 1
            assert isinstance(body["choices"][0]["message"]["content"], str)
        assert batch.usage.output_tokens == sum(b["usage"]["completion_tokens"] for b in out.values())
    finally:
        cluster.stop()
