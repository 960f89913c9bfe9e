"""Registry, triggers, gates, evaluation maths and simulated labelers: hand-computed values, no models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignloop.evaluate import sequence_kl, win_rate
from alignloop.labelers import LabelerSpec, concise, concise_property, rank_answers
from alignloop.pipeline import GatesConfig, gate_decision, identity
from alignloop.registry import Registry, file_inputs, hash_path
from alignloop.retrain import ScheduleConfig, due


# ------------------------------------------------------------------------------------ registry
def test_registry_commit_find_lineage_and_versions(tmp_path):
    reg = Registry(tmp_path / "reg")
    k1 = reg.make_key("sft", {"lr": 1}, {}, [])
    assert reg.find("sft", k1) is None
    slot = reg.slot("sft", k1)
    (slot / "run" / "final").mkdir(parents=True)
    (slot / "run" / "final" / "w.bin").write_bytes(b"abc")
    a = reg.commit("sft", k1, config={"lr": 1}, parents=[], inputs={}, content=slot / "run" / "final")
    assert a.version == 1 and reg.find("sft", k1).id == a.id
    # a child's key depends on the parent's content: same config + other parent content -> another key
    k2 = reg.make_key("reward", {"x": 1}, {}, [a])
    b = reg.commit("reward", k2, config={"x": 1}, parents=[a], inputs={}, content=None)
    assert [x.id for x in reg.lineage(b)] == [b.id, a.id]
    (slot / "run" / "final" / "w.bin").write_bytes(b"abd")
    a2 = reg.commit("sft", reg.make_key("sft", {"lr": 2}, {}, []), config={"lr": 2}, parents=[], inputs={},
                    content=slot / "run" / "final")
    assert a2.version == 2 and a2.content_hash != a.content_hash
    assert reg.make_key("reward", {"x": 1}, {}, [a2]) != k2
    lines = (tmp_path / "reg" / "index.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [a.id, b.id, a2.id]


def test_registry_incomplete_slot_is_not_an_artifact(tmp_path):
    reg = Registry(tmp_path)
    key = reg.make_key("ppo", {}, {}, [])
    (reg.slot("ppo", key) / "run").mkdir(parents=True)  # a crashed stage: no artifact.json
    assert reg.find("ppo", key) is None and reg.list("ppo") == []


def test_promote_is_atomic_and_keeps_history(tmp_path):
    reg = Registry(tmp_path)
    arts = [reg.commit("ppo", reg.make_key("ppo", {"i": i}, {}, []), config={}, parents=[], inputs={}, content=None)
            for i in range(2)]
    reg.promote(arts[0], "first")
    rec = reg.promote(arts[1], "second")
    assert reg.production()["artifact"] == arts[1].id and rec["previous"] == arts[0].id
    assert [json.loads(x)["artifact"] for x in (tmp_path / "history.jsonl").read_text().splitlines()] == [a.id for a in arts]
    assert not list(tmp_path.glob(".*tmp"))


def test_file_inputs_hash_contents_not_names(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"a": 1}\n')
    h1 = file_inputs({"data": {"train": str(f)}, "lr": 0.1, "name": "x.y"})
    assert list(h1) == [str(f)]
    f.write_text('{"a": 2}\n')
    assert file_inputs({"data": {"train": str(f)}})[str(f)] != h1[str(f)]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x").write_text("1")
    h = hash_path(d)
    (d / "x").write_text("2")
    assert hash_path(d) != h


def test_identity_drops_owned_keys_and_links():
    tree = {"output_dir": "a", "run_name": "b", "resume": True, "model": {"path": "/x", "dtype": "float32"},
            "data": {"train": "/p", "max_length": 5}}
    ident = identity(tree, {"model.path": "/x", "data.train": "/p"})
    assert ident == {"model": {"dtype": "float32"}, "data": {"max_length": 5}}
    assert tree["model"]["path"] == "/x"  # the original is untouched


# ------------------------------------------------------------------------------------ gates
def test_gates_pass_fail_and_missing():
    m = {"eval/win_rate": 0.6, "eval/kl": 3.0, "reward/eval_accuracy": 0.7}
    ok, lines = gate_decision(GatesConfig(min_win_rate=0.55, max_kl=5.0, min_reward_accuracy=0.65), m)
    assert ok and all(x.startswith("PASS") for x in lines) and len(lines) == 3
    ok, lines = gate_decision(GatesConfig(min_win_rate=0.65, max_kl=5.0), m)
    assert not ok and lines[0].startswith("FAIL eval/win_rate = 0.6")
    ok, lines = gate_decision(GatesConfig(max_kl=2.0), m)
    assert not ok
    ok, lines = gate_decision(GatesConfig(min_gold_agreement=0.5), m)  # no gold items: the gate cannot pass
    assert not ok and "missing" in lines[0]
    assert gate_decision(GatesConfig(), m) == (True, [])


# ------------------------------------------------------------------------------------ triggers
def test_interval_trigger():
    s = ScheduleConfig(interval_s=3600)
    assert due(s, now=1000 + 3599, last_end=1000, new_rankings=None)[0] is False
    assert due(s, now=1000 + 3600, last_end=1000, new_rankings=None)[0] is True


def test_cron_trigger_in_utc():
    s = ScheduleConfig(cron="0 3 * * *")
    day = 86400 * 20000  # a midnight UTC
    assert due(s, now=day + 3 * 3600 - 1, last_end=day, new_rankings=None)[0] is False
    ok, why = due(s, now=day + 3 * 3600, last_end=day, new_rankings=None)
    assert ok and "cron" in why
    # after a cycle at 03:00 the next one is due the next day at 03:00
    assert due(s, now=day + 86400 + 3 * 3600 - 1, last_end=day + 3 * 3600 + 60, new_rankings=None)[0] is False
    assert due(s, now=day + 86400 + 3 * 3600, last_end=day + 3 * 3600 + 60, new_rankings=None)[0] is True


def test_count_trigger_and_modes():
    any_ = ScheduleConfig(interval_s=100, min_new_rankings=10)
    assert due(any_, now=50, last_end=0, new_rankings=10) == (True, "10 new rankings (>= 10)")
    assert due(any_, now=100, last_end=0, new_rankings=3)[0] is True
    assert due(any_, now=50, last_end=0, new_rankings=9)[0] is False
    assert due(any_, now=50, last_end=0, new_rankings=None)[0] is False  # service unreachable: not due by count
    all_ = ScheduleConfig(interval_s=100, min_new_rankings=10, mode="all")
    assert due(all_, now=100, last_end=0, new_rankings=9)[0] is False
    assert due(all_, now=100, last_end=0, new_rankings=10)[0] is True


def test_schedule_needs_a_trigger_and_a_valid_cron():
    with pytest.raises(ValueError, match="at least one"):
        ScheduleConfig()
    with pytest.raises(ValueError, match="cron"):
        ScheduleConfig(cron="every day")


# ------------------------------------------------------------------------------------ evaluation maths
def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_sequence_kl_k1_by_hand():
    pol = [[-1.0, -2.0], [-0.5]]
    ref = [[-1.5, -2.5], [-1.5]]
    per_answer, per_token = sequence_kl(pol, ref)
    assert per_answer == pytest.approx(((0.5 + 0.5) + 1.0) / 2)
    assert per_token == pytest.approx(2.0 / 3)
    with pytest.raises(ValueError):
        sequence_kl([[-1.0]], [[-1.0, -2.0]])


# ------------------------------------------------------------------------------------ simulated labelers
def test_labelers_rank_by_hidden_preference():
    answers = [{"id": 1, "text": "one two three four five six"}, {"id": 2, "text": "one"}, {"id": 3, "text": "one two three"}]
    spec = LabelerSpec("a", noise=0.0)
    assert rank_answers(concise, "q", answers, spec, random.Random(0)) == [[2], [3], [1]]
    contrarian = LabelerSpec("c", noise=0.0, contrarian=1.0)
    assert rank_answers(concise, "q", answers, contrarian, random.Random(0)) == [[1], [3], [2]]
    ties = rank_answers(concise, "q", answers + [{"id": 4, "text": "two"}], spec, random.Random(0))
    assert ties[0] == [2, 4] or ties[0] == [4, 2]
    # with noise the preference still wins on clear gaps most of the time
    rng = random.Random(1)
    noisy = LabelerSpec("n", noise=2.0)
    top = [rank_answers(concise, "q", answers, noisy, rng)[0][0] for _ in range(200)]
    assert top.count(2) > 150


def test_concise_property():
    assert concise_property("q", "short answer") and not concise_property("q", "")
    assert not concise_property("q", " ".join(["w"] * 31))


def test_candidate_items_merge_duplicates_and_drop_nul():
    from alignloop.feedback_link import candidate_items

    items = candidate_items(["q1", [{"role": "user", "content": "q2"}], "q3"],
                            [["a", " a ", "b\x00c"], ["x", "y"], ["same", "same"]],
                            model_id="sft-1", model_version="1", sampling={"temperature": 1.0})
    assert len(items) == 2  # q3 has one distinct answer: not an item
    assert [a["text"] for a in items[0]["answers"]] == ["a", "bc"] and items[0]["prompt"] == "q1"
    assert items[1]["messages"][-1]["content"] == "q2" and items[1]["answers"][0]["model_id"] == "sft-1"


def test_as_overrides_round_trip_through_the_override_parser():
    from alignloop.config import parse_override
    from alignloop.pipeline import as_overrides

    values = {"reward.rules": [], "data.eval": None, "train.max_steps": 3, "model.path": "/a/b", "optim.lr": 2e-4,
              "x.flag": True}
    assert {".".join(k): v for k, v in map(parse_override, as_overrides(values))} == values
