"""`lite-llm generate`: text from a checkpoint."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, device_option, friendly_errors, option_flag
from .store_options import (
    cache_policy_option, checkpoint_location, dtype_option, hot_budget_option, load_for_inference, prefetch_option, print_store_stats, stats_option, warm_budget_option,
)


# ------------------------------------------------------------------------------------ generate
@app.command()
@friendly_errors
def generate(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (with --hot-budget also a URL: file://, https://, s3://)."),
    prompt: str = typer.Option("", help="Text to continue (with --chat: the user's message); empty starts a new document from the beginning-of-sequence token."),
    max_new_tokens: int = typer.Option(200, help="Tokens to generate (at least 1).", min=1),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely tokens.", min=1),
    top_p: Optional[float] = typer.Option(None, help="Keep the smallest set of tokens with this much probability."),
    seed: int = typer.Option(0, help="Sampling seed.", min=0),
    tiers: str = typer.Option("all", help="TierSet: all, tier_1b, upto:tier_1b, only:tier_10b."),
    chat: bool = typer.Option(False, "--chat", help="Wrap PROMPT in the model's chat template as one user turn and print only the reply."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop before this text (repeatable)."),
    repetition_penalty: float = typer.Option(1.0, help="Divide (multiply, when negative) the logits of tokens already seen by this; 1 is off."),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dtype: Optional[str] = dtype_option(),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
    cache_policy: Optional[str] = cache_policy_option(),
    prefetch: bool = prefetch_option(),
    stats: bool = stats_option(),
) -> None:
    """Stream a continuation of PROMPT to the terminal.

    Generation ends at any end-of-sequence token the model lists (a chat model's <|im_end|>
    included), at a --stop string, or after --max-new-tokens.

    Examples:

      lite-llm generate ckpt --prompt 'def main(' --max-new-tokens 120 --temperature 0

      lite-llm generate ckpt --prompt 'The' --tiers upto:tier_1b --top-p 0.9 --seed 3

      lite-llm generate ckpt --chat --prompt 'What is the capital of France?' --temperature 0

      lite-llm generate ckpt --prompt 'def ' --device cpu

      lite-llm generate big --prompt 'def ' --hot-budget 512MB --warm-budget 2GB --stats
    """
    from ..data.tokenizer import render_chat
    from ..generate import check_prompt, check_sampling, generate_text, prompt_start
    from ..runtime.device import resolve_device

    location = checkpoint_location(checkpoint)
    run_device = resolve_device(device)

    check_sampling(  # before the load: a mistyped flag is refused at once
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        spell=option_flag,
    )
    apply_threads(threads, header_to_stderr=True)
    loaded = load_for_inference(location, tiers=tiers, device=run_device, hot_budget=hot_budget, warm_budget=warm_budget, policy=cache_policy, prefetch=prefetch, stats=stats, dtype=dtype)
    if loaded.tokenizer is None:
        raise LiteLLMError(f"checkpoint {checkpoint} has no tokenizer/ folder; re-save it with its tokenizer")
    if chat:
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise LiteLLMError(f"checkpoint {checkpoint} has no chat template in its tokenizer; generate without --chat, or import the model again from a file that has one")
        prompt_ids = loaded.tokenizer.encode(render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}]))
    else:
        prompt_ids = prompt_start(loaded.tokenizer, prompt)
    check_prompt(prompt_ids, loaded.model.config.max_seq_len)  # before anything is printed
    if not chat:
        sys.stdout.write(prompt)
    for piece in generate_text(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_new_tokens,
        prompt_ids=prompt_ids,
        stop=stop or (),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        tierset=tiers,
        repetition_penalty=repetition_penalty,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats and loaded.store is not None:
        print_store_stats(loaded)
