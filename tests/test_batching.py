import torch

from alignloop.batching import global_batch_indices, packed_batch, padded_batch, shift_labels, token_nll_sum


def test_shift_labels():
    assert shift_labels([-100, 5, 6]) == [5, 6, -100]


def test_packed_equals_padded(tiny_model):
    """Padding-free rows must give the same loss as padded rows (no attention across packed sequences)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    seqs = [([5, 6, 7, 8, 9, 10], [-100, -100, 7, 8, 9, 10]), ([11, 12, 13], [-100, 12, 13]),
            ([20, 21, 22, 23], [-100, -100, 22, 23])]
    with torch.no_grad():
        a, na = token_nll_sum(m, packed_batch(seqs))
        b, nb = token_nll_sum(m, padded_batch(seqs, 0))
        # the LM head restricted to labelled positions gives the full-logits result
        a_full, _ = token_nll_sum(m, packed_batch(seqs), only_labelled=False)
        b_full, _ = token_nll_sum(m, padded_batch(seqs, 0), only_labelled=False)
        assert abs(float(a) - float(a_full)) < 1e-4 and abs(float(b) - float(b_full)) < 1e-4
        # naive reference: each sequence alone
        ref = 0.0
        for ids, labels in seqs:
            logits = m(torch.tensor([ids])).logits[0]
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    ref -= torch.log_softmax(logits[t], -1)[labels[t + 1]].item()
    assert na == nb == 8
    assert abs(float(a) - float(b)) < 1e-4 and abs(float(a) - ref) < 1e-3


def test_global_batch_indices_cover_epochs_deterministically():
    steps = [global_batch_indices(10, 4, s, seed=1) for s in range(5)]
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert steps == [global_batch_indices(10, 4, s, seed=1) for s in range(5)]
    assert steps != [global_batch_indices(10, 4, s, seed=2) for s in range(5)]
