"""Our answer log-probs + loss table against TRL 1.16's DPOTrainer on the same batch.

TRL has no standalone loss callable (its losses live inside ``DPOTrainer._compute_loss``), so both sides run
on real tiny models: TRL's trainer computes its loss on a batch from its own collator, and we compute
``sequence_logps`` + ``dpo_loss`` on exactly the same tokens, with a policy and a reference that differ.
"""

import pytest
import torch

from ppo.dpo_data import sequence_logps
from ppo.dpo_losses import dpo_loss

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from alignloop.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("trl")
    return build_tiny_llama(root / "policy", seed=0), build_tiny_llama(root / "ref", seed=1)


def our_batch(trl_batch):
    """TRL's (2B, T) right-padded rows -> our padded batch: next-token targets on completion positions only."""
    ids, cm = trl_batch["input_ids"], trl_batch["completion_mask"]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(cm[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return {"input_ids": ids, "attention_mask": trl_batch["attention_mask"], "targets": targets}


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.0), ("robust", 0.2, 0.1),
                                                ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0)])
def test_loss_matches_trl_dpo_trainer(models, tmp_path, loss_type, beta, eps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir, ref_dir = models
    tok = AutoTokenizer.from_pretrained(policy_dir)
    rows = [{"prompt": f"Add {i} and {i + 2}.", "chosen": f" The answer is {2 * i + 2}.", "rejected": f" No idea {i}."}
            for i in range(4)]
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, loss_type=[loss_type], beta=beta,
                         label_smoothing=eps, use_cpu=True, report_to=[], bf16=False, max_length=128)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer._compute_loss(trainer.model, batch, False))
        ours_batch = our_batch(batch)
        pol, ntok = sequence_logps(trainer.model, ours_batch)  # (2B,) chosen rows first, then rejected
        refl, _ = sequence_logps(ref, ours_batch)
    pc, pr = pol.chunk(2)
    rc, rr = refl.chunk(2)
    tc, tr = ntok.chunk(2)
    assert torch.equal(ntok, batch["completion_mask"].sum(1).float())  # the same answer tokens are counted
    ours, m = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps, chosen_tokens=tc,
                       rejected_tokens=tr)
    assert float((pc - rc - pr + rr).abs().max()) > 1e-3  # policy and reference really differ
    assert float(ours) == pytest.approx(theirs, rel=1e-4, abs=1e-6)
