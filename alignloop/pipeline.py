"""``alignloop pipeline --config configs/pipeline.yaml``: the whole loop as one Ray job.

SFT -> candidate answers pushed to the feedback service -> rankings (simulated labelers, wait for
people, or take what is there) -> a versioned export -> reward model -> PPO or DPO -> evaluation.

The pipeline config *composes* the stage configs: each stage section names a stage YAML file and
dotted overrides; the pipeline only fills in the links between stages (the SFT model becomes the
reward model's and the policy's base, the export becomes the reward data, the reward model scores
PPO) and where each stage writes. Every stage output is an artifact in the registry
(:mod:`alignloop.registry`) keyed by its config, its input files' contents and its parents, so a
re-run skips unchanged stages and says so, and a crashed stage resumes from its checkpoints.

Every stage runs in its own Ray worker process (``ray.launcher: ray``; fresh process per stage, with
the CPUs the stage section asks for) or in a plain child process (``launcher: process``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from alignloop.config import ConfigError, Section, dump_config, load_config
from alignloop.registry import Artifact, Registry, file_inputs, hash_path, stable_hash

STAGE_CLASSES = {"sft": "sft.config:SFTConfig", "reward": "reward.config:RewardConfig", "ppo": "ppo.config:PPOConfig",
                 "dpo": "ppo.dpo_config:DPOConfig"}
# Keys the pipeline owns in every stage config (where it writes), never part of an artifact's identity.
OWNED = ("output_dir", "run_name", "resume")


# ------------------------------------------------------------------------------------------- config
class StageRef(Section):
    config: str = Field(..., description="the stage's own YAML config (configs/sft.yaml, ...): the pipeline does not copy its fields")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.key: value overrides applied to that config")
    num_cpus: float | None = Field(None, gt=0, description="CPUs of the Ray worker that runs the stage (default: ray.stage_cpus)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the Ray worker that runs the stage (in-process training on a GPU node; "
                            "stages with their own Ray workers ask for GPUs through their ray section)")


class PolicyStageRef(StageRef):
    algo: Literal["ppo", "dpo"] = Field("ppo", description="policy optimisation: ppo (also GRPO/RLOO via the PPO config) or dpo")


class CandidatesConfig(Section):
    prompts: str = Field(..., description="prompts (.jsonl {prompt} / {messages} / SFT records) to sample candidate answers for")
    limit: int | None = Field(None, gt=0, description="use only the first N prompts")
    answers_per_prompt: int = Field(4, ge=2, le=16, description="answers sampled per prompt (an item needs 2 distinct ones)")
    max_new_tokens: int = Field(64, gt=0, description="answer length cap")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (diverse answers make informative rankings)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="rollout engine")
    seed: int = Field(0, description="sampling seed")


class SimulatedLabelersConfig(Section):
    count: int = Field(3, ge=1, le=50, description="scripted labelers (HTTP clients with tokens, like people)")
    utility: str = Field("alignloop.labelers:concise", description="'module:fn' (prompt, answer) -> float: the hidden preference, higher is better")
    noise: float = Field(2.0, ge=0, description="std of the noise on each judged utility")
    contrarians: int = Field(1, ge=0, description="how many of them sometimes reverse their ranking")
    contrarian_rate: float = Field(0.2, ge=0, le=1, description="how often a contrarian reverses a ranking")
    seed: int = Field(0, description="seed of the labelers' noise")


class FeedbackConfig(Section):
    url: str | None = Field(None, description="a running feedback service; None starts an embedded one (SQLite in the run directory)")
    token_env: str = Field("ALIGNLOOP_FEEDBACK_TOKEN", description="environment variable with the admin token for url")
    db: str | None = Field(None, description="embedded service: SQLAlchemy URL (default: SQLite in <run>/feedback)")
    port: int = Field(0, ge=0, le=65535, description="embedded service port (0: any free port; busy: another free one)")
    campaign: str = Field("alignloop", description="campaign name (created when missing)")
    guidelines: str = Field("Rank the answers from best to worst.", description="what labelers read")
    overlap: int = Field(3, ge=1, description="labelers per item")
    gold: str | None = Field(None, description="gold items (.jsonl {prompt, answers, gold_best}): pushed for quality control and used in evaluation")
    source: Literal["simulated", "wait", "take"] = Field("take", description="simulated: scripted labelers rank now; wait: until min_new_rankings arrive; take: what is there")
    min_new_rankings: int = Field(1, ge=1, description="wait: rankings needed since the last export")
    timeout_s: float = Field(3600.0, gt=0, description="wait: give up after this long")
    poll_s: float = Field(5.0, gt=0, description="wait: seconds between checks")
    simulated: SimulatedLabelersConfig = SimulatedLabelersConfig()
    strategy: Literal["all_pairs", "best_vs_rest"] = Field("all_pairs", description="pairs from a ranking")
    aggregation: Literal["none", "majority", "mean_rank"] = Field("majority", description="combining several labelers' rankings")
    max_disagreement: float | None = Field(None, ge=0, le=1, description="drop items whose labelers disagree more than this")
    min_rankings: int | None = Field(None, ge=1, description="rankings an item needs to be exported")
    incremental: bool = Field(False, description="export only feedback newer than the previous export's watermark")


class EvaluateConfig(Section):
    prompts: str = Field(..., description="held-out prompts (.jsonl {prompt} / {messages} / SFT records)")
    limit: int | None = Field(None, gt=0, description="use only the first N prompts")
    max_new_tokens: int = Field(64, gt=0, description="answer length cap")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="rollout engine")
    property: str | None = Field(None, description="'module:fn' (prompt, answer) -> bool reported as property_rate (what labelers prefer)")
    seed: int = Field(0, description="sampling seed of the KL estimate")
    num_cpus: float | None = Field(None, gt=0, description="CPUs of the evaluation worker (default: ray.stage_cpus)")


class GatesConfig(Section):
    min_win_rate: float | None = Field(None, ge=0, le=1, description="promote only if the reward-model win-rate against the parent is at least this")
    max_kl: float | None = Field(None, ge=0, description="... and the KL to the reference (per answer) is at most this")
    min_reward_accuracy: float | None = Field(None, ge=0, le=1, description="... and the reward model's held-out pairwise accuracy is at least this")
    min_property_rate: float | None = Field(None, ge=0, le=1, description="... and the property rate is at least this")
    min_gold_agreement: float | None = Field(None, ge=0, le=1, description="... and the agreement with gold answers is at least this")


class PipelineRayConfig(Section):
    launcher: Literal["ray", "process"] = Field("ray", description="ray: each stage in a fresh Ray worker process; process: a plain child process")
    address: str | None = Field(None, description="Ray cluster address (default: the job's cluster, else a local one)")
    num_cpus: int | None = Field(None, gt=0, description="local cluster size (default: all cores)")
    stage_cpus: float | None = Field(None, gt=0, description="CPUs per stage worker when its section does not say (default: min(4, cluster CPUs))")


class PipelineConfig(Section):
    output_dir: str = Field("runs", description="parent of the pipeline's run directory")
    run_name: str = Field("pipeline", description="run directory name (holds the embedded service, summary and plots)")
    registry: str | None = Field(None, description="artifact registry root (default: <output_dir>/registry, shared by runs)")
    base_policy: str | None = Field(None, description="start from this model directory or registry artifact id instead of running SFT")
    sft: StageRef | None = Field(None, description="the SFT stage (omit with base_policy)")
    candidates: CandidatesConfig
    feedback: FeedbackConfig = FeedbackConfig()
    reward: StageRef
    policy: PolicyStageRef
    evaluate: EvaluateConfig
    gates: GatesConfig = GatesConfig()
    promote: bool = Field(False, description="promote the policy to production in the registry when the gates pass")
    ray: PipelineRayConfig = PipelineRayConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.sft is None and self.base_policy is None:
            raise ValueError("give an sft section or base_policy (the model to start from)")
        return self


# ----------------------------------------------------------------------------------- stage configs
def _import(path: str):
    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{dotted.key: value}`` as command-line overrides (non-strings as JSON, which the YAML parser reads back)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def build_stage_config(kind: str, ref: StageRef, links: dict[str, Any], where: str) -> dict:
    """The stage YAML + the section's overrides + the pipeline's links, validated by the stage's own config class."""
    cls = _import(STAGE_CLASSES[kind])
    p = Path(ref.config)
    if not p.is_file():
        raise ConfigError(f"{where}.config: file not found: {p}")
    try:
        cfg = load_config(cls, p, as_overrides(ref.overrides) + as_overrides(links))
    except ConfigError as e:
        raise ConfigError(f"{where} ({p}): {e}") from None
    return cfg.model_dump(mode="json")


def identity(tree: dict, links: dict[str, Any]) -> dict:
    """The part of a stage config that defines its output: everything but where it writes and the parent links."""
    ident = json.loads(json.dumps(tree))
    for k in OWNED:
        ident.pop(k, None)
    for dotted in links:
        node = ident
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return ident


# ---------------------------------------------------------------------------------- isolation
def _call_isolated(fn_path: str, args: list, kwargs: dict, cwd: str, threads: int | None) -> Any:
    """Runs in the stage's own process: thread count first (before torch loads), then the function."""
    os.chdir(cwd)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        return _import(fn_path)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - many library exceptions do not pickle: send the text back
        import traceback

        raise StageProcessError(f"{fn_path} failed: {type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}") from None


class StageProcessError(RuntimeError):
    """An exception raised in a stage's process, carried back as text."""


def _stage_cli(stage: str, argv: list[str]) -> int:
    from alignloop.cli import main

    return main([stage, *argv])


class Launcher:
    """Runs a function in a fresh process: a Ray task (max_calls=1) or a spawned child process."""

    def __init__(self, cfg: PipelineRayConfig):
        self.cfg = cfg
        self.kind = cfg.launcher
        self.cluster_cpus: float | None = None
        if self.kind == "ray":
            import ray

            from alignloop.ray_utils import init_ray

            if not ray.is_initialized():
                if cfg.address or os.environ.get("RAY_ADDRESS"):
                    init_ray(cfg.address)
                else:
                    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                                       "RAY_USAGE_STATS_ENABLED": "0"}})
            self.cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        else:
            self.cluster_cpus = float(os.cpu_count() or 1)

    def default_cpus(self) -> float:
        return self.cfg.stage_cpus or min(4.0, self.cluster_cpus or 1.0)

    def call(self, fn_path: str, args: list, kwargs: dict | None = None, cpus: float | None = None, name: str = "stage",
             gpus: float = 0.0) -> Any:
        cpus = cpus or self.default_cpus()
        threads = max(1, int(cpus))
        if self.kind == "ray":
            import ray

            task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1, max_retries=0)(_call_isolated).options(name=name)
            return ray.get(task.remote(fn_path, args, kwargs or {}, os.getcwd(), threads))
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_call_isolated, (fn_path, args, kwargs or {}, os.getcwd(), threads))


# ------------------------------------------------------------------------------------ candidates
def generate_candidates(model_path: str, prompts_path: str, limit: int | None, n: int, max_new_tokens: int,
                        temperature: float, top_p: float, engine: str, seed: int) -> list[dict]:
    """Sample ``n`` answers per prompt (runs in a worker process)."""
    from alignloop.evaluate import model_max_len, read_eval_prompts
    from alignloop.rollout import SamplingSettings, make_engine

    prompts = read_eval_prompts(prompts_path, limit)
    print(f"[pipeline] sampling {n} answers for each of {len(prompts)} prompts from {model_path}", flush=True)
    with make_engine(engine, model_path, seed=seed, max_model_len=model_max_len(model_path)) as eng:
        out = eng.generate_chat(prompts, SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, n=n, seed=seed))
    return [{"messages": p, "answers": [c.text for c in comps]} for p, comps in zip(prompts, out)]


# ------------------------------------------------------------------------------------- the pipeline
def gate_decision(gates: GatesConfig, metrics: dict[str, float]) -> tuple[bool, list[str]]:
    """(all gates pass, one line per gate); a gate whose metric is missing fails and says so."""
    checks = [("min_win_rate", "eval/win_rate", ">="), ("max_kl", "eval/kl", "<="),
              ("min_reward_accuracy", "reward/eval_accuracy", ">="), ("min_property_rate", "eval/property_rate", ">="),
              ("min_gold_agreement", "eval/gold_agreement", ">=")]
    ok, lines = True, []
    for field_name, metric, op in checks:
        limit = getattr(gates, field_name)
        if limit is None:
            continue
        value = metrics.get(metric)
        passed = value is not None and (value >= limit if op == ">=" else value <= limit)
        ok &= passed
        shown = "missing" if value is None else f"{value:.4g}"
        lines.append(f"{'PASS' if passed else 'FAIL'} {metric} = {shown} (gate {op} {limit})")
    return ok, lines


class Pipeline:
    """The stages as steps on one registry; the pipeline CLI and the retrain loop compose them."""

    def __init__(self, cfg: PipelineConfig, *, launcher: Launcher | None = None, log=print):  # noqa: ANN001
        self.cfg = cfg
        self.run = Path(cfg.output_dir) / cfg.run_name
        self.run.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(cfg.registry or Path(cfg.output_dir) / "registry")
        self._launcher = launcher
        self.log = lambda msg: log(f"[pipeline] {msg}", flush=True)
        self.service = None
        self.fc = None
        self.campaign: dict | None = None

    @property
    def launcher(self) -> Launcher:
        if self._launcher is None:
            self._launcher = Launcher(self.cfg.ray)
        return self._launcher

    # -------------------------------------------------------------- validation before any work
    def check(self) -> None:
        """Validate every stage config (with placeholder links) and the data files before anything runs."""
        from alignloop.evaluate import read_eval_prompts, read_gold

        c = self.cfg
        if c.sft is not None and c.base_policy is None:
            build_stage_config("sft", c.sft, {}, "sft")
        build_stage_config("reward", c.reward, self._reward_links("<policy>", "<pairs>"), "reward")
        build_stage_config(c.policy.algo, c.policy, self._policy_links("<policy>", "<reward>", "<pairs>"), "policy")
        read_eval_prompts(c.candidates.prompts, c.candidates.limit)
        read_eval_prompts(c.evaluate.prompts, c.evaluate.limit)
        if c.feedback.gold:
            read_gold(c.feedback.gold)
        if c.evaluate.property:
            from ppo.rewards import import_callable

            import_callable(c.evaluate.property)
        if c.feedback.source == "simulated":
            from ppo.rewards import import_callable

            import_callable(c.feedback.simulated.utility)

    @staticmethod
    def _reward_links(policy: str, pairs: str) -> dict:
        return {"model.path": policy, "data.train": pairs, "data.feedback": None}

    def _policy_links(self, policy: str, reward: str, pairs: str) -> dict:
        if self.cfg.policy.algo == "ppo":
            return {"model.path": policy, "reward.model": reward}
        return {"model.path": policy, "data.train": pairs, "data.feedback": None, "online": None}

    # -------------------------------------------------------------- generic stage runner
    def run_stage(self, kind: str, ref: StageRef, links: dict, parents: list[Artifact], label: str) -> Artifact:
        tree = build_stage_config(kind, ref, links, label)
        ident = identity(tree, links)
        inputs = file_inputs(ident)
        key = self.registry.make_key(kind, ident, inputs, parents)
        found = self.registry.find(kind, key)
        if found is not None:
            self.log(f"{label}: inputs and config unchanged -> skipped, reusing {found.id} (v{found.version})")
            return found
        slot = self.registry.slot(kind, key)
        resume = (slot / "run" / "metrics.jsonl").is_file()
        tree.update(output_dir=str(slot.resolve()), run_name="run", resume=resume)
        slot.mkdir(parents=True, exist_ok=True)
        cfg_file = slot / "stage.yaml"
        cfg_file.write_text(yaml.safe_dump(tree, sort_keys=False))
        self.log(f"{label}: {'resuming' if resume else 'running'} alignloop {kind} -> {slot}"
                 + (f" (parents: {', '.join(p.id for p in parents)})" if parents else ""))
        t0 = time.time()
        rc = self.launcher.call("alignloop.pipeline:_stage_cli", [kind, ["--config", str(cfg_file)]],
                                cpus=ref.num_cpus, gpus=ref.num_gpus, name=f"alignloop-{kind}")
        if rc:
            raise PipelineError(f"stage {label} (alignloop {kind}) failed with exit code {rc}; its run directory: "
                                f"{slot / 'run'} (re-running resumes it)")
        metrics = _stage_metrics(kind, slot / "run")
        art = self.registry.commit(kind, key, config=tree, parents=parents, inputs=inputs, content=slot / "run" / "final",
                                   metrics=metrics, seconds=round(time.time() - t0, 1))
        self.log(f"{label}: done in {art.seconds:.0f}s -> {art.id} (v{art.version})"
                 + (f" {json.dumps(metrics)}" if metrics else ""))
        return art

    # -------------------------------------------------------------- steps
    def base(self) -> Artifact:
        """The starting policy: the SFT stage's output, or base_policy registered as an imported model artifact."""
        c = self.cfg
        if c.base_policy is None:
            assert c.sft is not None
            return self.run_stage("sft", c.sft, {}, [], "sft")
        return self.import_model(c.base_policy)

    def import_model(self, ref: str) -> Artifact:
        """A model directory (or a registry artifact id) as a policy artifact."""
        try:
            return self.registry.get(ref)
        except KeyError:
            pass
        path = Path(ref)
        if ref == "smollm2" or not path.exists():
            from alignloop.models import resolve_model_path

            path = Path(resolve_model_path(ref))
        content = hash_path(path)
        key = self.registry.make_key("model", {"content": content}, {}, [])
        found = self.registry.find("model", key)
        if found:
            return found
        slot = self.registry.slot("model", key)
        (slot / "run").mkdir(parents=True, exist_ok=True)
        link = slot / "run" / "final"
        if not link.exists():
            link.symlink_to(path.resolve(), target_is_directory=True)
        return self.registry.commit("model", key, config={"source": str(path.resolve())}, parents=[], inputs={},
                                    content=link, extra={"source": str(path.resolve())})

    def connect(self) -> None:
        """Start (or reach) the feedback service and make sure the campaign exists."""
        from alignloop.feedback_link import EmbeddedService, FeedbackClient, ensure_campaign

        if self.fc is not None:
            return
        f = self.cfg.feedback
        if f.url is None:
            self.service = EmbeddedService(self.run / "feedback", port=f.port, db=f.db).start()
            url, token = self.service.url, self.service.admin_token
            self.service_id = f.db or str((self.run / "feedback" / "feedback.db").resolve())
            self.log(f"feedback service on {url} (web page {url}/ ; data in {self.run / 'feedback'})")
        else:
            url, token = f.url, os.environ.get(f.token_env, "")
            if not token:
                raise ConfigError(f"feedback.url={f.url}: set the admin token in ${f.token_env}")
            self.service_id = url
        self.fc = FeedbackClient(url, token, retries=3)
        self.url = url
        self.campaign = ensure_campaign(self.fc, f.campaign, f.guidelines, f.overlap)
        if f.gold:
            from alignloop.evaluate import read_gold

            gold = [{"messages": g["messages"], "gold_best": g["gold_best"],
                     "answers": [{"text": a, "model_id": "gold"} for a in g["answers"]]} for g in read_gold(f.gold)]
            r = self.fc.add_items(self.campaign["id"], gold)
            if r["created"]:
                self.log(f"{r['created']} gold items added to campaign {f.campaign!r}")

    def campaign_gold(self) -> list[dict]:
        """The campaign's gold items (known best answer), as evaluation gold: {messages, answers, gold_best}."""
        self.connect()
        out = []
        for it in self.fc.iter_items(self.campaign["id"]):
            gold = it.get("gold_answer_id")
            if gold is None:
                continue
            ids = [a["id"] for a in it["answers"]]
            msgs = it.get("messages") or [{"role": "user", "content": it["prompt"]}]
            out.append({"messages": msgs, "answers": [a["text"] for a in it["answers"]], "gold_best": ids.index(gold)})
        return out

    def close(self) -> None:
        if self.fc is not None:
            self.fc.close()
            self.fc = None
        if self.service is not None:
            self.service.stop()
            self.service = None

    def candidates(self, policy: Artifact, seed: int | None = None) -> Artifact:
        """Sample answers from ``policy`` and push them to the campaign as new items (provenance attached)."""
        from alignloop.feedback_link import candidate_items

        self.connect()
        c = self.cfg.candidates
        if seed is not None:
            c = c.model_copy(update={"seed": seed})
        ident = {"candidates": c.model_dump(mode="json"), "service": self.service_id, "campaign": self.cfg.feedback.campaign}
        inputs = file_inputs({"prompts": c.prompts})
        key = self.registry.make_key("candidates", ident, inputs, [policy])
        found = self.registry.find("candidates", key)
        if found is not None:
            self.log(f"candidates: unchanged -> skipped, reusing {found.id} ({found.extra.get('items')} items already pushed)")
            return found
        t0 = time.time()
        rows = self.launcher.call("alignloop.pipeline:generate_candidates",
                                  [str(policy.final), c.prompts, c.limit, c.answers_per_prompt, c.max_new_tokens,
                                   c.temperature, c.top_p, c.engine, c.seed], name="alignloop-candidates")
        sampling = {"temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens, "seed": c.seed}
        items = candidate_items([r["messages"] for r in rows], [r["answers"] for r in rows], model_id=policy.id,
                                model_version=str(policy.version), sampling=sampling)
        slot = self.registry.slot("candidates", key)
        slot.mkdir(parents=True, exist_ok=True)
        with open(slot / "items.jsonl", "w") as fh:
            for it in items:
                fh.write(json.dumps(it) + "\n")
        res = self.fc.add_items(self.campaign["id"], items)
        self.log(f"candidates: {len(items)} items ({c.answers_per_prompt} answers each from {policy.id}) -> campaign "
                 f"{self.cfg.feedback.campaign!r}: {res['created']} new, {res['duplicates']} already there")
        return self.registry.commit("candidates", key, config=ident, parents=[policy], inputs=inputs,
                                    content=slot / "items.jsonl", seconds=round(time.time() - t0, 1),
                                    extra={"items": len(items), "created": res["created"], "campaign": self.cfg.feedback.campaign,
                                           "campaign_id": self.campaign["id"]})

    def collect(self, since_watermark: int = 0) -> dict:
        """Rankings: scripted labelers rank now, or wait for people, or take what is there."""
        from alignloop.feedback_link import ensure_labelers, wait_for_rankings

        self.connect()
        f = self.cfg.feedback
        cid = self.campaign["id"]
        if f.source == "simulated":
            from alignloop.labelers import LabelerSpec, run_labelers
            from ppo.rewards import import_callable

            s = f.simulated
            names = [f"sim-{i + 1}" for i in range(s.count)]
            tokens = ensure_labelers(self.fc, names, self.run / "feedback" / "labeler_tokens.json")
            specs = [LabelerSpec(n, noise=s.noise, contrarian=s.contrarian_rate if i >= s.count - s.contrarians else 0.0,
                                 seed=s.seed * 1000 + i) for i, n in enumerate(names)]
            t0 = time.time()
            counts = run_labelers(self.url, tokens, cid, import_callable(s.utility), specs)
            self.log(f"feedback: {s.count} simulated labelers ranked {sum(counts.values())} items in "
                     f"{time.time() - t0:.1f}s ({counts})")
        elif f.source == "wait":
            wait_for_rankings(self.fc, cid, since_watermark, f.min_new_rankings, f.timeout_s, f.poll_s)
        return self.fc.stats(cid, since_watermark=since_watermark)

    def export(self, since_watermark: int | None = None, reuse_unchanged: bool = True) -> Artifact:
        """A new export version when there is feedback newer than the last export of this campaign; else the last one
        (``reuse_unchanged=False``: always a new version)."""
        self.connect()
        f = self.cfg.feedback
        cid = self.campaign["id"]
        where = {"service": self.service_id, "campaign": f.campaign}
        last = self.registry.latest("feedback", where)
        st = self.fc.stats(cid, since_watermark=last.extra["watermark"] if last else 0)
        if reuse_unchanged and last is not None and st["rankings_since"] == 0:
            self.log(f"export: no rankings since watermark {last.extra['watermark']} -> skipped, reusing {last.id} "
                     f"(export v{last.extra['export_id']}, {last.extra['rows']} pairs)")
            return last
        since = since_watermark if since_watermark is not None else (last.extra["watermark"] if (f.incremental and last) else None)
        ex = self.fc.export(cid, strategy=f.strategy, aggregation=f.aggregation, min_rankings=f.min_rankings,
                            max_disagreement=f.max_disagreement, since_watermark=since)
        if not ex.rows:
            raise PipelineError(f"campaign {f.campaign!r}: the export (since watermark {since or 0}) has no preference pairs "
                                f"({st['rankings']} rankings in all): rank some items first")
        key = self.registry.make_key("feedback", {**where, "export_id": ex.version}, {}, [])
        slot = self.registry.slot("feedback", key)
        slot.mkdir(parents=True, exist_ok=True)
        from feedback_service.client import write_jsonl

        write_jsonl(ex.rows, slot / "pairs.jsonl")
        extra = {**where, "export_id": ex.version, "watermark": ex.watermark, "since": since or 0, "rows": len(ex.rows),
                 "campaign_id": cid}
        art = self.registry.commit("feedback", key, config={**where, "strategy": f.strategy, "aggregation": f.aggregation},
                                   parents=[], inputs={}, content=slot / "pairs.jsonl", extra=extra)
        self.log(f"export: v{ex.version} of campaign {f.campaign!r}: {len(ex.rows)} preference pairs "
                 f"(rankings {since or 0}..{ex.watermark}) -> {art.id}")
        return art

    def reward(self, policy: Artifact, feedback: Artifact, pairs: Path | None = None) -> Artifact:
        pairs = pairs or feedback.path / "pairs.jsonl"
        return self.run_stage("reward", self.cfg.reward, self._reward_links(str(policy.final), str(pairs)),
                              [policy, feedback], "reward")

    def policy(self, policy: Artifact, reward: Artifact, feedback: Artifact) -> Artifact:
        p = self.cfg.policy
        links = self._policy_links(str(policy.final), str(reward.final), str(feedback.path / "pairs.jsonl"))
        parents = [policy, reward] if p.algo == "ppo" else [policy, feedback]
        return self.run_stage(p.algo, p, links, parents, f"policy ({p.algo})")

    def evaluate(self, policy: Artifact, parent: Artifact, reward: Artifact) -> Artifact:
        from alignloop.evaluate import summary

        e = self.cfg.evaluate
        gold_items = self.campaign_gold()
        ident = {"evaluate": e.model_dump(mode="json"), "gold": stable_hash(gold_items)}
        inputs = file_inputs({"prompts": e.prompts})
        parents = [policy, parent, reward]
        key = self.registry.make_key("eval", ident, inputs, parents)
        found = self.registry.find("eval", key)
        if found is not None:
            self.log(f"evaluate: unchanged -> skipped, reusing {found.id}")
            return found
        slot = self.registry.slot("eval", key)
        slot.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        result = self.launcher.call(
            "alignloop.evaluate:evaluate_policy", [str(policy.final), str(parent.final), str(reward.final), e.prompts],
            {"limit": e.limit, "max_new_tokens": e.max_new_tokens, "engine": e.engine, "seed": e.seed,
             "property_fn": e.property, "gold_items": gold_items, "out_path": str(slot / "eval.json")},
            cpus=e.num_cpus, name="alignloop-evaluate")
        metrics = summary(result)
        if "eval/accuracy" in reward.metrics:
            metrics["reward/eval_accuracy"] = reward.metrics["eval/accuracy"]
        art = self.registry.commit("eval", key, config=ident, parents=parents, inputs=inputs, content=slot / "eval.json",
                                   metrics=metrics, seconds=round(time.time() - t0, 1),
                                   extra={"policy": policy.id, "parent": parent.id, "reward": reward.id})
        self.log(f"evaluate: {art.id} in {art.seconds:.0f}s")
        return art

    # -------------------------------------------------------------- the whole run
    def run_all(self) -> dict:
        t0 = time.time()
        self.check()
        dump_config(self.cfg, self.run / "pipeline.yaml")
        try:
            base = self.base()
            self.candidates(base)
            stats = self.collect()
            self.log(f"feedback: campaign {self.cfg.feedback.campaign!r} has {stats['rankings']} rankings of "
                     f"{stats['items']} items from {stats['labelers']} labelers")
            fb = self.export()
            rm = self.reward(base, fb)
            pol = self.policy(base, rm, fb)
            ev = self.evaluate(pol, base, rm)
            ok, lines = gate_decision(self.cfg.gates, ev.metrics)
            decision = {"gates_pass": ok, "gates": lines}
            if self.cfg.promote:
                if ok:
                    decision["promoted"] = self.registry.promote(pol, "pipeline: gates passed", eval=ev.id)
                else:
                    decision["promoted"] = None
            report = write_report(self.run, base, fb, rm, pol, ev, decision, time.time() - t0)
        finally:
            if self.service is not None and not os.environ.get("ALIGNLOOP_KEEP_SERVICE"):
                self.close()
        return report


class PipelineError(RuntimeError):
    pass


def _stage_metrics(kind: str, run: Path) -> dict:
    """A stage's headline numbers for the artifact record."""
    out: dict[str, Any] = {}
    if kind == "reward" and (run / "eval.json").is_file():
        ev = json.loads((run / "eval.json").read_text())
        out = {k: ev[k] for k in ("eval/accuracy", "eval/ece", "eval/loss") if isinstance(ev.get(k), (int, float))}
    mfile = run / "metrics.jsonl"
    if mfile.is_file():
        rows = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
        if rows:
            last = rows[-1]
            for k in ("loss/sft", "eval/loss", "reward/mean", "ppo/kl", "loss/dpo", "dpo/accuracy"):
                if isinstance(last.get(k), (int, float)):
                    out.setdefault(k, last[k])
            out["steps"] = last.get("step")
    return out


# --------------------------------------------------------------------------------- report and plots
def write_report(run: Path, base: Artifact, fb: Artifact, rm: Artifact, pol: Artifact, ev: Artifact, decision: dict,
                 seconds: float) -> dict:
    from alignloop.plots import plot_policy_run

    result = json.loads((ev.path / "eval.json").read_text())
    plots = []
    p = plot_policy_run(pol.run, run / "policy_training.png")
    if p:
        plots.append(str(p))
    cal = rm.run / "calibration.png"
    if cal.is_file():
        import shutil

        shutil.copy(cal, run / "reward_calibration.png")
        plots.append(str(run / "reward_calibration.png"))
    report = {"seconds": round(seconds, 1), "artifacts": {"base": base.id, "feedback": fb.id, "reward": rm.id,
                                                          "policy": pol.id, "eval": ev.id},
              "export": {k: fb.extra.get(k) for k in ("export_id", "watermark", "rows")},
              "reward": rm.metrics, "eval": ev.metrics, "decision": decision, "plots": plots,
              "policy_final": str(pol.final)}
    (run / "summary.json").write_text(json.dumps(report, indent=1))
    print(format_table(result, ev.metrics, rm.metrics), flush=True)
    for line in decision.get("gates", []):
        print(f"[pipeline] gate {line}", flush=True)
    print(f"[pipeline] done in {seconds:.0f}s: policy {pol.id} -> {pol.final}; summary {run / 'summary.json'}"
          + (f"; plots {', '.join(plots)}" if plots else ""), flush=True)
    return report


def format_table(result: dict, metrics: dict, reward_metrics: dict, show: int = 3) -> str:
    par, pol = result["parent"], result["policy"]
    rows = [("answers with the preferred property", par.get("property_rate"), pol.get("property_rate"), "{:.0%}"),
            ("reward-model score (mean)", par.get("reward"), pol.get("reward"), "{:+.3f}"),
            ("answer length (words)", par["length_words"], pol["length_words"], "{:.1f}"),
            ("answer length (tokens)", par["length_tokens"], pol["length_tokens"], "{:.1f}")]
    w = 104
    lines = ["", "=" * w, f"{'held-out prompts: ' + str(len(result['prompts'])):<44}{'before (parent policy)':<30}{'after (RLHF policy)':<30}",
             "-" * w]
    for name, a, b, fmt in rows:
        if a is None or b is None:
            continue
        lines.append(f"{name:<44}{fmt.format(a):<30}{fmt.format(b):<30}")
    lines.append(f"{'KL(after || before) per answer (nats)':<44}{'0':<30}{result['kl']:<30.3f}")
    if "win_rate" in result:
        lines.append(f"{'win-rate of after vs before (reward model)':<44}{'':<30}{result['win_rate']:<30.0%}")
    if "gold_agreement" in result:
        lines.append(f"{'agreement with gold answers':<44}{'':<30}{result['gold_agreement']:<30.0%}")
    if "eval/accuracy" in reward_metrics:
        lines.append(f"{'reward model held-out pair accuracy':<44}{reward_metrics['eval/accuracy']:<30.3f}")
    lines.append("=" * w)
    import textwrap

    for i in range(min(show, len(result["prompts"]))):
        lines.append(f"prompt: {result['prompts'][i][:96]}")
        a = textwrap.wrap(par["answers"][i].replace("\n", " | "), 48)[:4] or [""]
        b = textwrap.wrap(pol["answers"][i].replace("\n", " | "), 48)[:4] or [""]
        for j in range(max(len(a), len(b))):
            lines.append(f"  {(a[j] if j < len(a) else ''):<50}  {(b[j] if j < len(b) else ''):<50}")
        lines.append("-" * w)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def _body(argv: list[str]) -> int:
    from alignloop.stage import parse_stage_args, quiet_env

    quiet_env()
    cfg = parse_stage_args("pipeline", PipelineConfig, argv)
    pipe = Pipeline(cfg)
    try:
        pipe.run_all()
    except PipelineError as e:
        print(f"alignloop pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    from alignloop.stage import run_stage

    return run_stage("pipeline", _body, argv)


__all__ = ["Pipeline", "PipelineConfig", "PipelineError", "as_overrides", "build_stage_config", "gate_decision"]
