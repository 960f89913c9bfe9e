"""Held-out evaluation of a reward model from its rewards: accuracy, loss, reward statistics, calibration.

Works on plain lists of rewards (one list per example, best answer first), so it
is tested without a model and reused by the trainer, the bench and the scorer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignloop import metrics as M
from reward.losses import bradley_terry_loss


def _std(xs: list[float]) -> float:
    """Unbiased (n-1) standard deviation: PPO divides rewards by it."""
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ranked_pairs(rewards: list[list[float]]) -> list[tuple[float, float]]:
    """(better, worse) reward pairs: every i<j of every ranked list."""
    return [(r[i], r[j]) for r in rewards for i in range(len(r)) for j in range(i + 1, len(r))]


def calibration(pairs: list[tuple[float, float]], bins: int) -> dict:
    """Predicted P(a preferred over b) = σ(r_a - r_b) against the observed frequency, per bin.

    Each pair is counted in both orientations ((better, worse) observed 1, (worse, better)
    observed 0), so a model that is right 70% of the time at p=0.7 lies on the diagonal.
    ECE = Σ_bins (n_b / n) |mean p_b - observed_b|  (Guo et al. 2017).
    """
    preds: list[tuple[float, int]] = []
    for a, b in pairs:
        p = 1.0 / (1.0 + math.exp(-(a - b))) if a - b > -700 else 0.0
        preds += [(p, 1), (1.0 - p, 0)]
    out = []
    ece = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = [(p, y) for p, y in preds if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if not inside:
            out.append({"lo": lo, "hi": hi, "n": 0, "predicted": None, "observed": None})
            continue
        pm = sum(p for p, _ in inside) / len(inside)
        ob = sum(y for _, y in inside) / len(inside)
        ece += len(inside) / len(preds) * abs(pm - ob)
        out.append({"lo": lo, "hi": hi, "n": len(inside), "predicted": pm, "observed": ob})
    return {"bins": out, "ece": ece if preds else float("nan")}


def summarize(rewards: list[list[float]], bins: int = 10) -> dict:
    """Metrics over a held-out set; ``rewards[i]`` are example i's rewards, best first."""
    pairs = ranked_pairs(rewards)
    chosen = [r[0] for r in rewards]
    rejected = [x for r in rewards for x in r[1:]]
    if pairs:
        a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        loss, _ = bradley_terry_loss(a, b)
        acc = float((a > b).double().mean())
        ties = float((a == b).double().mean())
    else:
        loss, acc, ties = torch.tensor(float("nan")), float("nan"), float("nan")
    every = [x for r in rewards for x in r]
    cal = calibration(pairs, bins)
    return {
        M.EVAL_ACCURACY: acc,
        M.LOSS_EVAL: float(loss),
        M.EVAL_REWARD_CHOSEN_MEAN: sum(chosen) / len(chosen) if chosen else float("nan"),
        M.EVAL_REWARD_CHOSEN_STD: _std(chosen),
        M.EVAL_REWARD_REJECTED_MEAN: sum(rejected) / len(rejected) if rejected else float("nan"),
        M.EVAL_REWARD_REJECTED_STD: _std(rejected),
        M.EVAL_ECE: cal["ece"],
        "pairs": len(pairs),
        "ties": ties,
        "reward_mean": sum(every) / len(every) if every else float("nan"),
        "reward_std": _std(every),
        "n_rewards": len(every),
        "calibration": cal["bins"],
    }


def plot_calibration(summary: dict, path: Path, title: str = "reward model calibration") -> Path:
    """Reliability diagram (predicted vs observed, with bin counts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in summary["calibration"] if b["n"]]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="reward model")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}\naccuracy {summary[M.EVAL_ACCURACY]:.3f}, ECE {summary[M.EVAL_ECE]:.3f}, "
                 f"{summary['pairs']} pairs")
    ax.legend(loc="upper left")
    axn.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=0.9 / len(summary["calibration"]))
    axn.set_xlabel("predicted P(a preferred) = sigmoid(r_a - r_b)")
    axn.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_stats(final: Path, summary: dict, source: str, max_length: int) -> Path:
    """``final/reward_stats.json``: the mean and std PPO uses to normalise rewards (and the training max_length)."""
    stats = {"max_length": max_length, "mean": summary["reward_mean"], "std": summary["reward_std"], "n": summary["n_rewards"],
             "source": source, "eval_accuracy": summary[M.EVAL_ACCURACY]}
    path = final / "reward_stats.json"
    path.write_text(json.dumps(stats, indent=1) + "\n")
    return path
