"""Plots of a run (PNG next to its data): policy training curves, retrain-loop history. Plots never fail a run."""

from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception:  # noqa: BLE001 - a missing/broken matplotlib costs the picture, not the run
        return None


def plot_policy_run(run: Path, out: Path) -> Path | None:
    """Reward and KL over steps of a PPO run (or DPO loss/accuracy) from its metrics.jsonl."""
    from alignloop.metrics import read_metrics

    plt = _plt()
    mfile = run / "metrics.jsonl"
    if plt is None or not mfile.is_file():
        return None
    rows = read_metrics(mfile)
    panels = [("reward/mean", "reward (mean over the rollout batch)"), ("ppo/kl", "KL to the reference (per answer)"),
              ("rollout/answer_length", "answer length (tokens)"), ("loss/dpo", "DPO loss"),
              ("dpo/accuracy", "DPO pair accuracy")]
    present = [(k, t) for k, t in panels if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for ax, (k, title) in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), ".-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_history(cycles: list[dict], out: Path) -> Path | None:
    """Retrain loop: win-rate, KL and promotion per cycle."""
    plt = _plt()
    done = [c for c in cycles if c.get("metrics")]
    if plt is None or not done:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = [c["cycle"] for c in done]
    for key, label in (("eval/win_rate", "win-rate vs production"), ("eval/kl", "KL to production")):
        ys = [c["metrics"].get(key) for c in done]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", label=label)
    for c in done:
        if c.get("promoted"):
            ax.axvline(c["cycle"], color="green", alpha=0.25)
    ax.set_xlabel("cycle (green: promoted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
