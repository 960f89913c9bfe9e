"""Device placement: the model on the strategy's device, every batch moved there before the forward pass, results
back on the CPU (where the driver combines them, in process or through Ray).

There is no GPU here, so the strategies get a device of their own identity instead of one found by probing:
``cpu:0``, a real CPU device that compares unequal to ``cpu``. A trainer that skips the move, or builds its batches
for a hard-coded device, sends them somewhere else and fails the checks below.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
import torch

from alignloop.config import ConfigError, load_config
from ppo.experience import Experience, build_experience

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_DEVICE = torch.device("cpu", 0)


@pytest.fixture
def strategy_on_cpu0(monkeypatch):
    """Every strategy built from here on gets ``TRAIN_DEVICE`` (what ``train_device`` gives a CUDA process)."""
    import alignloop.strategy as S

    monkeypatch.setattr(S, "train_device", lambda use_gpu=False: TRAIN_DEVICE)


def _recorder(monkeypatch, module, calls: list):
    """Wrap ``module.to_device`` so every call records the device it was sent to."""
    real = module.to_device

    def to_device(batch, device):
        calls.append(device)
        return real(batch, device)

    monkeypatch.setattr(module, "to_device", to_device)


class _Spy:
    """Stands in for a tensor: remembers where ``.to`` sent it."""

    def __init__(self, device=None):
        self.device = device

    def to(self, device):
        return _Spy(device)


# ------------------------------------------------------------------ helpers


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_everything_stays_on_the_cpu_and_use_gpu_refuses():
    from alignloop.sections import DeepSpeedConfig, OptimConfig
    from alignloop.strategy import SingleStrategy, make_strategy, train_device

    assert train_device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="ray.use_gpu=true"):
        train_device(use_gpu=True)
    kw = dict(optim=OptimConfig(), ds=DeepSpeedConfig(), total_steps=2, micro_batch_size=1, grad_accum=1,
              dtype="float32")
    assert make_strategy("single", **kw).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="ray.use_gpu=true"):
        make_strategy("single", use_gpu=True, **kw)
    model = torch.nn.Linear(2, 2)
    weight = model.weight
    assert SingleStrategy(OptimConfig(), 2, 1).prepare(model).weight is weight  # already on the CPU: left as it is


def test_experience_to_moves_every_tensor_field_and_keeps_none_fields():
    required = [f.name for f in fields(Experience) if f.default is MISSING]
    optional = [f.name for f in fields(Experience) if f.default is not MISSING]
    exp = Experience(**{n: _Spy() for n in required})
    exp.values = _Spy()  # one optional field set, the others None
    out = exp.to(TRAIN_DEVICE)
    for f in fields(Experience):
        if getattr(exp, f.name) is None:
            assert getattr(out, f.name) is None, f.name
        else:
            assert getattr(out, f.name).device == TRAIN_DEVICE, f.name
            assert getattr(exp, f.name).device is None, f.name  # the original is left as it was
    assert set(required) | {"values"} < {f.name for f in fields(Experience)} == set(required) | set(optional)

    real = build_experience([[5, 6], [7]], [[8, 9, 2], [10]], [[-1.0, -2.0, -0.5], [-0.1]], {2}, 0)
    moved = real.to("cpu")
    for name, value in real.to_dict().items():
        if value is None:
            assert getattr(moved, name) is None
        else:
            torch.testing.assert_close(getattr(moved, name), value)


def test_batch_dicts_and_reward_batches_move_every_tensor(monkeypatch):
    import reward.trainer as T
    from alignloop.batching import to_device

    ids = torch.tensor([[1, 2]])
    out = to_device({"input_ids": ids, "note": "kept"}, "cpu")
    assert out["input_ids"] is ids and out["note"] == "kept"  # already there: no copy; other values untouched

    calls: list = []
    _recorder(monkeypatch, T, calls)
    b = T.Batch({"input_ids": ids}, _Spy(), _Spy(), _Spy(), tokens=3)
    moved = b.to(TRAIN_DEVICE)
    assert calls == [TRAIN_DEVICE]  # the model inputs
    assert [moved.index.device, moved.mask.device, moved.margin.device] == [TRAIN_DEVICE] * 3
    assert moved.tokens == 3 and b.index.device is None


# ------------------------------------------------------------------ PPO


def _ppo_cfg(tiny_model, tmp_path, *extra):
    from ppo.config import PPOConfig

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    return load_config(PPOConfig, None, [
        f"model.path={tiny_model}", f"data.prompts={tmp_path / 'p.jsonl'}", "reward.rules=[{fn: 'ppo.rewards:brevity'}]",
        "peft.method=full", "rollout.prompts_per_step=4", "train.micro_batch_size=2", *extra])


def test_policy_and_critic_work_on_the_strategy_device_and_return_cpu_tensors(tiny_model, tmp_path, monkeypatch,
                                                                              strategy_on_cpu0):
    from ppo.actor import CriticTrainer, PolicyTrainer

    calls = []
    real_to = Experience.to
    monkeypatch.setattr(Experience, "to", lambda self, device: (calls.append(device), real_to(self, device))[1])
    cfg = _ppo_cfg(tiny_model, tmp_path)
    actor, critic = PolicyTrainer(cfg, str(tiny_model)), CriticTrainer(cfg, str(tiny_model))
    assert actor.device == critic.device == TRAIN_DEVICE
    assert actor.ref is not None  # full fine-tuning: the frozen reference copy is used below as well

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    answers = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (4, 2, 5, 3)]
    exp = build_experience(prompts, answers, [[0.0] * len(a) for a in answers], set(), 0)
    exp.old_logprobs = actor.logprobs(exp)
    exp.ref_logprobs = actor.logprobs(exp, reference=True)
    exp.values = critic.values(exp)
    exp.advantages = torch.randn(exp.mask.shape, generator=g) * exp.mask
    exp.returns = exp.values + exp.advantages
    for t in (exp.old_logprobs, exp.ref_logprobs, exp.values):
        assert t.device == torch.device("cpu") and t.shape == exp.mask.shape
    assert calls == [TRAIN_DEVICE] * 3
    tokens = float(exp.mask.sum())
    sums = actor.train_mini_batch(exp, tokens, 0.1)
    csums = critic.train_mini_batch(exp, tokens)
    assert calls == [TRAIN_DEVICE] * 5  # each call moved its whole shard once, before any forward
    assert sums["tokens"] == csums["tokens"] == tokens
    assert all(isinstance(v, float) for v in [*sums.values(), *csums.values()])


# ------------------------------------------------------------------ SFT, reward, DPO


def _run_dir(tmp_path, name):
    run = tmp_path / name
    run.mkdir()
    return run


def test_sft_sends_every_micro_batch_to_the_strategy_device(tiny_model, tiny_data, tmp_path, monkeypatch,
                                                             strategy_on_cpu0):
    import sft.trainer as T
    from sft.config import SFTConfig

    calls: list = []
    _recorder(monkeypatch, T, calls)
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_model}", f"data.train={tiny_data}", "data.eval_fraction=0.25",
                                        "peft.method=full", "train.max_steps=1", "train.global_batch_size=4",
                                        "train.micro_batch_size=2"])
    T.train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(_run_dir(tmp_path, "sft"))})
    eval_batches = -(-8 // 2)  # 32 rows x 0.25 held out, micro-batches of 2
    assert calls == [TRAIN_DEVICE] * (2 + eval_batches)


def test_reward_sends_every_batch_to_the_strategy_device(tiny_model, tmp_path, monkeypatch, strategy_on_cpu0):
    import reward.trainer as T
    from reward.config import RewardConfig
    from reward.synthetic import marker_rows, write_rows

    calls: list = []
    _recorder(monkeypatch, T, calls)
    rows = write_rows(marker_rows(8, seed=1), tmp_path / "pairs.jsonl")
    cfg = load_config(RewardConfig, None, [f"model.path={tiny_model}", f"data.train={rows}", "data.eval_fraction=0.25",
                                           "data.max_length=48", "peft.method=full", "train.strategy=single",
                                           "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2"])
    T.train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(_run_dir(tmp_path, "rm"))})
    assert calls == [TRAIN_DEVICE] * (2 + 1)  # 2 training micro-batches, 1 batch of the 2 held-out rows


def test_dpo_batches_go_to_the_strategy_device_and_the_loss_stays_there(tiny_model, tmp_path, monkeypatch,
                                                                        strategy_on_cpu0):
    import ppo.dpo_trainer as T
    from ppo.dpo_config import DPOConfig
    from ppo.dpo_data import read_pairs, tokenize_pairs
    from reward.synthetic import marker_rows, write_rows

    calls: list = []
    _recorder(monkeypatch, T, calls)
    rows = write_rows(marker_rows(4, seed=2), tmp_path / "pairs.jsonl")
    cfg = load_config(DPOConfig, None, [f"model.path={tiny_model}", f"data.train={rows}", "loss.type=ipo",
                                        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=1"])
    learner = T.DPOLearner(cfg, total_steps=1)
    assert learner.strategy.device == TRAIN_DEVICE
    ex = tokenize_pairs(read_pairs(str(rows)), learner.tok, 64, 32)
    rec = learner.step(ex, [0, 1, 2, 3])  # LoRA: the reference is the adapter disabled, per batch
    assert calls == [TRAIN_DEVICE] * 2 and rec["loss/dpo"] > 0


def test_vllm_lora_rollouts_in_float32_on_cuda_fail_early_with_the_fix(tiny_model, monkeypatch):
    """vLLM's CUDA LoRA kernels assert float16/bfloat16; the engine says so before it starts, not at generate."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from alignloop.rollout import VLLMEngine

    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        VLLMEngine(tiny_model, dtype="float32", enable_lora=True)


def test_single_strategy_adamw_is_fused_and_updates_as_the_per_parameter_loop():
    """The single-process strategy's AdamW runs torch's fused kernel on CPU parameters (one pass over all of them
    instead of a loop of small ops per parameter) and moves the weights as the default loop does, to float rounding."""
    from alignloop.sections import OptimConfig
    from alignloop.strategy import SingleStrategy, _adamw

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    st = SingleStrategy(cfg, total_steps=10, grad_accum=1, device=torch.device("cpu"))
    st.prepare(model)
    assert st.optimizer.defaults["fused"] is True
    loop = _adamw(list(ref.parameters()), cfg)
    assert not loop.defaults["fused"]
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((model, st.optimizer), (ref, loop)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (model[0].weight - start).abs().max() > 1e-3  # the steps moved the weights


# ------------------------------------------------------- 16-bit dtypes on a CPU without fast 16-bit kernels

def _linear_rate(dtype, n: int = 384, repeats: int = 3) -> float:
    """FLOP/s of ``F.linear`` (the layer the models call), best of ``repeats``: measured apart from alignloop's own."""
    import time

    x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _shipped_ppo_cfg(*overrides):
    from ppo.config import PPOConfig

    return load_config(PPOConfig, "configs/ppo.yaml", list(overrides))


def test_a_bf16_config_on_this_cpu_is_warned_about_exactly_when_bf16_is_much_slower_here():
    """The real check on this machine's CPU. An AVX2 Zen 3 multiplied bf16 at 1.2 GFLOP/s against float32's 55 (the
    warning must fire there); a Zen 4 or Xeon with AVX512-BF16/AMX is faster in bf16 (it must stay quiet)."""
    from alignloop.perf import slow_dtype_warning

    msg = slow_dtype_warning(_shipped_ppo_cfg("train.autocast=bfloat16", "rollout.dtype=bfloat16"))
    slower = _linear_rate(torch.float32) / _linear_rate(torch.bfloat16)
    if slower > 10:
        assert msg is not None and "rollout.dtype=bfloat16, train.autocast=bfloat16" in msg, (slower, msg)
    elif slower < 2:
        assert msg is None, (slower, msg)
    else:
        assert msg is None or "bfloat16 at" in msg  # between the two: either answer is honest
    assert slow_dtype_warning(_shipped_ppo_cfg()) is None  # float32 throughout: nothing to say


def test_slow_dtype_warning_names_the_keys_rates_and_factor_and_measures_only_when_it_must():
    from alignloop.perf import slow_dtype_warning

    rates = {torch.float32: 55e9, torch.bfloat16: 1.2e9, torch.float16: 30e9}
    asked = []

    def rate(dtype):
        asked.append(dtype)
        return rates[dtype]

    msg = slow_dtype_warning(_shipped_ppo_cfg("train.autocast=bfloat16", "rollout.dtype=bfloat16"), rate=rate)
    assert msg.startswith("rollout.dtype=bfloat16, train.autocast=bfloat16: this CPU (")
    assert "bfloat16 at 1.2 GFLOP/s against float32's 55.0 (46x slower)" in msg
    assert msg.endswith("Set these keys to float32 (or leave them out) on this machine.")
    assert asked == [torch.float32, torch.bfloat16]  # bf16 measured once for both keys
    # float16 at 30 of 55: under the 4x line, no warning; float32 everywhere: not even a measurement.
    assert slow_dtype_warning(_shipped_ppo_cfg("model.dtype=float16"), rate=rate) is None
    asked.clear()
    assert slow_dtype_warning(_shipped_ppo_cfg(), rate=rate) is None and asked == []
    # GPUs asked for: the CPU's kernels are not the ones that will run.
    assert slow_dtype_warning(_shipped_ppo_cfg("train.autocast=bfloat16", "ray.gpus_per_worker=1"), rate=rate) is None


def test_every_stage_warns_when_it_prepares_its_run_directory(tmp_path, monkeypatch, capsys):
    """The stage CLIs (sft, reward, ppo, dpo) all pass through prepare_run_dir before loading a model."""
    import alignloop.perf as perf
    from alignloop.stage import prepare_run_dir
    from sft.config import SFTConfig

    monkeypatch.setattr(perf, "matmul_peak_flops", lambda dtype=torch.float32, **_: {torch.float32: 55e9}.get(dtype, 1e9))
    prepare_run_dir(load_config(SFTConfig, "configs/sft.yaml", ["model.dtype=bfloat16"]), tmp_path / "sft")
    err = capsys.readouterr().err
    assert "[alignloop] warning: model.dtype=bfloat16: this CPU" in err and "(55x slower)" in err
    prepare_run_dir(load_config(SFTConfig, "configs/sft.yaml", []), tmp_path / "sft32")
    assert capsys.readouterr().err == ""
