"""`alignloop plan`: memory arithmetic by hand, LoRA counts against peft, license
detection, the CLI end to end on a tiny model directory and the packaged GGUF,
and the error cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop import plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# ---------------------------------------------------------------- arithmetic


def test_nf4_bytes_per_param():
    # 4 bits + 8-bit constant per 64 weights + fp32 constant per 64*256 weights
    assert plan.nf4_bytes_per_param(double_quant=True) == (4 + 8 / 64 + 32 / 16384) / 8 == 0.515869140625
    # 4 bits + fp32 constant per 64 weights
    assert plan.nf4_bytes_per_param(double_quant=False) == 0.5625


def test_lora_param_count_by_hand():
    assert plan.lora_param_count([(10, 20)], 4) == 4 * 30
    assert plan.lora_param_count([(10, 20), (20, 5)], 2) == 60 + 50
    assert plan.lora_param_count([], 16) == 0


# 1e9 parameters on 8 GPUs, largest layer 1e8, LoRA 1e7, 8e8 quantizable.
P, LL, LORA, Q, N = 10**9, 10**8, 10**7, 8 * 10**8, 8
NF4 = 0.515869140625


@pytest.mark.parametrize(
    "method,strategy,gpu,cpu",
    [
        # full: 2P + 14P/N = 2e9 + 1.75e9
        ("full", "zero2", 3.75e9, 0),
        # full: 16P/N + 4*LL = 2e9 + 4e8
        ("full", "zero3", 2.4e9, 0),
        # offload: 4*LL on the GPU, 16P on the CPU of the single node
        ("full", "zero3_offload", 4e8, 1.6e10),
        # LoRA: frozen bf16 base 2P + 2*LORA + 14*LORA/N = 2e9 + 2e7 + 1.75e7
        ("lora", "zero2", 2.0375e9, 0),
        # LoRA: (2P + 16*LORA)/N + 4*LL = 2.7e8 + 4e8
        ("lora", "zero3", 6.7e8, 0),
        ("lora", "zero3_offload", 4e8, 2.16e9),
        # QLoRA: frozen = NF4*Q + 2*(P-Q) = 412695312.5 + 4e8; + 2e7 + 1.75e7
        ("qlora", "zero2", 850195312.5, 0),
        # QLoRA: (812695312.5 + 1.6e8)/8 + 4e8
        ("qlora", "zero3", 521586914.0625, 0),
        ("qlora", "zero3_offload", 4e8, 972695312.5),
    ],
)
def test_model_state_bytes_by_hand(method, strategy, gpu, cpu):
    got = plan.model_state_bytes(
        method,
        strategy,
        params=P,
        lora_params=LORA,
        quantized_params=Q,
        largest_layer_params=LL,
        world_size=N,
        nodes=1,
        nf4_bytes=NF4,
    )
    assert got == pytest.approx((gpu, cpu), rel=1e-12)


def test_offload_cpu_ram_splits_over_nodes():
    gpu, cpu = plan.model_state_bytes(
        "full", "zero3_offload", params=P, lora_params=0, quantized_params=0, largest_layer_params=LL, world_size=16, nodes=2
    )
    assert (gpu, cpu) == (4e8, 8e9)
    assert plan.cpu_ram_with_buffer(8e9) == 1.2e10


def test_against_deepspeed_estimators():
    # DeepSpeed 0.19's own estimators count 18 bytes per partitioned parameter (2 bf16 weight + 4 fp32
    # gradient + 12 Adam) where the ZeRO paper, and this command, count 16 (2 + 2 + 12): 2 bytes more
    # under ZeRO-3; under ZeRO-2 DeepSpeed adds those 18 on top of the whole bf16 weights (2 + 18/N)
    # where the paper has 2 + 14/N, 4 bytes more. Otherwise the formulas agree.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as ds3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as ds2

    kw = dict(params=P, lora_params=0, quantized_params=0, largest_layer_params=LL, world_size=N, nodes=1)
    _, ds_gpu2 = ds2(P, num_gpus_per_node=N, num_nodes=1, cpu_offload=False)
    assert plan.model_state_bytes("full", "zero2", **kw)[0] == ds_gpu2 - 4 * P / N
    _, ds_gpu3, ds_largest = ds3(P, LL, num_gpus_per_node=N, num_nodes=1, cpu_offload=False)
    assert plan.model_state_bytes("full", "zero3", **kw)[0] == ds_gpu3 - 2 * P / N
    ds_cpu, ds_gpu_off, _ = ds3(P, LL, num_gpus_per_node=N, num_nodes=1, cpu_offload=True, cpu_offload_params=True)
    gpu, cpu = plan.model_state_bytes("full", "zero3_offload", **kw)
    assert gpu == ds_gpu_off == ds_largest
    assert plan.cpu_ram_with_buffer(cpu) == pytest.approx(ds_cpu * 16 / 18)


def test_activation_bytes_by_hand():
    # Llama-7B-like: s=2048, b=1, h=4096, a=32, L=32, V=32000
    kw = dict(seq_len=2048, micro_batch=1, hidden=4096, num_layers=32, num_heads=32, vocab=32000)
    per_layer = 2048 * 4096 * 34  # 285,212,672
    logits = 6 * 2048 * 32000  # 393,216,000
    assert per_layer == 285_212_672 and logits == 393_216_000
    assert plan.activation_bytes(checkpointing=False, **kw) == 32 * 285_212_672 + 393_216_000 == 9_520_021_504
    # checkpointing: layer inputs 2sbh per layer + one live layer + logits
    assert plan.activation_bytes(checkpointing=True, **kw) == 536_870_912 + 285_212_672 + 393_216_000
    # eager attention adds 5*a*s^2*b per layer
    eager = plan.activation_bytes(checkpointing=False, flash_attention=False, **kw)
    assert eager == 9_520_021_504 + 32 * 5 * 32 * 2048 * 2048
    # micro-batch scales linearly
    kw2 = dict(kw, micro_batch=4)
    assert plan.activation_bytes(checkpointing=False, **kw2) == 4 * 9_520_021_504


def _info(**kw):
    base = dict(
        path="x",
        format="hf",
        source="test",
        architecture="Test",
        name="x",
        params=P,
        num_layers=16,
        hidden_size=2048,
        num_heads=16,
        vocab_size=32000,
        largest_layer_params=LL,
        # 100 linear layers of 2048x2048 -> LoRA r=16: 100*16*4096
        linears=[(f"model.layers.{i}.mlp.up_proj", 2048, 2048) for i in range(100)],
    )
    base.update(kw)
    return plan.ModelInfo(**base)


def _settings(**kw):
    base = dict(
        gpus=8,
        nodes=1,
        gpu_mem_gib=80.0,
        seq_len=2048,
        micro_batch=1,
        lora_rank=16,
        lora_targets=["all-linear"],
        overhead_gib=2.0,
        flash_attention=True,
        double_quant=True,
    )
    base.update(kw)
    return plan.Settings(**base)


def test_build_plan_totals_and_recommendation_order():
    info, st = _info(), _settings()
    p = plan.build_plan(info, st)
    assert p["model"]["lora_params"] == 100 * 16 * 4096
    rows = {(r["method"], r["strategy"]): r for r in p["estimates"]}
    assert len(rows) == 9
    act = plan.activation_bytes(
        seq_len=2048, micro_batch=1, hidden=2048, num_layers=16, num_heads=16, vocab=32000, checkpointing=False
    )
    full2 = rows[("full", "zero2")]
    assert full2["total_gib"] == pytest.approx((3.75e9 + act) / GIB + 2.0)
    assert p["recommendation"]["method"] == "full" and p["recommendation"]["strategy"] == "zero2"
    assert p["recommendation"]["gradient_checkpointing"] is False

    # Short sequences: a budget between full ZeRO-3 and full ZeRO-2 (even with checkpointing):
    # ZeRO-3 wins, and the reason says why ZeRO-2 lost.
    short = plan.build_plan(info, _settings(seq_len=256))
    rows = {(r["method"], r["strategy"]): r for r in short["estimates"]}
    z2, z3 = rows[("full", "zero2")]["total_ckpt_gib"], rows[("full", "zero3")]["total_gib"]
    assert z3 < z2
    rec = plan.build_plan(info, _settings(seq_len=256, gpu_mem_gib=(z2 + z3) / 2))["recommendation"]
    assert (rec["method"], rec["strategy"], rec["gradient_checkpointing"]) == ("full", "zero3", False)
    assert rec["reason"].startswith("full fine-tuning, ZeRO-2 needs")

    # Long sequences: full ZeRO-2 fits only with gradient checkpointing, which is preferred to ZeRO-3.
    rows = {(r["method"], r["strategy"]): r for r in plan.build_plan(info, _settings(seq_len=32768))["estimates"]}
    lo, hi = rows[("full", "zero2")]["total_ckpt_gib"], rows[("full", "zero2")]["total_gib"]
    assert lo < hi
    rec = plan.build_plan(info, _settings(seq_len=32768, gpu_mem_gib=(lo + hi) / 2))["recommendation"]
    assert (rec["method"], rec["strategy"], rec["gradient_checkpointing"]) == ("full", "zero2", True)
    assert "checkpointing" in rec["reason"]

    # 70B parameters on 8 GPUs of 40 GiB: full ZeRO-3 needs 16*7e10/8 bytes (130 GiB) of states, LoRA
    # ZeRO-2 a whole bf16 base (130 GiB), LoRA ZeRO-3 fits: 2*7e10/8 + 4*1e9 bytes plus adapters.
    big = _info(params=7 * 10**10, largest_layer_params=10**9)
    p = plan.build_plan(big, _settings(seq_len=256, gpu_mem_gib=40))
    rows = {(r["method"], r["strategy"]): r for r in p["estimates"]}
    assert rows[("full", "zero3")]["model_states_gib"] == pytest.approx(16 * 7e10 / 8 / GIB + 4e9 / GIB)
    assert rows[("lora", "zero3")]["model_states_gib"] == pytest.approx((2 * 7e10 + 16 * 100 * 16 * 4096) / 8 / GIB + 4e9 / GIB)
    rec = p["recommendation"]
    assert (rec["method"], rec["strategy"], rec["gradient_checkpointing"]) == ("lora", "zero3", False)
    assert rec["reason"].startswith("full fine-tuning, ZeRO-2 needs")

    # Nothing fits.
    p = plan.build_plan(info, _settings(gpu_mem_gib=0.5))
    assert p["recommendation"]["setup"] is None
    assert "nothing fits" in p["recommendation"]["reason"]
    assert not any(r["fits"] or r["fits_ckpt"] for r in p["estimates"])


def test_lora_targets_selection():
    linears = [("a.q_proj", 4, 4), ("a.v_proj", 4, 2), ("a.xq_proj", 4, 4), ("v_proj", 1, 1)]
    assert plan.select_lora_targets(linears, ["all-linear"]) == linears
    assert plan.select_lora_targets(linears, ["q_proj", "v_proj"]) == [linears[0], linears[1], linears[3]]
    with pytest.raises(plan.PlanError, match="no linear layer matches"):
        plan.build_plan(_info(), _settings(lora_targets=["nope"]))


# ---------------------------------------------------------------- tiny models

TINY_LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(d)
    return d


def _peft_trainable(model, targets, rank):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=rank, target_modules=targets))
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets,rank", [("all-linear", 16), (["q_proj", "v_proj"], 8)])
def test_lora_count_matches_peft_llama(tiny_llama_dir, targets, rank):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected = _peft_trainable(model, targets, rank)
    info = plan.inspect_model(str(tiny_llama_dir))
    assert info.params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    tlist = [targets] if isinstance(targets, str) else targets
    p = plan.build_plan(info, _settings(lora_rank=rank, lora_targets=tlist))
    assert p["model"]["lora_params"] == expected
    assert expected > 0


def test_lora_count_matches_peft_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.save_pretrained(tmp_path)
    n_params = sum(p.numel() for p in model.parameters())
    expected = _peft_trainable(model, "all-linear", 4)
    info = plan.inspect_model(str(tmp_path))
    assert info.params == n_params
    assert plan.build_plan(info, _settings(lora_rank=4))["model"]["lora_params"] == expected


def test_safetensors_header_fallback(tiny_llama_dir, tmp_path):
    # An architecture transformers does not know: parameters come from the safetensors headers.
    import shutil

    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "made-up-arch"
    cfg["architectures"] = ["MadeUpForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    meta = plan.inspect_model(str(tiny_llama_dir))
    info = plan.inspect_model(str(tmp_path))
    assert info.source.startswith("safetensors headers")
    assert info.params == meta.params
    assert sorted(info.linears) == sorted(meta.linears)
    assert info.largest_layer_params == meta.largest_layer_params


# ---------------------------------------------------------------- license


def test_license_from_readme_front_matter(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlanguage: en\nlicense: other\nlicense_name: my-model-license\nlicense_link: LICENSE\ntags: [a]\n---\n# Model\n"
        "license: mit appears in the body and is not front matter\n"
    )
    found = plan.find_license(tmp_path)
    assert found == [
        {"source": "README.md front matter license", "text": "other"},
        {"source": "README.md front matter license_name", "text": "my-model-license"},
        {"source": "README.md front matter license_link", "text": "LICENSE"},
    ]
    assert plan.license_from_readme("# no front matter\nlicense: mit\n") == []
    # a horizontal rule later in the card is not front matter
    assert plan.license_from_readme("# Title\n---\nlicense: mit\n---\n") == []
    assert plan.license_from_readme("---\nlicense: [apache-2.0, mit]\n---\n") == [("license", "apache-2.0, mit")]
    # YAML that does not parse still yields the key
    assert plan.license_from_readme("---\nlicense: llama3\nbad: [unclosed\n---\n") == [("license", "llama3")]


def test_license_file_and_missing(tmp_path):
    assert plan.find_license(tmp_path) == []
    (tmp_path / "LICENSE.txt").write_text("\n\n   Apache License\n   Version 2.0, January 2004\n  http://www.apache.org/\n")
    assert plan.find_license(tmp_path) == [{"source": "LICENSE.txt", "text": "Apache License / Version 2.0, January 2004"}]


def test_cli_license_lines(tiny_llama_dir, tmp_path, capsys):
    import shutil

    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert plan.main(["--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "license (what the model files say):\n  no license information found in the model files" in out
    (tmp_path / "LICENSE").write_text("MIT License\n\nCopyright (c) 2026 someone\n")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert plan.main(["--model", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["license_summary"] == ["README.md front matter license: mit", "LICENSE: MIT License / Copyright (c) 2026 someone"]


# ---------------------------------------------------------------- CLI end to end


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "alignloop.cli", "plan", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_tiny_model_dir_json(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    r = _cli("--model", str(tiny_llama_dir), "--gpus", "2", "--gpu-mem", "80", "--seq-len", "128", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    n = sum(p.numel() for p in model.parameters())
    assert data["model"]["params"] == n
    assert data["settings"]["world_size"] == 2
    full2 = next(e for e in data["estimates"] if (e["method"], e["strategy"]) == ("full", "zero2"))
    assert full2["model_states_gib"] * GIB == pytest.approx(2 * n + 14 * n / 2)
    assert data["recommendation"]["setup"] == "full fine-tuning, ZeRO-2, no gradient checkpointing"
    assert data["license_summary"] == ["no license information found in the model files"]


def test_cli_packaged_gguf():
    r = _cli("--model", "smollm2", "--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "134,515,008" in out  # the dequantized LlamaForCausalLM has 134.5M parameters
    assert "general.license (GGUF metadata): apache-2.0" in out
    assert "recommendation: full fine-tuning, ZeRO-2, no gradient checkpointing" in out
    for name in ("ZeRO-2", "ZeRO-3", "ZeRO-3 + offload", "LoRA", "QLoRA", "CPU RAM/node"):
        assert name in out


@pytest.fixture(scope="module")
def smollm2_info():
    # Reading the GGUF header takes a few seconds (49k tokenizer strings): read it once.
    path = plan.smollm2_path()
    assert path.is_file() and path.suffix == ".gguf"
    return plan.inspect_model(str(path))


def test_gguf_counts_match_llama_architecture(smollm2_info):
    info = smollm2_info
    assert info.format == "gguf" and info.params == 134_515_008
    assert (info.num_layers, info.hidden_size, info.num_heads, info.vocab_size) == (30, 576, 9, 49152)
    assert info.largest_layer_params == 49152 * 576  # the (tied) token embedding
    assert info.license == [{"source": "general.license (GGUF metadata)", "text": "apache-2.0"}]
    # LoRA r=16 on q,k,v,o (kv dim 3 heads x 64 = 192) and gate,up,down (1536), 30 layers
    h, kv, f, r = 576, 192, 1536, 16
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))
    p = plan.build_plan(info, _settings())
    assert p["model"]["lora_params"] == 30 * per_layer == 4_884_480
    # the quantizable (linear) weights: everything but the embedding and the norms
    assert p["model"]["quantizable_params"] == 30 * (2 * h * h + 2 * h * kv + 3 * h * f)
    qv = plan.build_plan(info, _settings(lora_targets=["q_proj", "v_proj"]))
    assert qv["model"]["lora_params"] == 30 * r * ((h + h) + (h + kv))
    # JSON-able, and nothing fits below the 2 GiB fixed overhead
    small = json.loads(json.dumps(plan.build_plan(info, _settings(gpus=1, gpu_mem_gib=0.5))))
    assert small["recommendation"]["setup"] is None


# ---------------------------------------------------------------- errors


def _one_line_error(capsys, argv, needle):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    return err


def test_error_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    err = _one_line_error(capsys, ["--model", str(missing)], str(missing))
    assert "does not exist" in err


def test_error_dir_without_config(tmp_path, capsys):
    (tmp_path / "README.md").write_text("hi")
    err = _one_line_error(capsys, ["--model", str(tmp_path)], str(tmp_path))
    assert "no config.json" in err and "pass that file" not in err
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    err = _one_line_error(capsys, ["--model", str(tmp_path)], str(tmp_path))
    assert "no config.json" in err and "m.Q4_0.gguf: pass that file as --model" in err


@pytest.mark.parametrize("content", ['{"model_type": "llama",\n  oops', "[1, 2]", b"\xff\xfe\x00bad"])
def test_error_unreadable_config(tmp_path, capsys, content):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _one_line_error(capsys, ["--model", str(tmp_path)], str(cfg))
    assert "cannot read config" in err


def test_error_unknown_architecture_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "made-up-arch", "hidden_size": 8}))
    err = _one_line_error(capsys, ["--model", str(tmp_path)], str(tmp_path))
    assert "cannot count parameters" in err and "no *.safetensors" in err


def test_error_not_a_model_file_and_bad_gguf(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0" * 16)
    _one_line_error(capsys, ["--model", str(f)], str(f))
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"GGUF" + b"\x00" * 12)
    err = _one_line_error(capsys, ["--model", str(g)], str(g))
    assert "cannot read GGUF" in err


def test_error_bad_arguments_via_cli(tmp_path):
    r = _cli("--model", str(tmp_path / "nope"), "--gpus", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"alignloop plan: error: {tmp_path / 'nope'}: model path does not exist"]
    r = _cli("--model", "smollm2", "--gpus", "0")
    assert r.returncode == 2 and "--gpus" in r.stderr
