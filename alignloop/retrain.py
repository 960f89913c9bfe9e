"""``alignloop retrain --config configs/retrain.yaml``: the unattended retraining loop.

Each **cycle**: export the feedback newer than the watermark -> retrain (or continue) the reward
model -> optimise the current production policy -> evaluate against production -> **promote only
if every gate passes** (else keep production and record why) -> sample fresh candidates from the
production policy and push them to the feedback service, so labelers rank what the model does now.

A cycle starts when its **trigger** fires: an interval, a cron schedule (UTC), and/or at least N
new rankings since the watermark (``schedule.mode``: any or all of the configured ones).

Crash safety, all state on disk in ``state_dir``:

- ``loop.lock``: an exclusive ``flock`` — two loops never run cycles on the same state at once (the
  kernel drops the lock when a killed process dies, so a restart is never blocked by a stale lock).
- ``state.json`` (atomic rename): the current cycle number and status, the consumed watermark,
  the production artifact, retry bookkeeping. A cycle is marked *running* before any work, so a
  restarted loop resumes that same cycle instead of starting another (no cycle repeated or skipped).
- ``cycles/<n>.json``: every step's artifact id as soon as it exists; a resumed cycle reuses them
  (and the registry skips finished stages), so nothing is trained twice.
- Promotion is one atomic write of the registry's ``production.json``, done only after the
  evaluation exists and the gates passed; a resumed cycle that finds its policy already in
  production does not promote again. A failed cycle is recorded, retried ``failure.max_retries``
  times after ``failure.retry_delay_s``, then given up (its feedback stays unconsumed: the
  watermark only moves when a cycle completes).

``--once`` runs one cycle now (what ``ray job submit`` of a single cycle uses); ``--submit ADDRESS``
sends that one-cycle run to a Ray cluster as a job.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from alignloop.config import Section, dump_config, load_config
from alignloop.registry import Artifact, atomic_write_json


class Clock(Protocol):
    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# ------------------------------------------------------------------------------------------- config
class ScheduleConfig(Section):
    interval_s: float | None = Field(None, gt=0, description="a cycle is due this long after the previous one ended (None: no time trigger)")
    cron: str | None = Field(None, description="cron schedule in UTC, e.g. '0 3 * * *' (03:00 every day); due at the first match after the previous cycle")
    min_new_rankings: int | None = Field(None, ge=1, description="a cycle is due once this many rankings arrived since the watermark")
    mode: Literal["any", "all"] = Field("any", description="any: one configured trigger suffices; all: every configured trigger must hold")
    poll_s: float = Field(60.0, gt=0, description="seconds between trigger checks")

    @model_validator(mode="after")
    def _check(self):
        if self.interval_s is None and self.cron is None and self.min_new_rankings is None:
            raise ValueError("schedule: configure at least one of interval_s, cron, min_new_rankings")
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ValueError(f"schedule.cron={self.cron!r} is not a valid cron expression")
        return self


class FailureConfig(Section):
    max_retries: int = Field(2, ge=0, description="retries of a failed cycle before it is given up")
    retry_delay_s: float = Field(600.0, ge=0, description="wait before retrying a failed cycle")


class RetrainConfig(Section):
    pipeline: str = Field(..., description="the pipeline config (configs/pipeline.yaml): its feedback, reward, policy, evaluate, candidates and gates sections")
    pipeline_overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.key: value overrides on that pipeline config")
    state_dir: str = Field("runs/retrain", description="the loop's state: lock, state.json, cycles/, the embedded feedback service")
    schedule: ScheduleConfig
    reward_mode: Literal["retrain", "continue"] = Field("retrain", description="retrain: a fresh reward model on all feedback so far; continue: the previous one on the new feedback")
    failure: FailureConfig = FailureConfig()
    max_cycles: int | None = Field(None, ge=1, description="stop after this many completed cycles (None: run forever)")


def load_pipeline_config(cfg: RetrainConfig):
    from alignloop.pipeline import PipelineConfig, as_overrides

    state = Path(cfg.state_dir)
    pc = load_config(PipelineConfig, cfg.pipeline, as_overrides(cfg.pipeline_overrides))
    # The loop owns where the pipeline writes: its state directory (the embedded service lives there too).
    return pc.model_copy(update={"output_dir": str(state.parent), "run_name": state.name,
                                 "registry": pc.registry or str(state / "registry")})


# ------------------------------------------------------------------------------------------ triggers
def due(schedule: ScheduleConfig, now: float, last_end: float, new_rankings: int | None) -> tuple[bool, str]:
    """(a cycle is due, why); ``last_end`` is when the previous cycle ended (or the loop was created)."""
    checks: list[tuple[bool, str]] = []
    if schedule.interval_s is not None:
        checks.append((now - last_end >= schedule.interval_s, f"interval {schedule.interval_s:g}s"))
    if schedule.cron is not None:
        from croniter import croniter

        nxt = croniter(schedule.cron, last_end).get_next(float)
        checks.append((now >= nxt, f"cron {schedule.cron!r}"))
    if schedule.min_new_rankings is not None:
        n = new_rankings or 0
        checks.append((n >= schedule.min_new_rankings, f"{n} new rankings (>= {schedule.min_new_rankings})"))
    fired = [why for ok, why in checks if ok]
    ok = bool(fired) if schedule.mode == "any" else len(fired) == len(checks)
    return ok, ", ".join(fired)


# ------------------------------------------------------------------------------------------ the loop
class LockHeld(RuntimeError):
    pass


class RetrainLoop:
    def __init__(self, cfg: RetrainConfig, *, clock: Clock | None = None, pipeline=None, log=print):  # noqa: ANN001
        from alignloop.pipeline import Pipeline

        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.dir = Path(cfg.state_dir)
        (self.dir / "cycles").mkdir(parents=True, exist_ok=True)
        self.pcfg = load_pipeline_config(cfg)
        self.pipe = pipeline or Pipeline(self.pcfg)
        self._log = log
        self._lock_fd: int | None = None

    def log(self, msg: str) -> None:
        self._log(f"[retrain] {msg}", flush=True)

    # -------------------------------------------------------------- lock and state
    def lock(self) -> None:
        fd = os.open(self.dir / "loop.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(f"another retrain loop holds {self.dir / 'loop.lock'} (pid {holder or '?'}); "
                           "two loops must not run cycles on the same state") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def state(self) -> dict:
        p = self.dir / "state.json"
        if p.is_file():
            return json.loads(p.read_text())
        return {"cycle": 0, "status": "idle", "watermark": 0, "created_at": self.clock.time(), "last_end": None,
                "completed": 0, "attempts": 0, "retry_at": None}

    def save_state(self, st: dict) -> None:
        atomic_write_json(self.dir / "state.json", st)

    def record(self, n: int) -> dict:
        p = self.dir / "cycles" / f"{n:05d}.json"
        return json.loads(p.read_text()) if p.is_file() else {"cycle": n, "steps": {}, "attempts": []}

    def save_record(self, rec: dict) -> None:
        atomic_write_json(self.dir / "cycles" / f"{rec['cycle']:05d}.json", rec)

    def cycles(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.dir / "cycles").glob("*.json"))]

    # -------------------------------------------------------------- production
    def production(self) -> Artifact:
        """The production policy; on the very first run the pipeline's base (SFT or base_policy) becomes it."""
        reg = self.pipe.registry
        prod = reg.production_artifact()
        if prod is None:
            base = self.pipe.base()
            reg.promote(base, "initial production policy (the pipeline's base)")
            self.log(f"initial production policy: {base.id}")
            self.pipe.candidates(base)
            prod = base
        return prod

    def new_rankings(self, watermark: int) -> int | None:
        try:
            self.pipe.connect()
            return int(self.pipe.fc.stats(self.pipe.campaign["id"], since_watermark=watermark)["rankings_since"])
        except Exception as e:  # noqa: BLE001 - a service outage must not kill an unattended loop
            self.log(f"feedback service unreachable ({type(e).__name__}: {e}); will retry")
            return None

    # -------------------------------------------------------------- one cycle
    def run_cycle(self, n: int, trigger: str) -> dict:
        """Run (or resume) cycle ``n``. Returns its record. Raises on failure (the caller records it)."""
        from alignloop.pipeline import gate_decision

        reg, pipe = self.pipe.registry, self.pipe
        rec = self.record(n)
        rec.setdefault("trigger", trigger)
        rec.setdefault("started_at", self.clock.time())
        steps = rec["steps"]
        st = self.state()
        pipe.connect()

        def step(name: str, make) -> Artifact:  # noqa: ANN001
            if name in steps:
                return reg.get(steps[name])
            art = make()
            steps[name] = art.id
            self.save_record(rec)
            crash = os.environ.get("ALIGNLOOP_RETRAIN_CRASH_AFTER")
            if crash == name:  # fault injection for the kill-and-restart test
                os._exit(17)
            return art

        prod = reg.get(steps["production"]) if "production" in steps else self.production()
        steps.setdefault("production", prod.id)
        self.save_record(rec)
        if "export" not in steps:
            fresh = pipe.fc.stats(pipe.campaign["id"], since_watermark=st["watermark"])["rankings_since"]
            if not fresh:
                self.log(f"cycle {n}: no rankings since watermark {st['watermark']}: nothing new to learn, production stays")
                rec.update(skipped="no new feedback", promoted=False, finished_at=self.clock.time(), watermark=st["watermark"])
                self.save_record(rec)
                return rec
        fb = step("export", lambda: pipe.export(since_watermark=st["watermark"], reuse_unchanged=False))
        pairs = fb.path / "pairs.jsonl"
        if self.cfg.reward_mode == "retrain":
            pairs = self.cumulative_pairs(n, fb)
            rm = step("reward", lambda: pipe.reward(prod, fb, pairs))
        else:
            prev = self.previous_reward()
            base_rm = prev if prev is not None else prod
            rm = step("reward", lambda: pipe.reward(base_rm, fb))
        pol = step("policy", lambda: pipe.policy(prod, rm, fb))
        ev = step("eval", lambda: pipe.evaluate(pol, prod, rm))
        ok, lines = gate_decision(self.pcfg.gates, ev.metrics)
        rec["metrics"], rec["gates"], rec["gates_pass"] = ev.metrics, lines, ok
        for line in lines:
            self.log(f"cycle {n}: gate {line}")
        current = reg.production()
        if ok and (current or {}).get("artifact") != pol.id:
            reg.promote(pol, f"cycle {n}: gates passed", cycle=n, eval=ev.id)
            self.log(f"cycle {n}: PROMOTED {pol.id} (was {prod.id})")
        elif ok:
            self.log(f"cycle {n}: {pol.id} already in production")
        else:
            self.log(f"cycle {n}: NOT promoted, production stays {prod.id}: " + "; ".join(x for x in lines if x.startswith("FAIL")))
        rec["promoted"] = ok
        rec["kept_because"] = None if ok else [x for x in lines if x.startswith("FAIL")]
        self.save_record(rec)
        new_prod = reg.production_artifact()
        step("candidates", lambda: pipe.candidates(new_prod, seed=self.pcfg.candidates.seed + n))
        rec["finished_at"] = self.clock.time()
        rec["watermark"] = fb.extra["watermark"]
        self.save_record(rec)
        return rec

    def cumulative_pairs(self, n: int, latest: Artifact) -> Path:
        """All feedback so far, each item from its newest export (an export re-aggregates the items it touches)."""
        exports = [a for a in self.pipe.registry.list("feedback")
                   if a.extra.get("campaign") == latest.extra.get("campaign") and a.extra.get("service") == latest.extra.get("service")]
        exports = sorted(exports, key=lambda a: a.extra["export_id"])
        by_item: dict[Any, list[str]] = {}
        for a in exports:
            rows: dict[Any, list[str]] = {}
            for line in (a.path / "pairs.jsonl").read_text().splitlines():
                if line.strip():
                    rows.setdefault(json.loads(line).get("item_id"), []).append(line)
            by_item.update(rows)
        out = self.dir / "cycles" / f"{n:05d}-pairs.jsonl"
        out.write_text("".join(line + "\n" for lines in by_item.values() for line in lines))
        return out

    def previous_reward(self) -> Artifact | None:
        for rec in reversed(self.cycles()):
            if rec.get("finished_at") and "reward" in rec["steps"]:
                return self.pipe.registry.get(rec["steps"]["reward"])
        return None

    # -------------------------------------------------------------- the loop
    def tick(self, force: bool = False) -> str:
        """One decision: resume, retry, start a cycle, or wait. Returns what happened.
        ``force`` (``--once``): a new cycle starts now, whatever the triggers say."""
        st = self.state()
        now = self.clock.time()
        if st["status"] == "running":
            n, trigger = st["cycle"], "resume after restart"
            self.log(f"cycle {n} was interrupted: resuming it")
        elif st["status"] == "failed":
            if now < (st.get("retry_at") or 0):
                return "wait"
            n, trigger = st["cycle"], f"retry {st['attempts']}"
        elif force:
            n, trigger = st["cycle"] + 1, "started now (--once)"
            self.log(f"cycle {n}: {trigger}")
        else:
            last_end = st["last_end"] if st["last_end"] is not None else st["created_at"]
            need_count = self.cfg.schedule.min_new_rankings is not None
            count = self.new_rankings(st["watermark"]) if need_count else None
            ok, why = due(self.cfg.schedule, now, last_end, count)
            if not ok:
                return "wait"
            n, trigger = st["cycle"] + 1, why
            self.log(f"cycle {n} due: {why}")
        st.update(cycle=n, status="running", started_at=now)
        self.save_state(st)
        try:
            rec = self.run_cycle(n, trigger)
        except Exception as e:  # noqa: BLE001 - recorded, retried per policy, never half-promoted
            rec = self.record(n)
            rec.setdefault("attempts", []).append({"at": self.clock.time(), "error": f"{type(e).__name__}: {e}",
                                                   "traceback": traceback.format_exc()[-3000:]})
            self.save_record(rec)
            st = self.state()
            st["attempts"] = st.get("attempts", 0) + 1
            if st["attempts"] > self.cfg.failure.max_retries:
                self.log(f"cycle {n} FAILED {st['attempts']} times, giving up on it ({type(e).__name__}: {e}); "
                         f"its feedback stays for the next cycle")
                rec["abandoned"] = True
                self.save_record(rec)
                st.update(status="idle", attempts=0, retry_at=None, last_end=self.clock.time())
            else:
                st.update(status="failed", retry_at=self.clock.time() + self.cfg.failure.retry_delay_s)
                self.log(f"cycle {n} failed ({type(e).__name__}: {e}); retry {st['attempts']}/"
                         f"{self.cfg.failure.max_retries} in {self.cfg.failure.retry_delay_s:g}s")
            self.save_state(st)
            return "failed"
        st = self.state()
        st.update(status="idle", watermark=rec["watermark"], last_end=self.clock.time(), attempts=0, retry_at=None,
                  completed=st.get("completed", 0) + 1, production=(self.pipe.registry.production() or {}).get("artifact"))
        self.save_state(st)
        self.log(f"cycle {n} complete: watermark {rec['watermark']}, "
                 f"{'promoted' if rec['promoted'] else 'kept'} -> production {st['production']}")
        self.plot()
        return "cycle"

    def plot(self) -> None:
        from alignloop.plots import plot_history

        plot_history(self.cycles(), self.dir / "history.png")

    def run(self, once: bool = False) -> int:
        """Loop until max_cycles completed cycles (or one with ``once``); returns cycles completed in this call."""
        self.lock()
        done = 0
        try:
            dump_config(self.cfg, self.dir / "retrain.yaml")
            st = self.state()
            if not (self.dir / "state.json").is_file():
                self.save_state(st)
            self.production()
            while True:
                if self.cfg.max_cycles is not None and self.state().get("completed", 0) >= self.cfg.max_cycles:
                    self.log(f"{self.cfg.max_cycles} cycles completed: stopping")
                    break
                what = self.tick(force=once)
                if what == "cycle":
                    done += 1
                    if once:
                        break
                elif what == "wait":
                    self.clock.sleep(self.cfg.schedule.poll_s)
                elif once:  # failed
                    break
        finally:
            self.pipe.close()
            self.unlock()
        return done


# ------------------------------------------------------------------------------------------- CLI
def submit(address: str, config: str, extra: list[str]) -> int:
    """Send one cycle (``--once``) to a Ray cluster as a job through ``ray job submit`` (which uploads this directory,
    follows the job's logs and exits with its status)."""
    import shutil
    import subprocess

    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
           "alignloop", "retrain", "--config", config, "--once", *extra]
    print(f"[retrain] submitting one cycle to {address}: {' '.join(cmd[cmd.index('--') + 1:])}", flush=True)
    return subprocess.run(cmd).returncode


def _body(argv: list[str]) -> int:
    import argparse

    from alignloop.config import describe
    from alignloop.stage import quiet_env

    quiet_env()
    ap = argparse.ArgumentParser(prog="alignloop retrain", description="the retraining loop (see docs/pipeline.md)")
    ap.add_argument("--config", required=False, help="retrain YAML (configs/retrain.yaml)")
    ap.add_argument("--once", action="store_true", help="run one cycle now (resume an interrupted one first), then exit")
    ap.add_argument("--submit", metavar="ADDRESS", help="submit one cycle as a Ray job to this cluster (http://head:8265)")
    ap.add_argument("--status", action="store_true", help="print the loop's state and cycle records, then exit")
    ap.add_argument("--help-config", action="store_true", help="list every config key")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(describe(RetrainConfig)))
        return 0
    if not args.config:
        ap.error("--config is required")
    cfg = load_config(RetrainConfig, args.config, args.overrides)
    if args.submit:
        return submit(args.submit, args.config, args.overrides)
    loop = RetrainLoop(cfg)
    if args.status:
        print(json.dumps({"state": loop.state(), "production": loop.pipe.registry.production(),
                          "cycles": [{k: r.get(k) for k in ("cycle", "trigger", "promoted", "kept_because", "watermark",
                                                            "finished_at", "abandoned")} for r in loop.cycles()]}, indent=1))
        return 0
    loop.pipe.check()
    try:
        loop.run(once=args.once)
    except LockHeld as e:
        print(f"alignloop retrain: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str]) -> int:
    from alignloop.stage import run_stage

    return run_stage("retrain", _body, argv)


__all__ = ["RetrainConfig", "RetrainLoop", "SystemClock", "due"]
