"""One metric namespace for every stage, and the run logger.

Each logged step is one JSON object in ``metrics.jsonl`` (with ``step``), the
same scalars in TensorBoard, and one human-readable line in the terminal.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

# ---- names (the only place they are spelled) ----
LOSS_SFT = "loss/sft"
LOSS_EVAL = "eval/loss"
LOSS_REWARD = "loss/reward"
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LR = "optim/lr"
GRAD_NORM = "optim/grad_norm"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
STEP_TIME = "time/step_s"
EPOCH = "train/epoch"
TRAIN_TOKENS = "train/tokens"
PPO_KL = "ppo/kl"
PPO_CLIPFRAC = "ppo/clipfrac"
PPO_APPROX_KL = "ppo/approx_kl"
PPO_EXPLAINED_VAR = "ppo/explained_variance"
REWARD_MEAN = "reward/mean"
REWARD_ACCURACY = "reward/accuracy"  # train batch: share of pairs with r_chosen > r_rejected
REWARD_MARGIN = "reward/margin"  # train batch: mean r_chosen - r_rejected
EVAL_ACCURACY = "eval/accuracy"  # held-out pairwise accuracy
EVAL_REWARD_CHOSEN_MEAN = "eval/reward_chosen_mean"
EVAL_REWARD_CHOSEN_STD = "eval/reward_chosen_std"
EVAL_REWARD_REJECTED_MEAN = "eval/reward_rejected_mean"
EVAL_REWARD_REJECTED_STD = "eval/reward_rejected_std"
EVAL_ECE = "eval/ece"  # expected calibration error of sigma(r_a - r_b)
PAIRS_PER_S = "perf/pairs_per_s"
ROLLOUT_LOGPROB_DIFF = "rollout/logprob_diff"
TIME_ROLLOUT = "time/rollout_s"
# PPO stage (issue 5)
PPO_ENTROPY = "ppo/entropy"
PPO_KL_COEF = "ppo/kl_coef"
PPO_KL_LOSS = "ppo/kl_loss"
PPO_VALUE_CLIPFRAC = "ppo/value_clipfrac"
PPO_ADVANTAGE_MEAN = "ppo/advantage_mean"
REWARD_STD = "reward/std"
REWARD_SHAPED_MEAN = "reward/shaped_mean"
ROLLOUT_LOGPROB_DIFF_MAX = "rollout/logprob_diff_max"
ROLLOUT_ANSWER_LENGTH = "rollout/answer_length"
ROLLOUT_NO_EOS_FRAC = "rollout/no_eos_frac"
ROLLOUT_TOKENS_PER_S = "perf/rollout_tokens_per_s"
TRAIN_TOKENS_PER_S = "perf/train_tokens_per_s"
CRITIC_GRAD_NORM = "critic/grad_norm"
TIME_SCORE = "time/score_s"
TIME_PREPARE = "time/prepare_s"
TIME_TRAIN = "time/train_s"
TIME_SYNC = "time/sync_s"
# DPO family (issue 5)
LOSS_DPO = "loss/dpo"
DPO_REWARD_CHOSEN = "dpo/rewards_chosen"  # mean implicit reward beta * (log pi - log pi_ref) of chosen answers
DPO_REWARD_REJECTED = "dpo/rewards_rejected"
DPO_MARGIN = "dpo/margin"  # mean implicit-reward margin chosen - rejected
DPO_ACCURACY = "dpo/accuracy"  # share of pairs whose chosen implicit reward is higher
DPO_LOGP_CHOSEN = "dpo/logp_chosen"  # mean sum of answer-token log-probs under the policy
DPO_LOGP_REJECTED = "dpo/logp_rejected"
DPO_ROUND = "dpo/round"  # online DPO round (1-based)
DPO_PAIRS = "dpo/pairs"  # online: pairs made this round
DPO_TIED = "dpo/tied_prompts"  # online: prompts skipped because best and worst scored the same
DPO_SCORE_BEST = "dpo/score_best"  # online: mean score of the chosen (best) answers
DPO_SCORE_WORST = "dpo/score_worst"
EVAL_DPO_LOSS = "eval/dpo_loss"  # held-out pairs
EVAL_DPO_MARGIN = "eval/dpo_margin"
EVAL_DPO_ACCURACY = "eval/dpo_accuracy"


class MetricsLogger:
    """Writes metrics.jsonl + TensorBoard on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, echo: bool = True):
        self.enabled = enabled
        self.echo = echo
        self._fh = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as e:  # TensorBoard is optional at run time
                print(f"[alignloop] TensorBoard disabled: {e}", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, float], prefix_line: str = "") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        rec = {"step": step, "time": round(time.time(), 3), **clean}
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        if self.echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items())
            print(f"{prefix_line}step {step} {shown}", flush=True)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float | None) -> str:
    if v is None:
        return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}"


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rewind(run_dir: str | Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` rows of steps after ``step``: a run resumed from the checkpoint of ``step`` logs
    them again (a crash between two checkpoints would otherwise leave them twice). Rewritten in place."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
