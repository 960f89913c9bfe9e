"""Each PEFT method trains two steps and changes only the parameters it should."""

import pytest
import torch

from alignloop.batching import packed_batch, padded_batch, token_nll_sum
from alignloop.data import load_sft_examples
from alignloop.models import apply_peft, load_causal_lm, load_tokenizer
from alignloop.sections import ModelConfig, OptimConfig, PeftConfig
from alignloop.strategy import SingleStrategy


def train_two_steps(model_dir, data, peft_cfg):
    tok = load_tokenizer(str(model_dir))
    ex = load_sft_examples(str(data), tok, "auto", 128, "answer")[:4]
    torch.manual_seed(0)
    model = apply_peft(load_causal_lm(ModelConfig(path=str(model_dir)), peft_cfg), peft_cfg, str(model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strat = SingleStrategy(OptimConfig(lr=1e-2), total_steps=2, grad_accum=1)
    model = strat.prepare(model)
    seqs = [(e.input_ids, e.labels) for e in ex]
    batch = padded_batch(seqs, tok.pad_token_id) if peft_cfg.method in ("prompt_tuning", "prefix_tuning") else packed_batch(seqs)
    losses = []
    for _ in range(2):
        nll, n = token_nll_sum(model, batch, only_labelled=peft_cfg.method not in ("prompt_tuning", "prefix_tuning"))
        strat.backward(nll / n)
        strat.step()
        losses.append(float(nll) / n)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    return model, losses, changed, before


def base_names(names):
    return {n for n in names if "lora_" not in n and "ia3_" not in n and "prompt_encoder" not in n}


def test_full_changes_everything(tiny_model, tiny_data):
    model, losses, changed, before = train_two_steps(tiny_model, tiny_data, PeftConfig(method="full"))
    assert losses[1] < losses[0]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed


@pytest.mark.parametrize("method,marker", [("lora", "lora_"), ("ia3", "ia3_")])
def test_adapters_change_only_adapter_weights(tiny_model, tiny_data, method, marker):
    model, losses, changed, before = train_two_steps(tiny_model, tiny_data, PeftConfig(method=method, lora_r=4))
    assert changed and all(marker in n for n in changed)
    assert losses[1] < losses[0]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_soft_prompts_change_only_virtual_tokens(tiny_model, tiny_data, method):
    model, losses, changed, before = train_two_steps(tiny_model, tiny_data, PeftConfig(method=method, num_virtual_tokens=4))
    assert changed and all("prompt_encoder" in n for n in changed)
    assert losses[1] < losses[0]


def test_freeze_first_layers_bit_identical(tiny_model, tiny_data):
    cfg = PeftConfig(method="freeze", freeze_first_k_layers=1, freeze_embeddings=True)
    model, losses, changed, before = train_two_steps(tiny_model, tiny_data, cfg)
    frozen = [n for n in before if n.startswith("model.layers.0.") or n.startswith("model.embed_tokens")]
    assert frozen and not (set(frozen) & changed)
    assert any(n.startswith("model.layers.1.") for n in changed) and "lm_head.weight" in changed


def test_freeze_too_many_layers_is_an_error(tiny_model):
    from alignloop.config import ConfigError

    model = load_causal_lm(ModelConfig(path=str(tiny_model)))
    with pytest.raises(ConfigError, match="only 2 blocks"):
        apply_peft(model, PeftConfig(method="freeze", freeze_first_k_layers=5))


def test_qlora_4bit_base_with_lora(tiny_model, tiny_data):
    import bitsandbytes as bnb

    model, losses, changed, before = train_two_steps(tiny_model, tiny_data, PeftConfig(method="qlora", lora_r=4))
    fourbit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert fourbit, "base must be 4-bit"
    # bitsandbytes repacks 4-bit weights for its CPU kernel on first use (same values, new layout), so the
    # base is checked by value: with the adapter disabled the model computes what the quantized base did.
    packed = {n for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert changed and all("lora_" in n for n in changed - packed)
    assert losses[1] < losses[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), model.disable_adapter():
        base_now = model(input_ids=ids).logits
    fresh = apply_peft(load_causal_lm(ModelConfig(path=str(tiny_model)), PeftConfig(method="qlora")),
                       PeftConfig(method="qlora", lora_r=4))
    with torch.no_grad(), fresh.disable_adapter():
        base_ref = fresh(input_ids=ids).logits
    assert torch.allclose(base_now, base_ref, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base_ref, atol=1e-5)


def test_merged_lora_state_dict_equals_peft_merge_and_unload(tiny_model):
    """What a merged sync sends the engine: W + (alpha/r)·B@A under the base model's names, out of place, equal to
    peft's own merge_and_unload; the adapter model's weights are left as they were."""
    import peft
    from transformers import AutoModelForCausalLM

    from alignloop.merge import merged_lora_state_dict

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: give the adapter something to merge
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_lora_state_dict(model.state_dict(), 8 / 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    adapted = [k for k in merged if f"base_model.model.{k[:-len('.weight')]}.base_layer.weight" in before]
    assert len(adapted) >= 7  # every linear layer of the tiny model's blocks
    for k in adapted:  # and merging moved each of them
        assert not torch.equal(merged[k], before[f"base_model.model.{k[:-len('.weight')]}.base_layer.weight"]), k
