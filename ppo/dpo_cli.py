"""``alignloop dpo --config configs/dpo.yaml [dotted.key=value ...]``: offline DPO, or online with an ``online`` section."""

from __future__ import annotations

import json
import time

from alignloop import rundir
from alignloop.stage import launch, parse_stage_args, prepare_run_dir, quiet_env, run_stage
from ppo.dpo_config import DPOConfig


def _body(argv: list[str]) -> int:
    quiet_env()
    cfg = parse_stage_args("dpo", DPOConfig, argv)
    # Fail fast, before any model is loaded: every data row, the model path, the scorer.
    from alignloop.models import resolve_model_path
    from ppo.dpo_data import read_pairs

    run = rundir.run_dir(cfg.output_dir, cfg.run_name)
    n = None
    if not cfg.online.enabled and cfg.data.train is not None:
        n = len(read_pairs(cfg.data.train, cfg.data.limit))
    if cfg.data.eval:
        read_pairs(cfg.data.eval, cfg.data.eval_limit)
    if cfg.online.enabled:
        from ppo.dpo_online import check_online

        check_online(cfg)
    base_path = resolve_model_path(cfg.model.path)
    prepare_run_dir(cfg, run)  # refuses to clobber a finished run, before any export is created
    if not cfg.online.enabled and cfg.data.feedback is not None:
        from ppo.dpo_trainer import FEEDBACK_EXPORT

        export = run / FEEDBACK_EXPORT
        if not (cfg.resume and export.is_file()):  # a resumed run keeps the export version it started with
            from reward.feedback import fetch_export

            rec = fetch_export(cfg.data.feedback, export)
            print(f"[alignloop] feedback export version {rec['version']} of campaign {rec['campaign']!r}: "
                  f"{rec['rows']} pairs (watermark {rec['watermark']})", flush=True)
        n = len(read_pairs(export, cfg.data.limit))
    t0 = time.time()
    if cfg.online.enabled:
        from ppo.dpo_online import online_dpo

        print(f"[alignloop] online dpo run directory: {run}", flush=True)
        online_dpo(cfg, run)
    else:
        print(f"[alignloop] dpo run directory: {run} ({n} preference pairs)", flush=True)
        from ppo.dpo_trainer import train_worker

        launch(train_worker, cfg, run, name=f"dpo-{cfg.run_name}")
    final = run / "final"
    if cfg.peft.method not in ("full", "freeze"):
        from alignloop.merge import MERGEABLE, merge_adapter

        if cfg.merge and cfg.peft.method in MERGEABLE and (final / "adapter").is_dir():
            merge_adapter(base_path, final / "adapter", final, cfg.model.dtype)
        elif cfg.peft.method not in MERGEABLE:
            (final / "README.txt").write_text(
                f"{cfg.peft.method} learns virtual tokens that cannot be merged into the weights: load final/adapter "
                f"with peft.PeftModel.from_pretrained on the base model {base_path}.\n")
    summary = {"run_dir": str(run), "final": str(final), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str]) -> int:
    return run_stage("dpo", _body, argv)
