"""The ``alignloop`` command: ``alignloop <stage> [args...]``.

Each stage lives in its own module and exposes ``main(argv: list[str]) -> int``;
the table maps a stage name to ``"module:function"`` and is imported lazily so
``alignloop serve`` never imports torch and ``alignloop --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

STAGES: dict[str, tuple[str, str]] = {
    "sft": ("sft.cli:main", "supervised fine-tuning (instruction tuning, LoRA/QLoRA/prompt tuning/frozen layers)"),
    "synth": ("sft.synth:main", "synthetic instruction data (self-instruct) through a rollout engine"),
    "reward": ("reward.cli:main", "reward model: scalar head on a causal LM, Bradley-Terry / Plackett-Luce, eval + calibration"),
    "reward-serve": ("reward.serve:main", "HTTP endpoint scoring (prompt, answer) batches with a trained reward model"),
    "dpo": ("ppo.dpo_cli:main", "DPO family (sigmoid/cDPO, robust, IPO, hinge) offline from pairs, or online with vLLM samples"),
    "plan": ("alignloop.plan:main", "memory plan for full/LoRA/QLoRA under ZeRO-2/3/offload, and license"),
    "serve": ("feedback_service.cli:main", "run the feedback service (labeler API and web page)"),
    "ppo": ("ppo.cli:main", "policy optimization: PPO / GRPO / RLOO / REINFORCE++ with vLLM rollouts, actor + critic on Ray"),
    "pipeline": ("alignloop.pipeline:main", "the whole loop as one Ray job: SFT -> candidates -> feedback -> reward -> PPO/DPO -> evaluate"),
    "retrain": ("alignloop.retrain:main", "retraining loop: on a schedule or N new rankings, retrain, evaluate, promote only past the gates"),
    "demo": ("alignloop.demo:main", "the main job: the whole loop (feedback service, SFT, labelers, reward, PPO) on the packaged base model"),
    "demo-sft": ("alignloop.demo_sft:main", "instruction tuning alone on the packaged base model, before and after"),
}


def _usage() -> str:
    lines = ["usage: alignloop <stage> [--config FILE] [dotted.key=value ...]", "", "stages:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from alignloop import __version__

        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"alignloop: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = STAGES[stage][0].split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:  # a stage whose package is not built yet
        print(f"alignloop {stage}: not available ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
