"""DPO pieces without a subprocess: config rules, answer-only labels, every batch layout (packed, padded, shared
prompt) against a naive loop, best-vs-worst pairing."""

import pytest
import torch

from alignloop.config import ConfigError, load_config
from alignloop.data import DataError
from ppo.dpo_config import DPOConfig
from ppo.dpo_data import (DPOExample, pair_batch, pair_shared_len, pair_width, sequence_logps, split_pairs, tokenize_answer,
                          tokenize_pairs)
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


LAYOUTS = [(True, False), (False, False), (False, True), (True, True)]  # (packing, shared_prefix)


def _layout_examples(tok):
    rows = [{"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "The answer is four, I think."},
            {"chosen": "\n\nHuman: hello\n\nAssistant: hi there", "rejected": "\n\nHuman: hello\n\nAssistant: go away"},
            {"prompt": "Name a colour.", "chosen": "Blue, like the sky on a clear day.", "rejected": "Blue."}]
    return tokenize_pairs([to_preference(r, f"f:{i}") for i, r in enumerate(rows)], tok, 512, 256)


@torch.no_grad()
def test_every_layout_equals_naive(tok_model):
    """Packed, padded and shared-prompt rows, with the LM head on answer positions only or everywhere, give the
    log-probs of a naive per-sequence log-softmax loop."""
    tok, model = tok_model
    ex = _layout_examples(tok)
    naive = []
    for e in ex:
        for ids, labels in ((e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels)):
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, vocab)
            naive.append(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100))
    counts = None
    for packing, shared in LAYOUTS:
        batch = pair_batch(ex, tok.pad_token_id, packing, shared)
        assert ("attention_mask" in batch and batch["attention_mask"].dim() == 4) == shared
        for only_labelled in (True, False):
            logps, n = sequence_logps(model, batch, only_labelled)
            torch.testing.assert_close(logps, torch.tensor(naive), rtol=1e-5, atol=1e-4, msg=(packing, shared))
            assert counts is None or torch.equal(n, counts)
            counts = n
    assert counts[0] < counts[1]
    c, r = split_pairs(torch.arange(4.0))
    assert c.tolist() == [0, 2] and r.tolist() == [1, 3]


def test_shared_prompt_layout_gradients_equal_padded(tok_model):
    """The same gradient from one row per pair with the prompt once as from two padded rows per pair."""
    tok, model = tok_model
    ex = _layout_examples(tok)
    grads = []
    for packing, shared in ((False, False), (False, True), (True, True)):
        model.zero_grad()
        batch = pair_batch(ex, tok.pad_token_id, packing, shared)
        logps, _ = sequence_logps(model, batch)
        (logps * torch.tensor([1.0, -1.0] * len(ex))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    assert len(grads[0]) > 5
    for g in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(g[n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)
    plain = pair_batch(ex, tok.pad_token_id, packing=True)["input_ids"].numel()
    assert pair_batch(ex, tok.pad_token_id, packing=True, shared_prefix=True)["input_ids"].numel() < plain


def test_shared_prompt_layout_by_hand():
    # prompt [1, 2, 3], answers [4] and [5, 6]: positions 0-1 are shared (they predict prompt tokens only); the
    # last prompt token predicts a different first answer token in each sequence, so each branch keeps a copy
    e = DPOExample([1, 2, 3, 4], [-100, -100, -100, 4], [1, 2, 3, 5, 6], [-100, -100, -100, 5, 6], "x")
    assert pair_shared_len(e) == 2 and pair_width(e, True) == 7 and pair_width(e, False) == 5
    b = pair_batch([e], pad_id=0, packing=False, shared_prefix=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 3, 5, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert b["targets"].tolist() == [[-100, -100, 4, -100, 5, 6, -100]]
    assert b["seq_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert b["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # the chosen branch sees the prompt and itself
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # the rejected branch never sees the chosen one
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]
    # prompts that differ from the first token (cut differently): nothing shared, the plain layout is kept
    f = DPOExample([9, 3, 4], [-100, -100, 4], [1, 3, 5], [-100, -100, 5], "y")
    assert pair_shared_len(f) == 0 and "attention_mask" not in pair_batch([f], 0, True, True)


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


def test_rewind_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    """A run killed between two checkpoints logged steps the resumed run logs again: those rows go."""
    import json

    from alignloop import metrics as M

    rows = [{"step": 1, "loss/dpo": 0.7}, {"step": 2, "dpo/round": 1}, {"step": 3, "loss/dpo": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    M.rewind(tmp_path, 2)
    assert M.read_metrics(tmp_path / "metrics.jsonl") == rows[:2]
    M.rewind(tmp_path / "nothing-here", 2)  # no metrics yet: nothing to do
