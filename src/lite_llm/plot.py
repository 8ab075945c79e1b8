"""Charts of a run's metrics (PNG, via matplotlib's non-interactive backend).

* ``loss.png`` — training loss and validation loss per domain;
* ``bpb.png`` — validation bits per byte per domain;
* ``tiers.png`` — share of routes per tier (with the curriculum's target share when present);
* ``experts.png`` — routes per expert over the run (utilisation heat map);
* ``ramp.png`` — for a curriculum run: the new tier's scheduled and actual share with the
  phases shaded, above the validation loss per domain.

:func:`plot_retention` draws a retention report (bits per byte per domain for each model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LiteLLMError
from .train.metrics import read_metrics


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LiteLLMError("plotting needs matplotlib; install it with `pip install matplotlib`") from exc
    return plt


def plot_run(run: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the charts of run directory ``run`` into ``out_dir`` (default ``run/plots``)."""
    records = read_metrics(run)
    if not records:
        raise LiteLLMError(f"the metrics of {run} are empty; train for at least one step first")
    out = Path(out_dir) if out_dir is not None else Path(run) / "plots"
    if out.exists() and not out.is_dir():
        raise LiteLLMError(f"-o {out} is a file, and the charts need a folder; give a folder name such as {out.with_suffix('')}-plots")
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = [_plot_loss(plt, records, out), _plot_bpb(plt, records, out)]
    if any("tier_share" in r for r in records):
        written.append(_plot_tiers(plt, records, out))
    if any("expert_routes" in r for r in records):
        written.append(_plot_experts(plt, records, out))
    if any("new_tier_share" in r for r in records):
        written.append(_plot_ramp(plt, records, out))
    return [w for w in written if w is not None]


def _val_series(records: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for domain, score in (r.get("val") or {}).items():
            steps, values = series.setdefault(domain, ([], []))
            steps.append(r["step"] + 1)
            values.append(score[key])
    return series


def _plot_loss(plt, records, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] + 1 for r in records if "loss" in r and not r.get("skipped")]
    losses = [r["loss"] for r in records if "loss" in r and not r.get("skipped")]
    ax.plot(steps, losses, label="train", alpha=0.6, linewidth=1)
    for domain, (s, v) in _val_series(records, "loss").items():
        ax.plot(s, v, marker="o", label=f"val {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "loss.png")


def _plot_bpb(plt, records, out: Path) -> Path | None:
    series = _val_series(records, "bpb")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for domain, (s, v) in series.items():
        ax.plot(s, v, marker="o", label=domain)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("Validation bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "bpb.png")


def _plot_tiers(plt, records, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in records if "tier_share" in r]
    # routing weight per tier where the run logged it (route counts are 50/50 at k_tier 2, and
    # the curriculum's target is a share of routing weight); route counts in older runs' metrics
    key = "tier_weight_share" if all("tier_weight_share" in r for r in rows) else "tier_share"
    names = list(rows[-1][key])
    for name in names:
        ax.plot([r["step"] + 1 for r in rows], [r[key].get(name, 0.0) for r in rows], label=f"{name} (actual)")
    targets = [r for r in records if "target_share" in r]
    if targets:
        ax.plot([r["step"] + 1 for r in targets], [r["target_share"] for r in targets], "k--", label="target (new tier)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share of routing weight" if key == "tier_weight_share" else "share of routes")
    ax.set_title("Routing weight per tier" if key == "tier_weight_share" else "Routes per tier")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "tiers.png")


def _plot_experts(plt, records, out: Path) -> Path:
    import numpy as np

    rows = [r for r in records if "expert_routes" in r]
    width = max(len(r["expert_routes"]) for r in rows)
    grid = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        counts = np.asarray(r["expert_routes"], dtype=float)
        grid[i, : len(counts)] = counts / max(counts.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(grid.T, aspect="auto", interpolation="nearest", origin="lower", extent=(rows[0]["step"] + 1, rows[-1]["step"] + 1, -0.5, width - 0.5))
    fig.colorbar(image, ax=ax, label="share of routes")
    ax.set_xlabel("step")
    ax.set_ylabel("expert (flat id)")
    ax.set_title("Expert utilisation")
    return _save(plt, fig, out / "experts.png")


def _plot_ramp(plt, records, out: Path) -> Path:
    rows = [r for r in records if "new_tier_share" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    colours = {"preparation": "#eeeeee", "isolation": "#dde8f5", "integration": "#f7e6cc", "joint": "#dcefdc"}
    start = rows[0]
    for prev, row in zip(rows, rows[1:] + [None]):
        if row is None or row.get("phase") != prev.get("phase"):
            top.axvspan(start["step"] + 0.5, prev["step"] + 1.5, color=colours.get(prev.get("phase"), "#ffffff"), label=prev.get("phase"))
            start = row
    top.plot([r["step"] + 1 for r in rows], [r["new_tier_share"] for r in rows], label="new tier (actual)")
    targets = [r for r in rows if "target_share" in r]
    top.plot([r["step"] + 1 for r in targets], [r["target_share"] for r in targets], "k--", label="target")
    top.set_ylabel("share of routing weight")
    top.set_title("Tier ramp")
    top.legend(fontsize=8, loc="upper left")
    for domain, (s, v) in _val_series(records, "loss").items():
        bottom.plot(s, v, marker="o", label=domain)
    bottom.set_xlabel("step")
    bottom.set_ylabel("validation loss")
    bottom.legend()
    bottom.grid(alpha=0.3)
    return _save(plt, fig, out / "ramp.png")


def plot_retention(report: Any, path: str | Path) -> Path:
    """One panel per domain, a horizontal bar per model (bits per byte), the relative change
    against the base written at the end of each bar; the base's value is a dotted line.
    Horizontal bars keep long model names readable however many models are compared."""
    plt = _pyplot()
    models, domains = list(report.scores), report.domains
    fig, axes = plt.subplots(1, len(domains), figsize=(4.8 * len(domains) + 1.5, 0.42 * len(models) + 1.4), sharey=True, squeeze=False)
    ys = list(range(len(models)))[::-1]  # first model on top
    for ax, domain in zip(axes[0], domains):
        values = [report.scores[m][domain] for m in models]
        colors = ["tab:gray" if m == report.base else "tab:blue" for m in models]
        ax.barh(ys, values, color=colors, height=0.7)
        ax.axvline(report.scores[report.base][domain], color="black", linestyle=":", linewidth=1)
        for y, model, value in zip(ys, models, values):
            label = f"{value:.3f}" if model == report.base else f"{value:.3f} ({report.change(model, domain):+.1%})"
            ax.annotate(label, (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_title(domain)
        ax.set_xlabel("validation bits per byte (lower is better)")
        ax.set_xlim(0, max(values) * 1.3)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, models, fontsize=8)
    fig.suptitle(f"retention against {report.base}")
    return _save(plt, fig, Path(path))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
