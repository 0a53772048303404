"""The OpenAI-compatible HTTP API that `qora serve` runs (starlette on uvicorn; the `server` extra).

Routes: GET / (the chat page, `static/`), GET /health, GET /metrics (Prometheus text, `metrics`), GET
/v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions (streamed as
server-sent events ending with `data: [DONE]`, or one JSON answer with `usage`). Structured output
(`response_format`, `grammar`) is qora/structured.py's; tool calls are qora/tools.py's.

The path of a request: `security` (Guard: Host, Origin, declared body size; then the API key, the body read
within its limit and decoded as strict JSON) → `models` (the typed request, validated field by field, and
its GenerationOptions) → `jobs` (a Job submitted to the Scheduler: `qora serve` runs `batch`'s
BatchScheduler, up to N sequences decoded together in one batched engine step, each in its own KV slot;
`create_app`'s default is the one-at-a-time Worker) → `answers` (the job's Responses as one JSON object or
as server-sent events). `app` assembles the routes and the error answers. The event loop only parses,
validates, queues and streams back, so it never waits on the engine. KV reuse carries over between
requests (the batch scheduler's prefix cache over its slots): a client that resends a growing conversation
pays for its new turn only. A client that goes away marks its job cancelled; the scheduler drops it before
the next step.

Thinking comes back as `reasoning_content`, apart from `content`. `max_tokens` caps the answer; thinking
has its own budget (think_budget, default from RAM), as in the CLI. Sampling values a request leaves out
take qora's defaults, not OpenAI's.
"""
