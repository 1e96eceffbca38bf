"""`python -m lb.jobs submit|status|cancel|download`: run a batch on a balancer and follow it.

    python -m lb.jobs submit prompts.jsonl --url http://127.0.0.1:8000 --wait  # upload, create, follow, get
    python -m lb.jobs status BATCH_ID --url ...        # one line of progress (or --json for the whole object)
    python -m lb.jobs cancel BATCH_ID --url ...
    python -m lb.jobs download BATCH_ID --url ... --output-dir results/

It speaks only the OpenAI Files and Batches API, through the OpenAI SDK, so it works against any
compatible server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

FINISHED = ("completed", "failed", "expired", "cancelled")


def client_for(args: argparse.Namespace) -> openai.OpenAI:
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
    return openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=key, max_retries=3, timeout=120)


def endpoint_of(path: Path) -> str:
    """The `url` of the file's first request line (every line of a batch has the same one)."""
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    return "/v1/chat/completions"


def submit(args: argparse.Namespace) -> int:
    client = client_for(args)
    path = Path(args.file)
    with open(path, "rb") as data:
        uploaded = client.files.create(file=(path.name, data), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=args.endpoint or endpoint_of(path),  # type: ignore[arg-type]
        completion_window=args.completion_window,  # type: ignore[arg-type]
        metadata=dict(item.split("=", 1) for item in args.metadata) or None,
    )
    print(
        f"batch {batch.id} created from {path} ({uploaded.bytes} bytes, file {uploaded.id})", file=sys.stderr
    )
    if not args.wait:
        print(batch.id)
        return 0
    batch = follow(client, batch.id, args.poll_interval)
    return finish(client, batch, Path(args.output_dir))


def follow(client: openai.OpenAI, batch_id: str, interval: float) -> Any:
    """A progress bar (completed / failed / output tokens per second / ETA) until the batch finishes."""
    bar = tqdm(desc=batch_id, unit="req", dynamic_ncols=True)
    last_tokens, last_time = 0, time.monotonic()
    try:
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            if counts is not None:
                bar.total = counts.total or None
                bar.n = counts.completed + counts.failed
            tokens = batch.usage.output_tokens if batch.usage is not None else 0
            now = time.monotonic()
            rate = (tokens - last_tokens) / max(now - last_time, 1e-9)
            last_tokens, last_time = tokens, now
            bar.set_postfix(status=batch.status, failed=counts.failed if counts else 0, tok_s=f"{rate:.0f}")
            bar.refresh()
            if batch.status in FINISHED:
                return batch
            time.sleep(interval)
    finally:
        bar.close()


def finish(client: openai.OpenAI, batch: Any, output_dir: Path) -> int:
    counts = batch.request_counts
    print(
        f"batch {batch.id} {batch.status}: {counts.completed if counts else 0} completed, "
        f"{counts.failed if counts else 0} failed",
        file=sys.stderr,
    )
    if batch.errors and batch.errors.data:
        for error in batch.errors.data[:10]:
            print(f"  line {error.line}: {error.code}: {error.message}", file=sys.stderr)
    for path in download_files(client, batch, output_dir):
        print(path)
    return 0 if batch.status == "completed" else 1


def download_files(client: openai.OpenAI, batch: Any, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if file_id:
            target = output_dir / f"{batch.id}_{kind}.jsonl"
            target.write_bytes(client.files.content(file_id).read())
            written.append(target)
    return written


def status(args: argparse.Namespace) -> int:
    batch = client_for(args).batches.retrieve(args.batch_id)
    if args.json:
        print(batch.model_dump_json(indent=2))
    else:
        counts = batch.request_counts
        print(
            f"{batch.id} {batch.status} {counts.completed if counts else 0}/{counts.total if counts else 0} "
            f"completed, {counts.failed if counts else 0} failed"
        )
    return 0


def cancel(args: argparse.Namespace) -> int:
    batch = client_for(args).batches.cancel(args.batch_id)
    print(f"{batch.id} {batch.status}")
    return 0


def download(args: argparse.Namespace) -> int:
    client = client_for(args)
    batch = client.batches.retrieve(args.batch_id)
    if batch.status not in FINISHED:
        print(
            f"batch {batch.id} is {batch.status}: its files are published when it finishes", file=sys.stderr
        )
        return 1
    for path in download_files(client, batch, Path(args.output_dir)):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m lb.jobs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--url", required=True, help="the balancer's base URL, e.g. http://127.0.0.1:8000")
        sub.add_argument("--api-key", help="client key (default: $OPENAI_API_KEY)")
        return sub

    sub = command("submit", "upload a JSONL file of requests and create a batch from it")
    sub.add_argument("file", help="one {custom_id, method, url, body} request per line")
    sub.add_argument("--endpoint", help="default: the url of the file's first line")
    sub.add_argument("--completion-window", default="24h", help="unsent lines expire after it (default: 24h)")
    sub.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    sub.add_argument(
        "--wait", action="store_true", help="follow it with a progress bar and download the results"
    )
    sub.add_argument("--poll-interval", type=float, default=1.0, help="seconds between progress reads")
    sub.add_argument("--output-dir", default=".", help="where --wait writes BATCH_output/errors.jsonl")
    sub.set_defaults(run=submit)
    sub = command("status", "one line of a batch's progress")
    sub.add_argument("batch_id")
    sub.add_argument("--json", action="store_true", help="print the whole batch object")
    sub.set_defaults(run=status)
    sub = command("cancel", "stop dispatching a batch; lines in flight finish, completed ones are kept")
    sub.add_argument("batch_id")
    sub.set_defaults(run=cancel)
    sub = command("download", "write a finished batch's output and error files")
    sub.add_argument("batch_id")
    sub.add_argument("--output-dir", default=".")
    sub.set_defaults(run=download)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except openai.APIStatusError as exc:
        print(f"python -m lb.jobs: {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"python -m lb.jobs: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
