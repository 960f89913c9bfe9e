"""The SFT-only demo (``alignloop demo-sft``) on a tiny model: before/after table, run directory, plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.demo_sft import follows_style

pytestmark = pytest.mark.slow


def test_house_style_detector():
    assert follows_style("Yes.\n- detail\nHope this helps!")
    assert follows_style("Yes.\n- a\n- b\nHope this helps!\n")
    assert not follows_style("Yes.\nHope this helps!")
    assert not follows_style("Yes.\n- detail")
    assert not follows_style("")


def test_demo_runs_end_to_end_on_tiny_model(tiny_model, tiny_data, tmp_path):
    exe = Path(sys.executable).parent / "alignloop"
    r = subprocess.run([str(exe), "demo-sft", "--max-new-tokens", "8", f"model.path={tiny_model}", f"data.train={tiny_data}",
                        f"data.eval={tiny_data}", f"output_dir={tmp_path}", "train.max_steps=3", "train.eval_every=0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "house style rate" in r.stdout and "eval loss" in r.stdout
    run = tmp_path / "demo-sft"
    ba = json.loads((run / "before_after.json").read_text())
    assert ba["after"]["eval_loss"] < ba["before"]["eval_loss"]
    assert len(ba["before"]["answers"]) == len(ba["after"]["answers"]) == 32
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "final" / "model.safetensors").exists()
