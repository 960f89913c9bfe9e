"""The run directory contract: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_STEP = re.compile(r"^step-(\d+)$")


def run_dir(output_dir: str, run_name: str) -> Path:
    return Path(output_dir) / run_name


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its DONE marker exists)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and (p / "DONE").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    cks = checkpoints(run)
    return cks[-1] if cks else None


def checkpoint_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}"


def mark_done(path: Path) -> None:
    (path / "DONE").write_text("complete\n")


def prune(run: Path, keep: int) -> None:
    for _, p in checkpoints(run)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
