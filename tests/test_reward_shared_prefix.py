"""Shared-prefix batches (each row's history computed once) give the rewards, loss and gradients of padded batches;
pair-aligned truncation; data.packing=auto."""

import pytest
import torch

from alignloop.models import load_tokenizer
from alignloop.sections import ModelConfig, PeftConfig
from reward.config import RewardConfig, resolve_packing, shared_prefix_supported
from reward.data import TokenizedPreference, common_prefix_len, truncate_group
from reward.model import load_reward_model
from reward.trainer import batch_loss, collate, shared_prefix_len


def _examples(tok):
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    history = ids("User: tell me how to bake bread at home please. Assistant: ok. User: and rye?")
    return [
        TokenizedPreference([history + ids(" Mix rye flour and water."), history + ids(" No.")], 0.5, "a"),
        # no shared token at all: each answer keeps its own history (nothing is shared, still exact)
        TokenizedPreference([ids("first story"), ids("another thing entirely")], None, "b"),
        # one conversation is the other's prefix: each keeps at least its last token of its own
        TokenizedPreference([history + ids(" yes"), history + ids(" yes and more")], None, "c"),
        TokenizedPreference([history[:5] + ids(" short"), history[:5] + ids(" a much longer answer here")], 1.0, "d"),
    ]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def rm(request, tiny_model):
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(path=str(tiny_model), attn_implementation=request.param),
                              PeftConfig(method="full"), str(tiny_model), tok.pad_token_id)
    return model, tok


def _loss_and_grads(model, batch, cfg):
    model.zero_grad()
    r = model(**batch.model_inputs)
    loss = batch_loss(cfg, r, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return r.detach(), loss.detach(), grads


@pytest.mark.parametrize("packing", [False, True])
def test_shared_prefix_equals_padded_rewards_loss_and_gradients(rm, packing):
    model, tok = rm
    model.train()
    ex = _examples(tok)
    cfg = RewardConfig(data={"train": "x"}, loss={"use_margin": True})
    padded = collate(ex, tok.pad_token_id, packing=False)
    shared = collate(ex, tok.pad_token_id, packing=packing, shared_prefix=True)
    assert shared.layout == ("shared-packed" if packing else "shared")
    assert shared.positions < padded.positions  # the history of pairs a and c is computed once
    r0, l0, g0 = _loss_and_grads(model, padded, cfg)
    r1, l1, g1 = _loss_and_grads(model, shared, cfg)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 5
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)
    # each answer alone, one sequence per forward
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for e in ex for s in e.input_ids])
    torch.testing.assert_close(r1, alone, atol=1e-5, rtol=1e-5)


def test_ranked_lists_share_one_history_and_plackett_luce_matches(rm):
    model, tok = rm
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    h = ids("User: name a colour of the sky. Assistant:")
    ex = [TokenizedPreference([h + ids(" blue"), h + ids(" grey at night"), h + ids(" red")], None, "r"),
          TokenizedPreference([h + ids(" yes"), h + ids(" no")], None, "p")]
    cfg = RewardConfig(data={"train": "x"}, loss={"type": "plackett_luce"})
    padded = collate(ex, tok.pad_token_id, packing=False)
    shared = collate(ex, tok.pad_token_id, packing=False, shared_prefix=True)
    assert shared.layout == "shared"
    # history once per example, then each answer's own tokens
    L = shared_prefix_len(ex[0].input_ids)
    assert L >= len(h) - 1 and shared.model_inputs["input_ids"][0, :L].tolist() == h[:L]
    assert shared.positions == 2 * (sum(map(len, ex[0].input_ids)) - 2 * L)  # the 3-answer row is the widest
    r0, l0, g0 = _loss_and_grads(model, padded, cfg)
    r1, l1, g1 = _loss_and_grads(model, shared, cfg)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_shared_layout_mask_by_hand():
    # history [1, 2], answers [3] and [4, 5]: the row is 1 2 3 4 5, positions 0 1 2 2 3
    ex = [TokenizedPreference([[1, 2, 3], [1, 2, 4, 5]], None, "x")]
    b = collate(ex, pad_id=0, packing=False, shared_prefix=True)
    assert b.layout == "shared" and b.positions == 5 and b.tokens == 7
    inp = b.model_inputs
    assert inp["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert inp["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert inp["rows"].tolist() == [0, 0] and inp["ends"].tolist() == [2, 4]
    assert inp["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # answer 1 sees the history and itself
        [1, 1, 0, 1, 0],  # answer 2 never sees answer 1
        [1, 1, 0, 1, 1],
    ]


def test_shared_layout_only_when_it_computes_fewer_positions():
    # nothing shared: the plain layout (no gain, and a longer row) is kept
    ex = [TokenizedPreference([[1, 2, 3], [4, 5, 6]], None, "x")]
    assert collate(ex, 0, packing=False, shared_prefix=True).layout == "padded"
    assert collate(ex, 0, packing=True, shared_prefix=True).layout == "packed"
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each keeps its last token
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1


def test_pair_truncation_cuts_the_shared_history_together():
    hist = list(range(100, 120))  # 20 shared tokens
    a, b = hist + [1, 2, 3, 4, 5, 6], hist + [7]  # 26 and 21 tokens
    (ta, tb), cut = truncate_group([a, b], 16)
    assert cut and ta == a[10:] and tb == b[10:]  # both lose the same 10 oldest tokens
    assert common_prefix_len([ta, tb]) == 10
    # an answer longer than the budget: the history goes entirely, then that answer loses its own front
    long = hist + list(range(30))
    (ta, tb), cut = truncate_group([long, b], 16)
    assert ta == long[-16:] and tb == b[20:] and cut
    assert truncate_group([a, b], 26) == ([a, b], False)


def test_packing_auto_and_shared_prefix_support():
    assert resolve_packing("auto", "sdpa") is False and resolve_packing("auto", "eager") is False
    assert resolve_packing("auto", "flash_attention_2") is True
    assert resolve_packing(True, "sdpa") is True and resolve_packing(False, "flash_attention_2") is False
    assert shared_prefix_supported("sdpa") and not shared_prefix_supported("flash_attention_2")
    cfg = RewardConfig(data={"train": "x"})
    assert cfg.data.packing == "auto" and cfg.data.shared_prefix is True and cfg.data.truncation == "pair"
    assert RewardConfig(data={"train": "x", "packing": True}).data.packing is True


def _train(tiny_model, rows, tmp_path, name, **data):
    from reward.trainer import train_worker

    cfg = RewardConfig.model_validate({
        "output_dir": str(tmp_path), "run_name": name, "model": {"path": str(tiny_model)}, "peft": {"method": "full"},
        "data": {"train": str(rows), "eval_fraction": 0.25, "max_length": 48, **data},
        "optim": {"lr": 1e-3, "warmup_steps": 0}, "eval": {"calibration_bins": 4},
        "train": {"strategy": "single", "max_steps": 3, "global_batch_size": 8, "micro_batch_size": 2, "seed": 1,
                  "save_every": 10**6}})
    run = tmp_path / name
    run.mkdir()
    events = []
    train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(run)}, step_hook=lambda e, s: events.append((e, s)))
    import json

    from safetensors.torch import load_file

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss/reward"] for m in metrics if "loss/reward" in m]
    ev = json.loads((run / "eval.json").read_text())
    return losses, load_file(run / "final" / "model.safetensors"), ev, events


def test_training_with_shared_prefix_and_grouping_equals_plain_padded(tiny_model, tmp_path, capsys):
    from reward.synthetic import marker_rows, write_rows

    rows = marker_rows(32, seed=3)
    for i, r in enumerate(rows):  # answers of different lengths, so grouping and padding matter
        r["chosen"] += " extra words" * (i % 4)
        r["prompt"] = "Some shared context. " * (i % 3) + r["prompt"]
    f = write_rows(rows, tmp_path / "pairs.jsonl")
    l0, w0, e0, _ = _train(tiny_model, f, tmp_path, "plain", packing=False, shared_prefix=False, group_by_length=False)
    assert "{'padded': 12}" in capsys.readouterr().out  # 3 steps x 4 micro-batches
    l1, w1, e1, events = _train(tiny_model, f, tmp_path, "fast")  # defaults: shared prefix, grouped, auto packing
    out = capsys.readouterr().out
    assert "batches padded with shared prefixes" in out and "{'shared': 12}" in out
    assert events == [(e, s) for s in range(3) for e in ("begin", "end")]
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
    assert e1["eval/accuracy"] == e0["eval/accuracy"] and e1["eval/loss"] == pytest.approx(e0["eval/loss"], rel=1e-4)
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], atol=2e-5, rtol=1e-4, msg=k)


def test_scoring_grouped_by_length_keeps_the_examples_order(rm):
    from reward.trainer import score_examples

    model, tok = rm
    ex = _examples(tok) + _examples(tok)[::-1]
    plain = score_examples(model, ex, tok.pad_token_id, 2, packing=False)
    fast = score_examples(model, ex, tok.pad_token_id, 2, packing=False, shared_prefix=True, group_by_length=True)
    assert [len(x) for x in fast] == [len(e.input_ids) for e in ex]
    for a, b in zip(fast, plain):
        assert a == pytest.approx(b, abs=1e-5)
