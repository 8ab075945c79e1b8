"""TierSet selection: the choice never breaks a budget (checked against brute force), the DP
equals exhaustive search, the no-fit sentence names the smallest budgets, a profile survives
the checkpoint (which still verifies), and `lite-llm tiers profile` + `choose` end to end."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, read_manifest, save_checkpoint, verify_checkpoint
from lite_llm.config import RoutingConfig, TierConfig
from lite_llm.data import ByteTokenizer
from lite_llm.errors import LiteLLMError
from lite_llm.serve.selection import (
    LatencyModel, NoTierSetFits, TierCosts, TierSetProfile, TierSetTable, candidate_tiersets, choose, fit_tier_costs,
    fits, load_profile, save_profile, select, select_dp, select_exhaustive, tierset_label,
)

runner = CliRunner()
ORDER = ("tier_1b", "tier_10b", "tier_100b")


def _random_table(rng: random.Random, n_tiers: int = 3) -> TierSetTable:
    order = ORDER[:n_tiers]
    profiles = []
    for tiers in candidate_tiersets(order):
        if rng.random() < 0.2:
            continue  # tables need not hold every subset
        profiles.append(TierSetProfile(tiers, round(rng.uniform(0.5, 10), rng.choice([0, 1, 3])), rng.choice([1, 2, 5]) * 10**6 * len(tiers),
                                       round(rng.uniform(-8, -1), rng.choice([0, 2]))))
    if not profiles:
        profiles.append(TierSetProfile(order[:1], 1.0, 10**6, -5.0))
    return TierSetTable(profiles, "cpu", order)


def test_choose_is_the_brute_force_best_and_never_breaks_a_budget():
    rng = random.Random(0)
    for _ in range(500):
        table = _random_table(rng, rng.choice([1, 2, 3]))
        latency = rng.choice([None, rng.uniform(0, 11)])
        memory = rng.choice([None, rng.randint(0, 16) * 10**6])
        ok = [p for p in table.profiles if (latency is None or p.latency_ms_per_token <= latency) and (memory is None or p.memory_bytes <= memory)]
        if not ok:
            with pytest.raises(NoTierSetFits):
                choose(table, latency, memory)
            continue
        pick = choose(table, latency, memory)
        assert fits(pick, latency, memory) and pick.measured
        assert pick.utility == max(p.utility for p in ok)
        assert pick.latency_ms_per_token == min(p.latency_ms_per_token for p in ok if p.utility == pick.utility)


def _random_costs(rng: random.Random, n: int) -> TierCosts:
    # coarse values make ties common, so tie-breaking is exercised too
    return TierCosts(
        tuple(f"t{i}" for i in range(n)),
        tuple(rng.choice([0.0, 0.5, 1.0, round(rng.uniform(0, 3), 3)]) for _ in range(n)),
        tuple(rng.choice([0, 10, 50, rng.randint(0, 100)]) for _ in range(n)),
        tuple(rng.choice([0.0, 0.5, -0.25, round(rng.uniform(-1, 2), 4)]) for _ in range(n)),
        rng.uniform(0, 1), rng.randint(0, 20), rng.uniform(-5, 0),
    )


def test_dp_equals_exhaustive_search_on_random_instances():
    rng = random.Random(1)
    for trial in range(400):
        costs = _random_costs(rng, rng.randint(1, 11))
        total_lat, total_mem, _ = costs.totals(2 ** len(costs.tiers) - 1)
        latency = rng.choice([None, rng.uniform(0, total_lat + 1)])
        memory = rng.choice([None, rng.randint(0, total_mem + 10)])
        assert select_dp(costs, latency, memory) == select_exhaustive(costs, latency, memory), trial


def test_select_uses_the_dp_for_many_tiers_and_it_respects_budgets():
    rng = random.Random(2)
    costs = _random_costs(rng, 18)
    pick = select(costs, 4.0, 300)
    assert pick is not None and pick.latency_ms <= 4.0 and pick.memory_bytes <= 300
    assert pick == select_dp(costs, 4.0, 300)
    assert pick.latency_ms == costs.totals(pick.mask)[0] and pick.utility == costs.totals(pick.mask)[2]


def test_no_fit_names_the_smallest_budgets_that_would_work():
    table = TierSetTable(
        [TierSetProfile(("tier_1b",), 3.1, 12 * 10**6, -3.0), TierSetProfile(("tier_1b", "tier_10b"), 5.0, 30 * 10**6, -2.0),
         TierSetProfile(("tier_10b",), 2.5, 40 * 10**6, -2.5)],
        "cpu", ORDER[:2],
    )
    with pytest.raises(NoTierSetFits) as err:
        choose(table, 2.0, 10 * 10**6)
    assert str(err.value) == "no TierSet fits latency 2 ms/token and memory 10 MB; the nearest, upto:tier_1b, needs 3.1 ms/token and 12 MB (12000000 bytes): raise the budgets to at least that"
    with pytest.raises(NoTierSetFits, match=r"the nearest, only:tier_10b, needs 2.5 ms/token and 40 MB \(40000000 bytes\): raise"):
        choose(table, 1.0)  # latency alone: the fastest
    assert choose(table, 3.1, 12 * 10**6).tiers == ("tier_1b",)  # the named budgets do work
    assert choose(table, None, 40 * 10**6).tiers == ("tier_1b", "tier_10b")
    # the advice is rounded up and its bytes exact, so retyping it is met (1.02 MB was 1,022,808 bytes)
    odd = TierSetTable([TierSetProfile(("tier_1b",), 2.3612, 1_022_808, -3.0)], "cpu", ORDER[:1])
    with pytest.raises(NoTierSetFits, match=r"needs 2.362 ms/token and 1.02 MB \(1022808 bytes\)"):
        choose(odd, 1.0, 10**6)
    assert choose(odd, 2.362, 1_022_808).tiers == ("tier_1b",)
    for bad in ((-1.0, None), (None, -5), (math.nan, None)):
        with pytest.raises(LiteLLMError, match="budget must be"):
            choose(table, *bad)


def test_labels_and_candidates():
    assert tierset_label(("tier_1b",), ORDER) == "upto:tier_1b"
    assert tierset_label(("tier_10b",), ORDER) == "only:tier_10b"
    assert tierset_label(ORDER[:2], ORDER) == "upto:tier_10b"
    assert tierset_label(ORDER, ORDER) == "all"
    assert tierset_label(("tier_1b", "tier_100b"), ORDER) == "tier_1b,tier_100b"
    assert len(candidate_tiersets(ORDER)) == 7
    many = tuple(f"t{i}" for i in range(6))
    assert candidate_tiersets(many) == [many[: i + 1] for i in range(6)] + [(t,) for t in many[1:]]


def test_latency_model_recovers_a_linear_cost_and_fits_nonnegative():
    truth = (1.5, 0.8, 0.1)
    samples = [((1.0, mb, n), truth[0] + truth[1] * mb + truth[2] * n) for mb, n in ((1, 1), (2, 1), (3, 2), (5, 2), (4, 3))]
    model = LatencyModel.fit(samples)
    assert model.coef == pytest.approx(truth)
    assert model.mape(samples) < 1e-9
    flat = LatencyModel.fit([((1.0, mb, 1.0), 2.0 - 0.1 * mb) for mb in (1, 2, 3)])  # would fit a negative cost per MB
    assert flat.coef[1] == 0.0 and flat.coef[2] >= 0.0


def test_many_tier_tables_let_the_fitted_model_propose_unmeasured_sets():
    order = tuple(f"t{i}" for i in range(6))
    gain = dict(zip(order, (1.0, 2.1, 3.3, 4.6, 6.0, 7.5)))
    active = {t: 1e6 * (i + 1) for i, t in enumerate(order)}
    profiles = []
    for tiers in candidate_tiersets(order):  # latency = 1 ms + 1 ms per MB read (+0 per tier); utility additive
        mb = sum(active[t] for t in tiers) / 1e6
        profiles.append(TierSetProfile(tiers, 1.0 + mb, 100 + 10 * len(tiers), -10.0 + sum(gain[t] for t in tiers), active_expert_bytes=mb * 1e6))
    table = TierSetTable(profiles, "cpu", order, dense_bytes=100, tier_bytes={t: 10 for t in order}, tier_active_bytes=active)
    assert not table.all_subsets_measured
    costs = fit_tier_costs(table)
    assert costs.memory == (10,) * 6 and costs.base_memory == 100
    assert costs.latency_ms == pytest.approx([1, 2, 3, 4, 5, 6]) and costs.utility == pytest.approx(list(gain.values()))
    # within 8 ms the best measured sets score -2.5 (t5 alone); {t0, t5}, never measured, scores -1.5 at 8 ms
    pick = choose(table, latency_ms=8.01)
    assert pick.tiers == ("t0", "t5") and not pick.measured
    assert pick.latency_ms_per_token == pytest.approx(8.0) and pick.memory_bytes == 120 and pick.utility == pytest.approx(-1.5)
    assert choose(table, latency_ms=2.5).tiers == ("t0",)  # measured sets still win when they are best


# ------------------------------------------------------------------ checkpoint and the CLI
CONFIG = ModelConfig(
    name="select-test", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=256,
    tiers=[TierConfig("tier_1b", num_groups=2, experts_per_group=2, expert_hidden=32),
           TierConfig("tier_10b", num_groups=2, experts_per_group=2, expert_hidden=128)],
    routing=RoutingConfig(k_tier=2, k_group=1, k_expert=1),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("select") / "ckpt"
    save_checkpoint(path, build_model(CONFIG, seed=0), tokenizer=ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from lite_llm.data import prepare_data

    out = tmp_path_factory.mktemp("selectdata") / "std"
    prepare_data({"code": "stdlib-code", "prose": "stdlib-docs"}, out, ByteTokenizer(), max_bytes_per_domain=60_000)
    return out


def _counted(manifest: dict, tiers: tuple[str, ...]) -> int:
    """Resident bytes counted by hand: numel x 4 bytes of every fp32 tensor of the dense shard and the tiers' shards."""
    return sum(math.prod(info["shape"]) * 4 for s in manifest["shards"] if s["tier"] in ("dense", *tiers) for info in s["tensors"].values())


def test_a_profile_round_trips_through_the_checkpoint_and_it_still_verifies(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, build_model(CONFIG, seed=0), tokenizer=ByteTokenizer())
    assert load_profile(path) is None
    table = TierSetTable([TierSetProfile(("tier_1b",), 1.25, 1000, -4.5, {"code": 4.5}, (1.2, 1.3), 123.0)], "cpu", ("tier_1b", "tier_10b"),
                         domains=("code",), tokens=8, dense_bytes=900, tier_bytes={"tier_1b": 100, "tier_10b": 400}, metadata={"k": 1})
    rel = save_profile(path, table)
    assert load_profile(path) == table and verify_checkpoint(path) == []
    assert any(f["path"] == rel and f["kind"] == "extra_file" for f in read_manifest(path)["files"])
    load_checkpoint(path)  # still loads
    table.profiles.append(TierSetProfile(("tier_1b", "tier_10b"), 2.0, 1400, -4.0))
    rel2 = save_profile(path, table)  # replacing: the old file goes, the manifest lists one profile
    assert rel2 != rel and not (path / rel).exists() and load_profile(path) == table and verify_checkpoint(path) == []
    assert sum(f.get("kind") == "extra_file" for f in read_manifest(path)["files"]) == 1
    (path / rel2).write_text((path / rel2).read_text().replace("2.0", "9.0"))
    with pytest.raises(LiteLLMError, match="corrupt|bytes where"):
        load_profile(path)


def test_cli_profile_then_choose_end_to_end(checkpoint, dataset):
    result = runner.invoke(app_(), ["tiers", "profile", str(checkpoint), "--data", f"code={dataset}", "--data", f"prose={dataset}",
                                    "--tokens", "4", "--repeats", "2", "--batches", "1", "--seq-len", "32", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "upto:tier_1b" in result.stdout and "only:tier_10b" in result.stdout and "stored serve/tierset-profile." in result.stdout
    assert verify_checkpoint(checkpoint) == []
    table = load_profile(checkpoint)
    manifest = read_manifest(checkpoint)
    shown = runner.invoke(app_(), ["inspect", str(checkpoint)])  # inspect lists the profile and verifies it with the shards
    assert shown.exit_code == 0 and "extra file tierset-profile: serve/tierset-profile." in shown.stdout
    assert f"verified {len(manifest['shards'])} shard(s) and 1 extra file(s)" in shown.stdout
    by = {table.label(p.tiers): p for p in table.profiles}
    assert set(by) == {"upto:tier_1b", "only:tier_10b", "all"}
    assert by["upto:tier_1b"].memory_bytes == _counted(manifest, ("tier_1b",)) < by["all"].memory_bytes == _counted(manifest, ("tier_1b", "tier_10b"))
    assert by["only:tier_10b"].memory_bytes == _counted(manifest, ("tier_10b",))
    for p in table.profiles:
        assert p.latency_ms_per_token > 0 and len(p.latency_samples_ms) == 2 and set(p.bpb) == {"code", "prose"}
        assert p.utility == pytest.approx(-(p.bpb["code"] + p.bpb["prose"]) / 2)
        assert 7.0 < p.bpb["code"] < 9.0  # an untrained byte model: about log2(256) bits per byte
    # a token reads k_group * k_expert = 1 expert per tier per layer: 2 layers x (3 * 64 * H * 4 bytes)
    assert by["upto:tier_1b"].active_expert_bytes == pytest.approx(2 * 3 * 64 * 32 * 4)
    assert by["all"].active_expert_bytes == pytest.approx(2 * 3 * 64 * (32 + 128) * 4)

    best = max(table.profiles, key=lambda p: p.utility)
    ok = runner.invoke(app_(), ["tiers", "choose", str(checkpoint), "--memory", f"{best.memory_bytes}"])
    assert ok.exit_code == 0, ok.output
    fitting = [p for p in table.profiles if p.memory_bytes <= best.memory_bytes]
    want = max(fitting, key=lambda p: (p.utility, -p.latency_ms_per_token))
    assert ok.stdout.startswith(f"{table.label(want.tiers)}: ") and f"({want.memory_bytes} bytes)" in ok.stdout
    small = runner.invoke(app_(), ["tiers", "choose", str(checkpoint), "--memory", str(by["upto:tier_1b"].memory_bytes)])
    assert small.exit_code == 0 and small.stdout.startswith("upto:tier_1b: ")
    none = runner.invoke(app_(), ["tiers", "choose", str(checkpoint), "--memory", "10kB", "--latency-ms", "0.001"])
    assert none.exit_code == 1
    fastest = min(table.profiles, key=lambda p: max(p.latency_ms_per_token / 0.001, p.memory_bytes / 10_000))
    assert "no TierSet fits latency 0.001 ms/token and memory 10 kB; the nearest, " in none.stderr and "raise the budgets to at least that" in none.stderr
    assert f"the nearest, {table.label(fastest.tiers)}, needs" in none.stderr and none.stderr.count("\n") == 1


def app_():
    from lite_llm.cli import app

    return app


def test_bad_inputs_are_one_sentence(checkpoint, dataset, tmp_path):
    bare = tmp_path / "bare"
    save_checkpoint(bare, build_model(CONFIG, seed=1), tokenizer=ByteTokenizer())
    for args, message in (
        (["tiers", "choose", str(checkpoint), "--latency-ms", "-1"], "the latency budget must be a finite number of ms/token >= 0, got -1.0"),
        (["tiers", "choose", str(checkpoint), "--memory", "lots"], "cannot read 'lots' as a memory budget"),
        (["tiers", "choose", str(bare), "--latency-ms", "5"], "has no TierSet profile; measure one with `lite-llm tiers profile"),
        (["tiers", "profile", str(bare), "--data", f"code={tmp_path / 'nowhere'}"], "does not exist; prepare it first with lite-llm data prepare"),
        (["tiers", "profile", str(bare), "--data", f"poetry={dataset}"], "has no domain 'poetry'; it has code, prose"),
        (["tiers", "profile", str(bare), "--data", "code"], "cannot read --data 'code'; write DOMAIN=PATH"),
    ):
        result = runner.invoke(app_(), args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output and result.stderr.count("\n") == 1, result.stderr
    assert verify_checkpoint(bare) == []
