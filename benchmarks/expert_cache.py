"""Expert cache policies on the routes of a trained two-tier model, against Belady's optimum,
and how well layer l's hidden state predicts layer l+1's experts (pre-gating).

    python benchmarks/expert_cache.py [--checkpoint CKPT --data DATA] [--steps 150] [--tokens 4096]

Without ``--checkpoint`` a model is trained here first: the quickstart's width and depth with
two tiers of 2 groups x 16 experts (64 experts per layer, 256 in all), 2 active per token per
layer, ``--steps`` steps on the quickstart's data (prepared from capped corpora).

Routes: the model reads ``--tokens`` held-out tokens of each domain (code, then prose) in
windows of ``--seq-len``; the accesses are replayed in decode order — token by token, layer by
layer, each token's experts of a layer in id order — as a store serving one token at a time
would see them.  Each policy (``lru``, ours ``layer-cycle``, and Belady's offline optimum) runs
at capacities of 5, 10, 25 and 50% of all experts, counted in experts (all are the same size
here).  Hit rate = hits / accesses; the figure is ours / Belady.  Target: >= 0.9x at 10%.

Fresh requests: every ``--seq-len`` tokens a new request starts on an empty cache; its first
``--prompt-tokens`` are prefilled (each expert the prompt uses fetched once per layer) and the
rest decoded.  The store tells its policy how many prompt rows used each expert (the prompt's
routes are known before decoding starts); the table compares that with counting each once.

How much of the future Belady's figure rests on: a policy that knows the routes of the token
being decoded, and of the next 1, 2, 4, 8 tokens, evicts by Belady's rule inside that horizon
and by our estimate beyond it.  Knowing only the current token is the most any pre-gating
guess could give a decoder, which sees no later token before it has decoded it.

Prefetch: layer l+1's router applied to the residual stream leaving layer l (before layer
l+1's attention) predicts l+1's experts.  Predicting the same number of experts as are used
gives precision = recall; predicting ``--prefetch-extra`` more per token raises recall at the
cost of precision and of wasted bytes (predicted, not used).  Target: recall >= 90%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table, setup_torch_threads  # noqa: E402

import torch  # noqa: E402

CAPACITIES = (0.05, 0.10, 0.25, 0.50)
LOOKAHEAD = (0, 1, 2, 4, 8)  # tokens beyond the one being decoded whose routes an oracle policy knows
TARGET_VS_BELADY_AT_10 = 0.9
TARGET_RECALL = 0.9


def cache_model_config():
    from lite_llm.config import ModelConfig, RoutingConfig, TierConfig

    base = ModelConfig.from_preset("quickstart")
    return base.replace(
        name="cache-bench",
        tiers=[
            TierConfig("tier_1b", num_groups=2, experts_per_group=16, expert_hidden=64, budget="20M").__dict__,
            TierConfig("tier_10b", num_groups=2, experts_per_group=16, expert_hidden=64, budget="20M", placement="cold").__dict__,
        ],
        routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2).__dict__,
    )


def train_model(work: Path, steps: int, corpus_bytes: int):
    from lite_llm.data import TokenData, prepare_data
    from lite_llm.model import build_model
    from lite_llm.quickstart import QUICKSTART_SOURCES, QUICKSTART_TRAIN, QUICKSTART_VAL_FRACTION, train_quickstart_tokenizer
    from lite_llm.train import TrainConfig, Trainer

    config = cache_model_config()
    data_dir = work / "data"
    tok = train_quickstart_tokenizer(config.vocab_size, max_bytes_per_domain=corpus_bytes)
    prepare_data(QUICKSTART_SOURCES, data_dir, tok, val_fraction=QUICKSTART_VAL_FRACTION, max_bytes_per_domain=corpus_bytes)
    data = TokenData(data_dir)
    model = build_model(config, seed=0)
    cfg = TrainConfig(**{**QUICKSTART_TRAIN, "steps": steps, "eval_every": 0, "warmup_steps": min(20, steps // 5)})
    started = time.perf_counter()
    result = Trainer(model, data, cfg, show_progress=False).train()
    print(f"trained {config.name} for {steps} steps in {time.perf_counter() - started:.0f} s; final eval {result.final_eval}", flush=True)
    return model.eval(), data


@torch.no_grad()
def record(model, data, tokens: int, seq_len: int):
    """Per domain: the experts each token used in each MoE layer (one list per token, layer
    by layer), and the pre-gating predictions of each layer from the previous layer's output."""
    from lite_llm.model import TieredMoE

    moe_layers = [b.layer for b in model.layers if isinstance(b.ffn, TieredMoE)]
    k_used = None
    traces, predictions = {}, {}
    for domain in data.domains:
        accesses: list[list[tuple[int, str, int]]] = []  # per token, its experts in layer order
        pred_hits = {extra: [0, 0, 0] for extra in [0, *ARGS.prefetch_extra]}  # extra -> [predicted & used, predicted, used]
        windows = data.val_batches(domain, batch_size=1, seq_len=seq_len, max_batches=max(tokens // seq_len, 1))
        for batch in windows:
            per_layer, pre = _forward_with_pregating(model, batch, moe_layers)
            n = batch.numel()
            for t in range(n):
                token: list[tuple[int, str, int]] = []
                for layer in moe_layers:
                    ids = sorted(int(e) for e in per_layer[layer][t] if e >= 0)
                    token.extend(_key(model, layer, e) for e in ids)
                accesses.append(token)
            for layer in moe_layers[1:]:
                used = per_layer[layer]
                k_used = used.shape[1]
                for extra in pred_hits:
                    guess = pre[layer].topk(k_used + extra, dim=-1).indices
                    hit = (guess[:, :, None] == used[:, None, :]).any(-1).sum()
                    pred_hits[extra][0] += int(hit)
                    pred_hits[extra][1] += guess.numel()
                    pred_hits[extra][2] += int((used >= 0).sum())
        traces[domain] = accesses
        predictions[domain] = pred_hits
    return traces, predictions, moe_layers


def _key(model, layer: int, flat: int) -> tuple[int, str, int]:
    offsets = model.layers[layer].ffn.tier_offsets
    names = model.layers[layer].ffn.tier_names
    tier = max(i for i in range(len(names)) if offsets[i] <= flat)
    return layer, names[tier], flat - offsets[tier]


def _forward_with_pregating(model, ids, moe_layers):
    """Run the blocks by hand: each MoE layer's routes, and the flat-expert scores the next
    MoE layer's router gives to the residual stream leaving this layer (pre-gating)."""
    from lite_llm.model.layers import rope_tables

    cfg = model.config
    positions = torch.arange(ids.shape[1])
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, positions)
    allowed = model.allowed_tiers(None)
    x = model.embed(ids)
    used, pre = {}, {}
    for block in model.layers:
        x, routes = block(x, cos, sin, allowed, None, None)
        if routes is not None:
            used[block.layer] = routes.expert_ids.view(ids.numel(), -1)
        nxt = block.layer + 1
        if nxt in moe_layers:
            nb = model.layers[nxt]
            pre[nxt] = nb.ffn.router.expert_probabilities(nb.ffn_norm(x).reshape(-1, cfg.d_model), allowed)
    return used, pre


@torch.no_grad()
def check_bitwise(model, data, work: Path) -> dict[str, bool]:
    """The trained model through the store at every capacity and policy: logits of a held-out
    window and 32 greedy tokens must be bitwise those of the model holding every expert."""
    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.generate import generate_ids
    from lite_llm.store import load_with_store

    path = work / "trained"
    save_checkpoint(path, model)
    window = next(data.val_batches(data.domains[0], batch_size=2, seq_len=ARGS.seq_len))
    want_logits = model(window).logits
    prompt = window[0, :32].tolist()
    want_text = list(generate_ids(model, prompt, 32))
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    out = {}
    for share in CAPACITIES:
        for policy in ("lru", "layer-cycle"):
            stored = load_with_store(path, hot_budget=int(share * expert_bytes), warm_budget=int(share * expert_bytes), policy=policy)
            same = torch.equal(stored.model(window).logits, want_logits) and list(generate_ids(stored.model, prompt, 32)) == want_text
            out[f"{policy}@{int(share * 100)}%"] = same
    print(f"bitwise logits and greedy text vs all resident, {len(out)} budget/policy pairs: {'all equal' if all(out.values()) else out}", flush=True)
    return out


def replay_cache(capacity: int, policy):
    """The store's own cache level (``lite_llm.store.cache.CacheLevel``), counting experts:
    every entry is one "byte", so the budget is ``capacity`` experts."""
    from lite_llm.store.cache import CacheLevel

    return CacheLevel("replay", capacity, policy)


def access(level, key, uses: int = 1) -> bool:
    """Look ``key`` up as the store does (touching the policy with ``uses``); a miss brings it
    in, evicting by the policy.  True on a hit."""
    if level.get(key, uses) is not None:
        return True
    level.put(key, (), 1)
    return False


def replay(accesses, capacity: int, policy_name: str, n_layers: int) -> int:
    """Hits of ``policy_name`` holding ``capacity`` experts over ``accesses``."""
    from lite_llm.store.policies import belady_hits, make_policy

    if policy_name == "belady":
        return belady_hits(accesses, capacity)
    cache = replay_cache(capacity, make_policy(policy_name, n_layers))
    return sum(access(cache, key) for key in accesses)


def replay_requests(tokens, capacity: int, policy_name: str, n_layers: int, *, prompt: int, window: int, weighted: bool) -> tuple[int, int]:
    """Each ``window`` tokens a fresh request (empty cache, new policy): its first ``prompt``
    tokens are prefilled — layer by layer, each expert the prompt uses fetched once, touched
    with ``uses`` = its rows when ``weighted`` (what the store does) or 1 — and the rest are
    decoded token by token.  Returns (hits, accesses) of the decoded tokens."""
    from collections import Counter

    from lite_llm.store.policies import make_policy

    hits = total = 0
    for start in range(0, len(tokens), window):
        request = tokens[start : start + window]
        cache = replay_cache(capacity, make_policy(policy_name, n_layers))
        rows = Counter(key for token in request[:prompt] for key in token)
        for key in sorted(rows):  # layer by layer (keys sort by layer first)
            access(cache, key, rows[key] if weighted else 1)
        for token in request[prompt:]:
            for key in token:
                hits += access(cache, key)
                total += 1
    return hits, total


def lookahead_hits(tokens, capacity: int, n_layers: int, ahead: int) -> int:
    """Hits of a policy that knows the routes of the token being decoded and of the next
    ``ahead`` tokens: among cached experts, one not needed within that horizon goes first
    (the least valuable by our policy's estimate), else the one needed last (Belady's rule
    inside the horizon).  ``ahead=0`` is perfect pre-gating of every layer of the current
    token — the most any guess from the current token's hidden states could give; Belady is
    ``ahead`` = the whole trace.  Shows how much of the future Belady's figure rests on."""
    from lite_llm.store.policies import LayerCycle

    accesses = [key for token in tokens for key in token]
    token_of = [t for t, token in enumerate(tokens) for _ in token]
    horizon_end = [0] * (len(tokens) + ahead + 1)
    position = 0
    for t, token in enumerate(tokens):
        position += len(token)
        horizon_end[t] = position
    for t in range(len(tokens), len(horizon_end)):
        horizon_end[t] = position
    next_use = [len(accesses)] * len(accesses)
    last: dict = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last.get(accesses[i], len(accesses))
        last[accesses[i]] = i
    policy, cached, upcoming, hits = LayerCycle(n_layers), set(), {}, 0
    for i, key in enumerate(accesses):
        policy.touch(key)
        upcoming[key] = next_use[i]
        if key in cached:
            hits += 1
            continue
        if len(cached) >= capacity:
            end = horizon_end[token_of[i] + ahead]
            victim = min(cached, key=lambda k: ((1, -upcoming[k]) if upcoming[k] < end else (0, policy.value(k)), k))
            cached.discard(victim)
        cached.add(key)
    return hits


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a trained tiered checkpoint (default: train one here)")
    p.add_argument("--data", type=Path, help="its prepared data folder (with --checkpoint)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (and per request in the fresh-request replay)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prefilled tokens of each request in the fresh-request replay")
    p.add_argument("--prefetch-extra", type=int, nargs="+", default=[2, 4, 8], help="experts predicted beyond those used, per token")
    p.add_argument("--threads", type=int, default=None)
    ARGS = p.parse_args()
    setup_torch_threads(ARGS.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if ARGS.checkpoint:
            from lite_llm.checkpoint import load_checkpoint
            from lite_llm.data import TokenData

            model, data = load_checkpoint(ARGS.checkpoint).model.eval(), TokenData(ARGS.data)
        else:
            model, data = train_model(Path(tmp), ARGS.steps, ARGS.corpus_bytes)
        traces, predictions, moe_layers = record(model, data, ARGS.tokens, ARGS.seq_len)
        bitwise = check_bitwise(model, data, Path(tmp))

    total_experts = sum(t.num_experts for t in model.config.tiers) * len(moe_layers)
    rows, figures = [], {}
    for domain, tokens in traces.items():
        accesses = [key for token in tokens for key in token]
        for share in CAPACITIES:
            capacity = max(int(round(share * total_experts)), 1)
            rates = {name: replay(accesses, capacity, name, model.config.n_layers) / len(accesses) for name in ("lru", "layer-cycle", "belady")}
            figures[f"{domain}@{int(share * 100)}%"] = {**rates, "ours_vs_belady": rates["layer-cycle"] / rates["belady"] if rates["belady"] else None,
                                                          "lru_vs_belady": rates["lru"] / rates["belady"] if rates["belady"] else None}
            rows.append([domain, f"{share:.0%} ({capacity})", rates["lru"], rates["layer-cycle"], rates["belady"],
                         figures[f"{domain}@{int(share * 100)}%"]["ours_vs_belady"]])
    print_table(["domain", "capacity", "lru", "layer-cycle", "belady", "ours/belady"], rows,
                title=f"hit rates, {total_experts} experts, {sum(len(k) for t in traces.values() for k in t)} accesses")

    n_layers = model.config.n_layers
    requests, rrows = {}, []
    for domain, tokens in traces.items():
        for share in CAPACITIES:
            capacity = max(int(round(share * total_experts)), 1)
            rates = {}
            for name, policy, weighted in (("lru", "lru", False), ("ours, prompt seen once", "layer-cycle", False), ("ours, prompt's counts", "layer-cycle", True)):
                hits, total = replay_requests(tokens, capacity, policy, n_layers, prompt=ARGS.prompt_tokens, window=ARGS.seq_len, weighted=weighted)
                rates[name] = hits / max(total, 1)
            requests[f"{domain}@{int(share * 100)}%"] = rates
            rrows.append([domain, f"{share:.0%} ({capacity})", *rates.values()])
    print_table(["domain", "capacity", "lru", "ours, prompt seen once", "ours, prompt's counts (the store)"], rrows,
                title=f"fresh requests of {ARGS.seq_len} tokens: {ARGS.prompt_tokens} prefilled, the rest decoded (hit rate of the decoded)")

    lookahead, lrows = {}, []
    for domain, tokens in traces.items():
        capacity = max(int(round(0.10 * total_experts)), 1)
        belady = figures[f"{domain}@10%"]["belady"] * sum(len(t) for t in tokens)
        ratios = {ahead: lookahead_hits(tokens, capacity, n_layers, ahead) / belady for ahead in LOOKAHEAD}
        lookahead[domain] = ratios
        lrows.append([domain, figures[f"{domain}@10%"]["ours_vs_belady"], *ratios.values()])
    print_table(["domain", "ours", *(f"knows {a} more token{'s' if a != 1 else ''}" if a else "knows this token" for a in LOOKAHEAD)], lrows,
                title="hit rate / Belady at 10%, for a policy that knows the routes of the token being decoded and of the next few")

    prefetch = {}
    prow = []
    for domain, hits in predictions.items():
        for extra, (both, guessed, used) in hits.items():
            recall, precision = both / max(used, 1), both / max(guessed, 1)
            prefetch[f"{domain}/k+{extra}"] = {"recall": recall, "precision": precision, "wasted_per_used": (guessed - both) / max(used, 1)}
            prow.append([domain, f"k + {extra}", recall, precision, (guessed - both) / max(used, 1)])
    print_table(["domain", "predicted per token", "recall", "precision", "wasted experts per used"], prow, title="pre-gating one layer ahead")

    at10 = [v["ours_vs_belady"] for k, v in figures.items() if k.endswith("@10%")]
    best_recall = {extra: min(v["recall"] for k, v in prefetch.items() if k.endswith(f"/k+{extra}")) for extra in [0, *ARGS.prefetch_extra]}
    reaching = [extra for extra, r in best_recall.items() if r >= TARGET_RECALL]
    print(f"target ours/belady >= {TARGET_VS_BELADY_AT_10} at 10%: {'met' if min(at10) >= TARGET_VS_BELADY_AT_10 else 'NOT met'} ({min(at10):.3f} worst domain)")
    print(f"target prefetch recall >= {TARGET_RECALL}: " + (f"met from k + {reaching[0]} (worst domain {best_recall[reaching[0]]:.3f})" if reaching
          else f"NOT met (best {max(best_recall.values()):.3f})"))
    emit_json({"benchmark": "expert_cache", "cpu": cpu_description(), "experts": total_experts, "hit_rates": figures, "prefetch": prefetch,
               "ours_vs_belady_at_10": min(at10), "fresh_requests": requests, "lookahead_vs_belady_at_10": lookahead, "prefetch_worst_recall_by_extra": best_recall, "bitwise_vs_resident": bitwise})


if __name__ == "__main__":
    main()
