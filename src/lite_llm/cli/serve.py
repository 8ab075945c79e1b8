"""`lite-llm serve`: an OpenAI-compatible HTTP server for a checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, device_option, err_console, friendly_errors
from .store_options import cache_policy_option, checkpoint_location, dtype_option, hot_budget_option, load_for_inference, prefetch_option, warm_budget_option


@app.command()
@friendly_errors
def serve(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (with --hot-budget also a URL: file://, https://, s3://)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="Port to listen on.", min=0, max=65535),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id /v1/models reports (default: the checkpoint's folder name)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together (continuous batching); 1 serves one at a time.", min=1),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a place in the batch; more are answered 429.", min=0),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dtype: Optional[str] = dtype_option(),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
    cache_policy: Optional[str] = cache_policy_option(),
    prefetch: bool = prefetch_option(),
    max_body_size: str = typer.Option(
        "4MiB", "--max-body-size", help="The largest request body taken (e.g. 4MiB, 16MB); a larger one is answered 413 unread."
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: critical, error, warning, info, debug."),
) -> None:
    """Serve CHECKPOINT over HTTP with the OpenAI API (completions, chat completions, streaming).

    Requests may choose their tiers with a `tier_set` field ("all", "upto:tier_1b",
    "only:tier_10b", or a list), or give `latency_budget_ms` / `memory_budget` to have one
    chosen from the checkpoint's TierSet profile.  SIGTERM or Ctrl-C finishes the requests in
    flight, then exits; a second one ends them at once (a 503, or an error event and [DONE] in a stream).

    Examples:

      lite-llm serve runs/quickstart/run/checkpoints/step-00000300 --port 8000

      lite-llm serve big --hot-budget 512MB --warm-budget 2GB --max-batch 4

      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def ", "max_tokens": 40, "temperature": 0}'
    """
    try:
        import uvicorn
    except ImportError:
        raise LiteLLMError("serving needs fastapi and uvicorn; install them with pip install 'lite-llm[serve]'") from None
    from ..runtime.device import resolve_device
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from ..store.sizes import parse_bytes

    body_limit = parse_bytes(max_body_size, "--max-body-size")
    if body_limit < 1024:
        raise LiteLLMError(f"--max-body-size must be at least 1kB (a request body this small holds no useful request), got {max_body_size}")
    location = checkpoint_location(checkpoint)
    apply_threads(threads, header_to_stderr=True)
    loaded = load_for_inference(
        location, tiers="all", device=resolve_device(device), hot_budget=hot_budget, warm_budget=warm_budget, policy=cache_policy, prefetch=prefetch,
        dtype=dtype,
    )
    if loaded.tokenizer is None:
        raise LiteLLMError(f"checkpoint {checkpoint} has no tokenizer/ folder; re-save it with its tokenizer")
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue)
    local = location if isinstance(location, Path) else None  # a URL has no TierSet profile to read
    name = model_name or (local.resolve().name if local is not None else checkpoint.rstrip("/").rsplit("/", 1)[-1])
    api = create_app(engine, model_name=name, checkpoint=local, store=loaded.store, max_body_bytes=body_limit)
    err_console.print(f"serving {name} on http://{host}:{port}/v1 (max batch {max_batch}, queue {max_queue})", highlight=False)
    # uvicorn turns SIGTERM into a graceful shutdown (stop accepting, finish the responses in
    # flight, then the lifespan drains the engine) and afterwards re-raises the signal to the
    # handler that was there before; a no-op one makes a drained shutdown exit 0, as a service
    # manager expects of a clean stop.
    signal.signal(signal.SIGTERM, lambda *_: None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # The second Ctrl-C (the one uvicorn calls "force quit") would leave the requests in
            # flight to be torn down with the event loop: a 500 and a traceback for each.  Instead
            # the engine ends them at the next token boundary (a stream gets an error event and
            # [DONE], a whole response a 503), their connections close, and the drain finishes
            # at once; a third Ctrl-C is still uvicorn's force quit.
            if sig == signal.SIGINT and self.should_exit and not engine.aborted:
                engine.abort()
                return
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(api, host=host, port=port, log_level=log_level, lifespan="on")).run()
