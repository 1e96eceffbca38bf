"""inference-balancer: the asyncio reverse proxy that makes N workers one OpenAI-compatible endpoint.

The request path (proxy.py unless named)::

    client ──HTTP──▶ front.py (uvloop): owns the socket; --max-connections, head / body deadlines;
      │                              request_head.py: llhttp judges the head (400 / 431 JSON + close)
      │                              the hot POST endpoints; any other request → aiohttp (app.py routes)
      │ auth.check_client            401 without a valid --api-key (Bearer or X-API-Key)
      │ body received whole          413 over --max-body-size, 408 past --body-timeout; before any slot
      │ intake.Intake.admit          only when asked for: the policy's Work (work.py: prefix, session,
      │                              token estimate), rate limits (ratelimit.py, 429), cache hit (cache.py)
      │ model_routing.candidates     only if backends serve different models: 400 bad JSON, 404 unknown model
      │ admission.choose             policy (policies.py) over routable, not-busy backends; beyond
      │                              --max-inflight-per-worker a FIFO
      │                              queue (429 when full or timed out); 503 + Retry-After with none healthy
      │ async with pool.track(b)     in-flight (and token estimate) +1 … -1 on every exit path (backends.py)
      │   upstream.UpstreamClient ──▶ worker        http11.worker_headers (no hop-by-hop, no client key);
      │                                             keep-alive HTTP/1.1, llhttp-parsed (response.py);
      │                                             connect / reset / 429 / 502 / 503 before any byte:
      │                                             retry on a different backend (≤ --max-retries);
      │                                             429 / 503 + Retry-After: the worker is busy that long
      │   relay: one write, or SSE chunk by chunk   worker dies mid-stream: SSE error event
      ▼ X-LB-Worker, X-LB-Retries    client leaves: handler cancelled, upstream closed, worker stops

    health.HealthChecker ── GET /health every interval ──▶ workers (drop / re-add, learn models)
    admin.py: POST /workers, DELETE /workers/{index};  /stats, /health (stats.py), /metrics (metrics.py)
    discovery.py (--discover port ranges), autoscale.py (--scale-command): background tasks beside health
    jobs/: /v1/files and /v1/batches (durable in --data-dir), eval / data-generation jobs; each batch line
           goes through admission.choose in the bulk class (jobs/dispatcher.py, jobs/sender.py), as does a
           proxied request sent with `X-LB-Priority: bulk`
"""
