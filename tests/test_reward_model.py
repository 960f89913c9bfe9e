"""The scalar-head model: last real token whatever the padding, head init, PEFT, and the in-process scorer."""

import json
import math

import pytest
import torch

from alignloop.models import load_tokenizer
from alignloop.sections import ModelConfig, PeftConfig
from reward.data import TokenizedPreference
from reward.model import last_token_index, load_reward_model, positions_from_mask
from reward.trainer import batch_loss, collate


def test_last_token_index_and_positions_by_hand():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert positions_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 1, 2, 3]]


@pytest.fixture(scope="module")
def tiny_rm(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(path=str(tiny_model)), PeftConfig(method="full"), str(tiny_model),
                              tok.pad_token_id).eval()
    return model, tok


def _pad(seqs, pad_id, side):
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_score_is_read_at_the_last_real_token_whatever_the_padding(tiny_rm):
    model, tok = tiny_rm
    pad = tok.pad_token_id
    texts = ["The quick brown fox jumps over the lazy dog.", "Answer: yes.", "0 1 2 3 4 5 6"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs[1] = seqs[1] + [pad]  # the pad id inside real content (pad == eos in many tokenizers) is still content
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        right = model(*_pad(seqs, pad, "right"))
        left = model(*_pad(seqs, pad, "left"))
        b = collate([TokenizedPreference([s], None, "") for s in seqs], pad, packing=True)
        packed = model(**b.model_inputs)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # reading the score one token too early would give another value
    s = seqs[0]
    with torch.no_grad():
        early = model(torch.tensor([s[:-1]]), torch.ones(1, len(s) - 1, dtype=torch.long))
    assert not torch.allclose(early, alone[:1])


def test_head_init_std_and_dropout_off(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    stds = []
    for seed in range(4):
        torch.manual_seed(seed)
        m = load_reward_model(ModelConfig(path=str(tiny_model)), PeftConfig(method="full"), str(tiny_model), tok.pad_token_id)
        w = m.inner.score.weight
        assert w.shape == (1, 128)
        stds.append(float(w.detach().std()))
    expected = 1 / math.sqrt(128 + 1)
    assert sum(stds) / len(stds) == pytest.approx(expected, rel=0.15)  # HF's default would be 0.02
    assert m.inner.config.attention_dropout == 0.0
    assert not any(isinstance(x, torch.nn.Dropout) and x.p > 0 for x in m.modules())


def test_lora_trains_adapters_and_the_whole_head(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    m = load_reward_model(ModelConfig(path=str(tiny_model)), PeftConfig(method="lora", lora_r=4), str(tiny_model),
                          tok.pad_token_id)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    assert any("score" in n for n in trainable)
    assert not any("score" in n and "lora_" in n for n in trainable)  # the head is not LoRA-wrapped


def test_batch_loss_pl_equals_bt_for_pairs(tiny_rm):
    from reward.config import RewardConfig

    model, tok = tiny_rm
    ex = [TokenizedPreference([tok("good answer")["input_ids"], tok("bad")["input_ids"]], 0.5, "x"),
          TokenizedPreference([tok("fine")["input_ids"], tok("the worst answer")["input_ids"]], None, "y")]
    b = collate(ex, tok.pad_token_id, packing=True)
    with torch.no_grad():
        r = model(**b.model_inputs)
    bt = batch_loss(RewardConfig(data={"train": "x"}), r, b)
    pl = batch_loss(RewardConfig(data={"train": "x"}, loss={"type": "plackett_luce"}), r, b)
    torch.testing.assert_close(bt, pl)
    rr = r[b.index]  # (2, 2)
    manual = -torch.nn.functional.logsigmoid(rr[:, 0] - rr[:, 1]).sum()
    torch.testing.assert_close(bt, manual)
    with_margin = batch_loss(RewardConfig(data={"train": "x"}, loss={"use_margin": True}), r, b)
    manual_m = -torch.nn.functional.logsigmoid(rr[:, 0] - rr[:, 1] - torch.tensor([0.5, 0.0])).sum()
    torch.testing.assert_close(with_margin, manual_m)


def save_reward_dir(model, tok, out, stats):
    model.seq.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps(stats))
    return out


def test_in_process_scorer_matches_the_training_forward(tiny_rm, tmp_path):
    from reward.data import render
    from reward.scorer import RewardScorer, conversation

    model, tok = tiny_rm
    d = save_reward_dir(model, tok, tmp_path / "final", {"mean": 0.5, "std": 2.0, "max_length": 64})
    scorer = RewardScorer(d, batch_size=2)
    prompts = ["Write a poem.", [{"role": "system", "content": "short"}, {"role": "user", "content": "Hi?"}], "Add 1+1."]
    answers = ["The sea is blue.", "Hello!", "2"]
    got = scorer.score(prompts, answers)
    with torch.no_grad():
        want = [float(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
                for ids in (render(tok, conversation(p, a), 64)[0] for p, a in zip(prompts, answers))]
    assert got == pytest.approx(want, abs=1e-5)
    norm = scorer.score(prompts, answers, normalize=True)
    assert norm == pytest.approx([(x - 0.5) / 2.0 for x in want], abs=1e-5)
