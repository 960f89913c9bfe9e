"""``alignloop demo`` (what ``make demo`` runs): the whole loop on the packaged SmolLM2-135M-Instruct.

1. the feedback service starts (embedded, SQLite); its labeler web page is open for people too;
2. LoRA SFT on the shipped instruction set;
3. the SFT policy answers 48 prompts, 4 sampled answers each, pushed to the service as items;
4. three simulated labelers (scripted HTTP clients) rank them by a hidden, documented preference —
   **fewer words is better** (:func:`alignloop.labelers.concise`), with noise, and one labeler who
   sometimes reverses its ranking;
5. the export's preference pairs train a reward model;
6. PPO optimises the SFT policy against that reward model (vLLM rollouts);
7. a before/after table on 24 held-out prompts the labelers never saw: how often answers have the
   preferred property (at most 30 words), reward, KL to the SFT policy, length; plots (reward and KL
   over PPO steps, reward-model calibration) as PNG in the run directory.

It is ``alignloop pipeline --config configs/demo.yaml``, plus a token for you on the web page.
Re-running skips every finished stage (the registry); ``--fresh`` starts over.
Overrides: ``alignloop demo policy.overrides.train.max_steps=8``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def _body(argv: list[str]) -> int:
    from alignloop.config import load_config
    from alignloop.feedback_link import ensure_labelers
    from alignloop.pipeline import Pipeline, PipelineConfig, PipelineError
    from alignloop.stage import quiet_env

    quiet_env()
    ap = argparse.ArgumentParser(prog="alignloop demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEMO_CONFIG), help="pipeline config (default: configs/demo.yaml)")
    ap.add_argument("--fresh", action="store_true", help="delete the previous demo run and its registry first")
    ap.add_argument("--wait-for-you", type=float, default=0.0, metavar="SECONDS",
                    help="keep the web page open this long before the simulated labelers start, so you can rank first")
    ap.add_argument("overrides", nargs="*", help="pipeline config overrides, e.g. policy.overrides.train.max_steps=8")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    run = Path(cfg.output_dir) / cfg.run_name
    registry = Path(cfg.registry or Path(cfg.output_dir) / "registry")
    if args.fresh:
        for p in (run, registry):
            if p.exists():
                print(f"[demo] --fresh: removing {p}", flush=True)
                shutil.rmtree(p)
    pipe = Pipeline(cfg)
    pipe.check()  # every stage config and data file, before anything starts
    print("[demo] the whole loop: SFT -> candidates -> labelers rank (feedback service) -> reward model -> PPO -> "
          "evaluation", flush=True)
    pipe.connect()
    you = ensure_labelers(pipe.fc, ["you"], pipe.run / "feedback" / "labeler_tokens.json")["you"]
    print(f"[demo] labeler web page: {pipe.url}/  (sign in with token {you})", flush=True)
    if args.wait_for_you:
        print(f"[demo] waiting {args.wait_for_you:.0f}s for you on the web page ...", flush=True)
        time.sleep(args.wait_for_you)
    try:
        report = pipe.run_all()
    except PipelineError as e:
        print(f"alignloop demo: error: {e}", file=sys.stderr)
        return 1
    ev = report["eval"]
    (run / "demo_result.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1), **report}, indent=1))
    print(f"[demo] done in {time.time() - t0:.0f}s. The labelers preferred short answers: answers of at most 30 words "
          f"went from {ev.get('eval/parent_property_rate', 0):.0%} (SFT policy) to {ev.get('eval/property_rate', 0):.0%} "
          f"(after PPO on their rankings). Run directory: {run}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    from alignloop.stage import run_stage

    return run_stage("demo", _body, argv)
