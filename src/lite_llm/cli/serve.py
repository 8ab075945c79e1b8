"""`lite-llm serve`: the OpenAI-compatible HTTP server on a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, console, device_option, friendly_errors
from .store_options import cache_policy_option, hot_budget_option, load_for_inference, warm_budget_option


@app.command()
@friendly_errors
def serve(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on.", min=1, max=65535),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; more are answered 429 with Retry-After.", min=1),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id /v1/models reports (default: the folder's name)."),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
    cache_policy: str = cache_policy_option(),
) -> None:
    """Serve CHECKPOINT over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions
    (streamed with "stream": true), /v1/models, /health, /metrics.  Lite LLM's own fields go in
    the body beside OpenAI's: "tier_set", or "latency_budget_ms" / "memory_budget" (after
    `lite-llm tiers profile`).  Ctrl-C or SIGTERM finishes the requests in flight, then exits.

    Examples:

      lite-llm serve runs/quickstart/checkpoints/step-00000300 --port 8000

      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'
    """
    try:
        import uvicorn
    except ImportError:
        raise LiteLLMError("serving needs fastapi and uvicorn; install them with `pip install 'lite-llm[serve]'`") from None
    from ..runtime.device import resolve_device
    from ..serve.app import build_app

    run_device = resolve_device(device)
    apply_threads(threads)
    loaded = load_for_inference(checkpoint, tiers="all", device=run_device, hot_budget=hot_budget, warm_budget=warm_budget, policy=cache_policy)
    if loaded.tokenizer is None:
        raise LiteLLMError(f"checkpoint {checkpoint} has no tokenizer/ folder; re-save it with its tokenizer")
    name = model_name or checkpoint.resolve().name
    server = build_app(loaded.model, loaded.tokenizer, checkpoint=checkpoint, model_name=name, max_queue=max_queue, store=loaded.store)
    console.print(f"serving {checkpoint} as {name!r} at http://{host}:{port}/v1 (requests one at a time, queue of {max_queue})")
    uvicorn.run(server, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
