"""``alignloop sft --config configs/sft.yaml [dotted.key=value ...]``."""

from __future__ import annotations

import json
import time

from alignloop import rundir
from alignloop.stage import launch, parse_stage_args, prepare_run_dir, quiet_env, run_stage
from sft.config import SFTConfig


def _body(argv: list[str]) -> int:
    quiet_env()
    cfg = parse_stage_args("sft", SFTConfig, argv)
    # Fail fast, before any model is loaded: data rows, model path.
    from alignloop.data import check_sft_file
    from alignloop.models import resolve_model_path

    n = check_sft_file(cfg.data.train, cfg.data.format)
    if cfg.data.eval:
        check_sft_file(cfg.data.eval, cfg.data.format)
    base_path = resolve_model_path(cfg.model.path)
    run = rundir.run_dir(cfg.output_dir, cfg.run_name)
    prepare_run_dir(cfg, run)
    print(f"[alignloop] sft run directory: {run} ({n} training rows)", flush=True)
    t0 = time.time()
    from sft.trainer import train_worker

    launch(train_worker, cfg, run, name=f"sft-{cfg.run_name}")
    final = run / "final"
    if cfg.peft.method != "full" and cfg.peft.method != "freeze":
        from alignloop.merge import MERGEABLE, merge_adapter

        if cfg.merge and cfg.peft.method in MERGEABLE:
            merge_adapter(base_path, final / "adapter", final, cfg.model.dtype)
        elif cfg.peft.method not in MERGEABLE:
            (final / "README.txt").write_text(
                f"{cfg.peft.method} learns virtual tokens that cannot be merged into the weights: load final/adapter "
                f"with peft.PeftModel.from_pretrained on the base model {base_path}.\n")
    summary = {"run_dir": str(run), "final": str(final), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str]) -> int:
    return run_stage("sft", _body, argv)
