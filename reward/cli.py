"""``alignloop reward --config configs/reward.yaml [dotted.key=value ...]``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignloop import rundir
from alignloop.stage import launch, parse_stage_args, prepare_run_dir, quiet_env, run_stage
from reward.config import RewardConfig


def merge_reward_adapter(base_path: str, adapter_dir: Path, out_dir: Path, dtype: str, pad_token_id: int | None) -> Path:
    """Backbone + head with the LoRA weights merged in: one sequence-classification model in ``final/``."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.models import torch_dtype

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch_dtype(dtype),
                                                              pad_token_id=pad_token_id)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out_dir)
    return out_dir


def _body(argv: list[str]) -> int:
    quiet_env()
    cfg = parse_stage_args("reward", RewardConfig, argv)
    # Fail fast, before any model is loaded: data rows, model path.
    from alignloop.models import resolve_model_path
    from reward.data import check_preference_file
    from reward.trainer import FEEDBACK_EXPORT, train_source

    run = rundir.run_dir(cfg.output_dir, cfg.run_name)
    if cfg.data.train is not None:
        n = check_preference_file(cfg.data.train)
    if cfg.data.eval:
        check_preference_file(cfg.data.eval)
    base_path = resolve_model_path(cfg.model.path)
    prepare_run_dir(cfg, run)  # refuses to clobber a finished run, before any export is created
    if cfg.data.feedback is not None:
        export = run / FEEDBACK_EXPORT
        if not (cfg.resume and export.is_file()):  # a resumed run keeps the export version it started with
            from reward.feedback import fetch_export

            rec = fetch_export(cfg.data.feedback, export)
            print(f"[alignloop] feedback export version {rec['version']} of campaign {rec['campaign']!r}: "
                  f"{rec['rows']} pairs (watermark {rec['watermark']})", flush=True)
        n = check_preference_file(export)
    print(f"[alignloop] reward run directory: {run} ({n} preference rows from {train_source(cfg, run)})", flush=True)
    t0 = time.time()
    from reward.trainer import train_worker

    launch(train_worker, cfg, run, name=f"reward-{cfg.run_name}")
    final = run / "final"
    if cfg.peft.method == "lora":
        from alignloop.models import load_tokenizer

        tok = load_tokenizer(base_path, cfg.model.chat_template)
        merge_reward_adapter(base_path, final / "adapter", final, cfg.model.dtype, tok.pad_token_id)
    ev = json.loads((run / "eval.json").read_text())
    summary = {"run_dir": str(run), "final": str(final), "seconds": round(time.time() - t0, 1),
               "eval_accuracy": ev.get("eval/accuracy"), "eval_examples": ev.get("examples"), "stats_from": ev.get("source")}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str]) -> int:
    return run_stage("reward", _body, argv)
