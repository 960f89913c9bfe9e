"""DPO pieces without a subprocess: config rules, answer-only labels, packed vs padded log-probs vs a naive loop,
best-vs-worst pairing."""

import pytest
import torch

from alignloop.config import ConfigError, load_config
from alignloop.data import DataError
from ppo.dpo_config import DPOConfig
from ppo.dpo_data import pair_batch, sequence_logps, split_pairs, tokenize_answer, tokenize_pairs
from reward.data import to_preference


def test_config_rules():
    c = load_config(DPOConfig, overrides=["data.train=x.jsonl"])
    assert not c.online.enabled and not c.precompute_reference  # LoRA: adapter-disabled reference
    assert load_config(DPOConfig, overrides=["data.train=x.jsonl", "peft.method=full"]).precompute_reference
    # writing any online key turns the online section on
    c = load_config(DPOConfig, overrides=["online.prompts=p.jsonl", "online.scorer.function=m:f"])
    assert c.online.enabled and c.online.scorer.kind == "rule"
    for bad, msg in ((["online.enabled=true"], "online.prompts"),
                     (["online.prompts=p.jsonl", "online.scorer.kind=reward_model"], "online.scorer.reward_model"),
                     ([], "data.train"),
                     (["data.train=x", "train.global_batch_size=6", "ray.num_workers=2"], "global_batch_size"),
                     (["data.train=x", "peft.method=freeze", "reference.precompute=false"], "precompute"),
                     (["data.train=x", "loss.label_smoothing=0.5"], "label_smoothing")):
        with pytest.raises(ConfigError, match=msg):
            load_config(DPOConfig, overrides=bad)


@pytest.fixture(scope="module")
def tok_model(tiny_model):
    from transformers import AutoModelForCausalLM

    from alignloop.models import load_tokenizer

    return load_tokenizer(str(tiny_model)), AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def test_only_the_last_answer_is_labelled(tok_model):
    tok, _ = tok_model
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "final answer"}]
    ids, labels = tokenize_answer(tok, conv, "f:1", 512, 256)
    answer = [t for t, l in zip(ids, labels) if l != -100]
    assert tok.decode(answer) == "final answer<|im_end|>\n"  # the end-of-turn token is trained too
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    # too long: the prompt loses its oldest tokens first, the answer survives
    ids2, labels2 = tokenize_answer(tok, conv, "f:1", len(answer) + 5, 2)
    assert len(ids2) == len(answer) + 5 and [t for t, l in zip(ids2, labels2) if l != -100] == answer
    with pytest.raises(DataError, match="f:1: no answer tokens"):
        tokenize_answer(tok, conv, "f:1", 4, 4)


@torch.no_grad()
def test_packed_equals_padded_equals_naive(tok_model):
    tok, model = tok_model
    rows = [{"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "The answer is four, I think."},
            {"chosen": "\n\nHuman: hello\n\nAssistant: hi there", "rejected": "\n\nHuman: hello\n\nAssistant: go away"}]
    ex = tokenize_pairs([to_preference(r, f"f:{i}") for i, r in enumerate(rows)], tok, 512, 256)
    packed, n1 = sequence_logps(model, pair_batch(ex, tok.pad_token_id, packing=True))
    padded, n2 = sequence_logps(model, pair_batch(ex, tok.pad_token_id, packing=False))
    naive = []
    for e in ex:
        for ids, labels in ((e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels)):
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, vocab)
            naive.append(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100))
    torch.testing.assert_close(packed, torch.tensor(naive), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded, torch.tensor(naive), rtol=1e-5, atol=1e-4)
    assert torch.equal(n1, n2) and n1[0] < n1[1]
    c, r = split_pairs(torch.arange(4.0))
    assert c.tolist() == [0, 2] and r.tolist() == [1, 3]


def test_best_vs_worst_pairs_and_ties():
    from alignloop.rollout import Completion
    from ppo.dpo_online import best_vs_worst

    def comp(ids):
        return Completion([7, 8], ids, "", [0.0] * len(ids), "stop")

    completions = [[comp([1]), comp([2]), comp([3])], [comp([4]), comp([5]), comp([6])]]
    pairs, tied = best_vs_worst(completions, [[0.1, 0.9, 0.5], [0.2, 0.2, 0.2]], min_gap=0.0)
    assert tied == 1 and len(pairs) == 1
    assert pairs[0].chosen_ids == [7, 8, 2] and pairs[0].rejected_ids == [7, 8, 1]
    assert pairs[0].chosen_labels == [-100, -100, 2]
    pairs, tied = best_vs_worst(completions, [[0.1, 0.9, 0.5], [0.0, 0.3, 0.2]], min_gap=0.5)
    assert tied == 1 and len(pairs) == 1
