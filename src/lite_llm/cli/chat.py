"""`lite-llm chat`: a conversation with a checkpoint that has a chat template, turn by turn."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, device_option, err_console, friendly_errors, option_flag
from .store_options import (
    cache_policy_option, checkpoint_location, dtype_option, hot_budget_option, load_for_inference, prefetch_option, print_store_stats, stats_option, warm_budget_option,
)

COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/exit": "end (so do an empty line and Ctrl-D)",
    "Ctrl-C": "stop a reply",
}


@app.command()
@friendly_errors
def chat(
    checkpoint: str = typer.Argument(..., help="Checkpoint whose tokenizer has a chat template (an imported instruct model's has); with --hot-budget also a URL."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message that opens the conversation."),
    max_new_tokens: int = typer.Option(256, help="Tokens per reply at most.", min=1),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely tokens.", min=1),
    top_p: Optional[float] = typer.Option(None, help="Keep the smallest set of tokens with this much probability."),
    repetition_penalty: float = typer.Option(1.0, help="Divide (multiply, when negative) the logits of tokens already seen by this; 1 is off."),
    seed: int = typer.Option(0, help="Sampling seed (reply N draws with seed + N, so a conversation replays exactly).", min=0),
    tiers: str = typer.Option("all", help="TierSet: all, tier_1b, upto:tier_1b, only:tier_10b."),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dtype: Optional[str] = dtype_option(),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
    cache_policy: Optional[str] = cache_policy_option(),
    prefetch: bool = prefetch_option(),
    stats: bool = stats_option(),
) -> None:
    """Talk with CHECKPOINT: each line you type is a user turn, and the model's reply streams back.

    The whole conversation is rendered with the model's chat template before each reply, as
    transformers' apply_chat_template renders it, and the reply ends at the model's end of
    turn.

    Lines come from the terminal or from a pipe (one turn per line); /reset forgets the
    conversation, /exit or an empty line ends it. A turn that takes the conversation past the
    model's context is refused, saying how long it is: /reset and go on.

    Examples:

      lite-llm chat ckpt/smollm2 --temperature 0

      lite-llm chat ckpt/smollm2 --system 'You answer in one sentence.' --dtype bfloat16

      lite-llm chat big --hot-budget 512MB --warm-budget 2GB --stats

      printf 'Hi!\\nWhat is 2 + 2?\\n' | lite-llm chat ckpt/smollm2 --temperature 0
    """
    from ..data.tokenizer import render_chat
    from ..generate import check_sampling, generate_text
    from ..runtime.device import resolve_device

    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, spell=option_flag)
    run_device = resolve_device(device)
    apply_threads(threads, header_to_stderr=True)
    loaded = load_for_inference(
        checkpoint_location(checkpoint), tiers=tiers, device=run_device, hot_budget=hot_budget, warm_budget=warm_budget, policy=cache_policy,
        prefetch=prefetch, stats=stats, dtype=dtype,
    )
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LiteLLMError(f"checkpoint {checkpoint} has no chat template in its tokenizer; use `lite-llm generate` for plain text, or import the model again from a file that has one")
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print("[dim]" + "; ".join(f"{c}: {what}" for c, what in COMMANDS.items()) + "[/dim]", highlight=False)
    replies = 0
    while True:
        if interactive:
            err_console.print("[bold]> [/bold]", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the conversation, as an empty line does
            break
        text = line.rstrip("\r\n")
        if not line or not text.strip() or text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(opening)
            err_console.print("[dim](conversation forgotten)[/dim]", highlight=False)
            continue
        turn = [*history, {"role": "user", "content": text}]
        ids = tokenizer.encode(render_chat(tokenizer, turn))
        if len(ids) >= model.config.max_seq_len:
            err_console.print(
                f"[yellow]the conversation is {len(ids)} tokens with this turn, the model's context {model.config.max_seq_len}: /reset to start over[/yellow]",
                highlight=False,
            )
            continue
        reply = []
        try:
            for piece in generate_text(
                model, tokenizer, text, max_new_tokens, prompt_ids=ids, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, seed=seed + replies, tierset=tiers,
            ):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C in a reply stops that reply; what was shown stays in the conversation
            err_console.print("[dim] (stopped)[/dim]", end="", highlight=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = [*turn, {"role": "assistant", "content": "".join(reply)}]
        replies += 1
    if stats and loaded.store is not None:
        print_store_stats(loaded)
