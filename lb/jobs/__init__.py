"""Batch runs inside the balancer: OpenAI Files and Batches, durable in --data-dir, dispatched as bulk.

    POST /v1/files ──▶ files.py (streamed to data_dir/files) ──▶ store.py (SQLite rows)
    POST /v1/batches ──▶ batches.py: validating ─(validate.py, in a thread)─▶ in_progress | failed
    dispatcher.py: round robin over running batches, one admission grant (bulk class) per line
        ──▶ sender.py (admission → policy → upstream, retries on another worker) ──▶ results.py (append)
    in_progress ──▶ finalizing ──▶ completed;  cancel ──▶ cancelling ──▶ cancelled;  window ──▶ expired

A restart on the same --data-dir resumes every unfinished batch from its output and error files: a line with
a result there is never sent again, so each custom_id appears exactly once.
"""
