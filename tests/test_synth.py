"""alignloop synth: ROUGE-L dedup, parsing and filters on hand-made inputs; the CLI end to end on a tiny model."""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from alignloop.cli import main as cli_main
from alignloop.data import check_sft_file
from sft.synth import (Deduper, FilterConfig, Task, check_answer, check_instruction, format_prompt, lcs_length,
                       load_seeds, parse_task, rouge_l, rouge_tokens)

SEEDS = "sft/data/seed_tasks.jsonl"


# -------------------------------------------------------------------- ROUGE-L
def _lcs_naive(a, b):
    """Exponential twin of lcs_length: the longest common subsequence by brute force over subsets of a."""
    best = 0
    for k in range(len(a) + 1):
        for idx in combinations(range(len(a)), k):
            sub, it = [a[i] for i in idx], iter(b)
            if all(any(x == y for y in it) for x in sub):
                best = max(best, k)
    return best


def test_rouge_tokens_like_rouge_score():
    assert rouge_tokens("Write a Poem, about the SEA!  (2 lines)") == ["write", "a", "poem", "about", "the", "sea", "2", "lines"]


@pytest.mark.parametrize("a,b,lcs", [
    ("a b c d", "a c d", 3),
    ("write a poem about the sea", "write a story about the moon", 4),  # write a _ about the _
    ("x y z", "p q", 0),
    ("a b a b", "b a b a", 3),
])
def test_lcs_hand_computed(a, b, lcs):
    assert lcs_length(a.split(), b.split()) == lcs == _lcs_naive(a.split(), b.split())


def test_lcs_matches_naive_twin_on_random_sequences():
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _lcs_naive(a, b) == lcs_length(b, a)


def test_rouge_l_f1_hand_computed():
    # LCS 4, lengths 6 and 6: P = R = 4/6, F1 = 2PR/(P+R) = 4/6
    assert rouge_l("write a poem about the sea".split(), "write a story about the moon".split()) == pytest.approx(4 / 6)
    # LCS 3, lengths 4 and 3: P = 3/4, R = 1, F1 = 2*(3/4)/(7/4) = 6/7
    assert rouge_l("a b c d".split(), "a c d".split()) == pytest.approx(6 / 7)
    assert rouge_l([], ["a"]) == 0.0


def test_deduper_threshold_and_bound_skip():
    d = Deduper(0.7)
    d.add("Write a poem about the sea.")
    d.add("Give three tips for sleeping well.")
    assert d.too_similar("write a poem about the SEA")  # 1.0
    assert d.too_similar("Write a short poem about the sea.")  # LCS 6 of 6/7 words: 12/13
    assert not d.too_similar("Write a story about the moon.")  # 4/6 < 0.7
    assert not d.too_similar("Explain how vaccines train the immune system.")
    # The bag-of-words bound only skips pairs that cannot beat the best; the result equals brute force.
    text = "Give three short tips for sleeping well at night."
    brute = max(rouge_l(rouge_tokens(text), t) for t, _ in d.pool)
    assert d.max_similarity(text) == pytest.approx(brute)


# -------------------------------------------------------------- prompt, parse
def test_format_prompt_lists_examples_and_asks_for_next():
    p = format_prompt([Task("Add two numbers.", "2 and 3"), Task("Name a color.")])
    assert "Task 1:\nInstruction: Add two numbers.\nInput: 2 and 3" in p
    assert "Task 2:\nInstruction: Name a color.\n" in p and "Input: \n" not in p
    assert p.endswith("Task 3:")


@pytest.mark.parametrize("text,instruction,input_", [
    ("Instruction: Name three rivers in Africa.", "Name three rivers in Africa.", ""),
    ("Instruction: Sort the numbers.\nInput: 3, 1, 2\nOutput: 1, 2, 3", "Sort the numbers.", "3, 1, 2"),
    ("Task 7:\nInstruction: Describe a cat.\n\nTask 8:\nInstruction: Describe a dog.", "Describe a cat.", ""),
    ("Describe your favorite season.", "Describe your favorite season.", ""),
    ("instruction:Write a haiku.\ninput: autumn", "Write a haiku.", "autumn"),
    ("Instructions: Write a limerick.", "Write a limerick.", ""),
])
def test_parse_task(text, instruction, input_):
    assert parse_task(text) == Task(instruction, input_)


# ------------------------------------------------------------------- filters
F = FilterConfig(min_instruction_words=3, max_instruction_words=12, max_output_chars=40)
EXAMPLES = [Task("Add two numbers.", "2 and 3"), Task("Correct the grammar.", "Each of the students have finished.")]


@pytest.mark.parametrize("task,reason", [
    (Task("Name three rivers in Africa."), None),
    (Task(""), "empty_instruction"),
    (Task("Say hi."), "too_short"),
    (Task("word " * 13), "too_long"),
    (Task("Describe the picture of a beach."), "banned_keyword"),
    (Task("Summarize this text in brief.", "An image of a dog."), "banned_keyword"),  # the input counts too
    (Task("Explain the pictured scene in words."), None),  # 'picture' is a word match, not a substring
    (Task("- describe the ocean in detail"), "starts_with_punctuation"),
    (Task("Describe the ocean \ufffd in detail"), "unprintable"),
    (Task("Describe the ocean\x0b in detail"), "unprintable"),
    (Task("Describe the ocean.", "line one\n\tline two"), None),
    (Task("add two NUMBERS", "2 and 3!"), "copies_prompt"),
    (Task("Each of the students have finished."), "copies_prompt"),  # an example's input as the instruction
    (Task("Fix this: each of the students have finished, please."), "copies_prompt"),  # contains it verbatim
    (Task("Make a sentence where each student has finished."), None),
    (Task("Help find the source of a leak.", "Help me find the source of a leak."), "input_repeats_instruction"),
    (Task("Come up with a new task for an AI assistant please."), "copies_prompt"),
])
def test_check_instruction(task, reason):
    assert check_instruction(task, EXAMPLES, F) == reason


@pytest.mark.parametrize("output,finish,reason", [
    ("The Nile, the Congo and the Niger.", "stop", None),
    ("   ", "stop", "empty_output"),
    ("The Nile\x05", "stop", "unprintable"),
    ("The Nile, the Congo", "length", "truncated_output"),
    ("x" * 41, "stop", "output_too_long"),
    ("Name three rivers in Africa", "stop", "output_copies_instruction"),
    ("three rivers", "stop", "output_copies_instruction"),  # a piece of the task, nothing more
    ("Three: the Nile, the Congo, the Niger.", "stop", None),
])
def test_check_answer(output, finish, reason):
    assert check_answer(Task("Name three rivers in Africa."), output, finish, F) == reason


def test_check_answer_allow_truncated():
    f = FilterConfig(allow_truncated=True)
    assert check_answer(Task("Name three rivers."), "The Nile, the", "length", f) is None


def test_shipped_seed_tasks_pass_the_filters_and_are_distinct():
    seeds = load_seeds(SEEDS)
    assert len(seeds) >= 15
    f = FilterConfig()
    for i, t in enumerate(seeds):
        assert check_instruction(t, [], f) is None, t
        d = Deduper(f.dedup_threshold)
        for o in seeds[:i]:
            d.add(o.text)
        assert not d.too_similar(t.text), t
    assert check_sft_file(SEEDS, "instruction") == len(seeds)


# ----------------------------------------------------------------------- CLI
def _relaxed(tiny_model, out, engine):
    # A random tiny model writes gibberish: accept nearly anything so records come out, but keep dedup on.
    return ["--config", "configs/synth.yaml", f"model.path={tiny_model}", f"output={out}", f"engine={engine}",
            "num_instructions=6", "rounds=3", "prompts_per_round=4", "max_model_len=512",  # tiny model: 512 positions
            "instruction.max_new_tokens=16", "answer.max_new_tokens=12", "instruction.temperature=1.0",
            "filters.min_instruction_words=1", "filters.banned_keywords=[]", "filters.allow_truncated=true",
            "filters.reject_unprintable=false",
            "filters.dedup_threshold=0.9"]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_synth_cli_end_to_end(engine, tiny_model, tmp_path, capsys):
    if engine == "vllm":
        pytest.importorskip("vllm")
    out = tmp_path / "synth.jsonl"
    assert cli_main(["synth"] + _relaxed(tiny_model, out, engine)) == 0
    printed = capsys.readouterr().out
    assert f"engine {engine}" in printed
    assert "[synth] round 1: kept" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["records"] == len(rows) > 0
    for r in rows:
        assert set(r) == {"instruction", "input", "output", "source", "model"}
        assert r["source"] == "synth" and r["model"] == str(tiny_model)
        assert r["instruction"].strip() and r["output"].strip()
    assert check_sft_file(str(out)) == len(rows)  # what `alignloop sft` will read
    # No two kept tasks (nor a kept task and a seed) above the dedup threshold.
    d = Deduper(0.9)
    for t in load_seeds(SEEDS):
        d.add(t.text)
    for r in rows:
        assert not d.too_similar(Task(r["instruction"], r["input"]).text)
        d.add(Task(r["instruction"], r["input"]).text)


def test_synth_cli_refuses_existing_output_and_bad_seeds(tiny_model, tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    out.write_text("")
    assert cli_main(["synth"] + _relaxed(tiny_model, out, "hf")) == 2
    assert "exists; set overwrite=true" in capsys.readouterr().err
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Say hi to me.", "output": "Hi."}\n{"instruction": "No answer here."}\n')
    assert cli_main(["synth"] + _relaxed(tiny_model, tmp_path / "o.jsonl", "hf") + [f"seeds={bad}"]) == 2
    assert f"{bad}:2: missing field 'output'" in capsys.readouterr().err
    assert cli_main(["synth", "--config", "configs/synth.yaml", "filters.dedup_treshold=0.5"]) == 2
    assert "unknown key 'filters.dedup_treshold'" in capsys.readouterr().err


def test_fit_prompt_drops_examples_until_it_fits(tiny_model):
    from alignloop.rollout import HFEngine
    from sft.synth import fit_prompt

    eng = HFEngine(tiny_model)
    seeds = load_seeds(SEEDS)[:3]
    lengths = [len(eng.apply_chat_template([{"role": "user", "content": format_prompt(seeds[:k])}])) for k in (1, 2, 3)]
    assert lengths[0] < lengths[1] < lengths[2]
    assert fit_prompt(eng, seeds, lengths[2]) == (seeds, eng.apply_chat_template([{"role": "user", "content": format_prompt(seeds)}]))
    assert fit_prompt(eng, seeds, lengths[2] - 1)[0] == seeds[:2]
    assert fit_prompt(eng, seeds, lengths[0])[0] == seeds[:1]
    assert fit_prompt(eng, seeds, lengths[0] - 1) is None


def test_filter_tasks_dedups_within_a_round_and_counts_reasons():
    from collections import Counter

    from sft.synth import filter_tasks

    d = Deduper(0.7)
    d.add("Give three tips for sleeping well.")
    rejects: Counter = Counter()
    texts = ["Instruction: Name three rivers in Africa.",
             "Instruction: Name three big rivers in Africa.",  # 12/13 with the first: duplicate in the same round
             "Instruction: Give three tips for sleeping well.",  # the pool's seed
             "Instruction: Describe this picture of a cat.",
             "Instruction: Explain why the sky looks blue.\nInput: for a child"]
    kept = filter_tasks(texts, [EXAMPLES] * len(texts), d, F, rejects)
    assert kept == [Task("Name three rivers in Africa."), Task("Explain why the sky looks blue.", "for a child")]
    assert rejects == Counter(duplicate=2, banned_keyword=1)
    assert len(d.pool) == 3  # the seed and both kept tasks


def test_help_config_shows_the_defaults_that_apply():
    from alignloop.config import describe
    from sft.synth import SynthConfig

    cfg = SynthConfig()
    for line in describe(SynthConfig):
        key = line.split(" ", 1)[0]
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert f"default {value!r})" in line, line
