"""``alignloop synth --config configs/synth.yaml [dotted.key=value ...]``: self-instruct synthetic data.

Self-instruct (Wang et al. 2023, arXiv:2212.10560), one round at a time:

1. prompts: each shows k tasks (``examples.from_seeds`` human seed tasks and
   ``examples.from_generated`` tasks kept so far) and asks for one more;
2. instructions: the model writes a new instruction (and optional input);
3. filter: length bounds, banned keywords, copies of the prompt, and
   ROUGE-L similarity to every task in the pool above ``filters.dedup_threshold``;
4. answers: the model answers each surviving instruction as a normal chat turn;
5. filter: empty, truncated, or a copy of the instruction;
6. write: records ``{"instruction", "input", "output", "source", "model"}``,
   each checked with ``alignloop.data.to_messages`` (readable by ``alignloop sft``).

Rounds repeat until ``num_instructions`` records exist or ``rounds`` is spent.
Generation goes through ``alignloop.rollout`` (vLLM or transformers).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignloop.config import ConfigError, Section
from alignloop.sections import ModelConfig
from alignloop.stage import parse_stage_args, quiet_env, run_stage, warn_slow_dtypes


# ---------------------------------------------------------------------- config
class SamplingSection(Section):
    max_new_tokens: int = Field(128, gt=0, description="tokens generated at most")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")


class InstructionSampling(SamplingSection):
    """Writing new tasks: warm sampling for variety."""

    max_new_tokens: int = Field(96, gt=0, description="tokens generated at most")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0 = greedy)")


class AnswerSampling(SamplingSection):
    """Answering them: cooler sampling, longer output."""

    max_new_tokens: int = Field(256, gt=0, description="tokens generated at most")
    temperature: float = Field(0.3, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")


class ExamplesConfig(Section):
    from_seeds: int = Field(4, ge=0, description="in-context examples drawn from the seed tasks per prompt")
    from_generated: int = Field(2, ge=0, description="in-context examples drawn from tasks generated so far (seeds fill in while there are too few)")

    @model_validator(mode="after")
    def _some(self):
        if self.from_seeds + self.from_generated < 1:
            raise ValueError("examples: from_seeds + from_generated must be at least 1")
        return self


class FilterConfig(Section):
    min_instruction_words: int = Field(3, ge=1, description="shortest instruction kept, in words")
    max_instruction_words: int = Field(150, ge=1, description="longest instruction kept, in words")
    min_output_chars: int = Field(1, ge=1, description="shortest answer kept, in characters (empty answers are always rejected)")
    max_output_chars: int = Field(4000, ge=1, description="longest answer kept, in characters")
    banned_keywords: list[str] = Field(["image", "images", "picture", "pictures", "graph", "graphs", "photo", "file", "files", "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
                                       description="instructions containing one of these words are dropped (a text model cannot do them)")
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="drop an instruction whose ROUGE-L F1 with any pool task is above this")
    allow_truncated: bool = Field(False, description="keep answers cut by answer.max_new_tokens")
    reject_unprintable: bool = Field(True, description="drop tasks and answers with control characters or U+FFFD (broken byte decoding)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_instruction_words > self.max_instruction_words:
            raise ValueError("filters.min_instruction_words must be <= max_instruction_words")
        if self.min_output_chars > self.max_output_chars:
            raise ValueError("filters.min_output_chars must be <= max_output_chars")
        return self


class SynthConfig(Section):
    model: ModelConfig = ModelConfig()
    seeds: str = Field("sft/data/seed_tasks.jsonl", description="seed tasks: JSONL records with instruction, input (optional), output")
    output: str = Field("runs/synth/synth.jsonl", description="JSONL file the new records are written to")
    overwrite: bool = Field(False, description="replace an existing output file (else it is an error)")
    num_instructions: int = Field(50, gt=0, description="records to produce")
    rounds: int = Field(20, gt=0, description="rounds at most (each round samples prompts_per_round new tasks)")
    prompts_per_round: int = Field(16, gt=0, description="new-task prompts per round")
    engine: Literal["vllm", "hf", "auto"] = Field("auto", description="rollout engine (auto: vLLM when importable)")
    max_model_len: int = Field(2048, gt=0, description="context length (prompt + generation); prompts are fitted to it by dropping in-context examples")
    examples: ExamplesConfig = ExamplesConfig()
    instruction: InstructionSampling = InstructionSampling()
    answer: AnswerSampling = AnswerSampling()
    filters: FilterConfig = FilterConfig()
    seed: int = Field(0, description="seed for example sampling and generation")


# ------------------------------------------------------------ ROUGE-L dedup
def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, non-alphanumerics become spaces, split."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, one DP row (O(|a||b|) time, O(|b|) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 = 2·LCS / (|a| + |b|) (precision and recall equally weighted, as self-instruct uses)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class Deduper:
    """The pool of task texts; ``too_similar`` answers whether a new one is within the threshold of any."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.pool: list[tuple[list[str], Counter]] = []

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        self.pool.append((toks, Counter(toks)))

    def max_similarity(self, text: str) -> float:
        toks = rouge_tokens(text)
        bag = Counter(toks)
        best = 0.0
        for other, other_bag in self.pool:
            # LCS <= shared word count: skip the quadratic DP when even that bound stays under the best so far.
            bound = 2 * sum((bag & other_bag).values()) / max(1, len(toks) + len(other))
            if bound <= best:
                continue
            best = max(best, rouge_l(toks, other))
        return best

    def too_similar(self, text: str) -> bool:
        return self.max_similarity(text) > self.threshold


# ----------------------------------------------------------- prompt & parse
HEADER = ("Come up with a new task for an AI assistant. Here are some example tasks; write one more that is "
          "different from all of them. Answer with the task only, in the same format: a line starting with "
          "\"Instruction:\" and, if the task needs extra material, a line starting with \"Input:\".")


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str = ""

    @property
    def text(self) -> str:
        """What dedup compares: instruction and input together."""
        return f"{self.instruction} {self.input}".strip()


def format_prompt(examples: list[Task]) -> str:
    parts = [HEADER, ""]
    for i, t in enumerate(examples, 1):
        parts.append(f"Task {i}:\nInstruction: {t.instruction}")
        if t.input.strip():
            parts.append(f"Input: {t.input}")
        parts.append("")
    parts.append(f"Task {len(examples) + 1}:")
    return "\n".join(parts)


_LABEL = re.compile(r"^\s*(instruction|input|output)s?\s*:\s*", re.IGNORECASE | re.MULTILINE)


def parse_task(text: str) -> Task:
    """The model's new task: "Instruction: ... [Input: ...]"; unlabeled text is all instruction.

    An echoed leading "Task N:" is dropped, and so is everything after an
    "Output:" label (the model answering) or a further "Task N:" (the model
    inventing more tasks).
    """
    text = re.sub(r"^\s*task\s*\d+\s*:\s*", "", text, flags=re.IGNORECASE)
    text = re.split(r"^\s*task\s*\d+\s*:", text, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)[0]
    marks = list(_LABEL.finditer(text))
    if not marks:
        return Task(text.strip())
    fields: dict[str, str] = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        fields.setdefault(m.group(1).lower(), text[m.end(): nxt.start() if nxt else len(text)].strip())
    instruction = fields.get("instruction") or text[: marks[0].start()].strip()
    return Task(instruction, fields.get("input", ""))


# ------------------------------------------------------------------ filters
def _has_keyword(text: str, keyword: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(keyword.lower())}(?![a-z0-9])", text.lower()) is not None


def _unprintable(text: str) -> bool:
    return "\ufffd" in text or any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text)


def check_instruction(task: Task, examples: list[Task], f: FilterConfig) -> str | None:
    """The rejection reason for a new task, or None to keep it (dedup is separate: it needs the pool)."""
    words = task.instruction.split()
    if not words:
        return "empty_instruction"
    if len(words) < f.min_instruction_words:
        return "too_short"
    if len(words) > f.max_instruction_words:
        return "too_long"
    if f.reject_unprintable and _unprintable(task.text):
        return "unprintable"
    if any(_has_keyword(task.text, k) for k in f.banned_keywords):
        return "banned_keyword"
    if not task.instruction[0].isalnum():
        return "starts_with_punctuation"  # self-instruct: such generations are fragments
    if re.search(r"(?im)^\s*(task\s*\d+|instruction|input|output)\s*:", task.text) or HEADER[:40].lower() in task.text.lower():
        return "copies_prompt"
    # A copy of an example: the whole task, or its instruction or input, is an example's instruction or input
    # (small models like to promote an example's input to a new instruction), or contains one verbatim.
    if task.input and rouge_l(rouge_tokens(task.instruction), rouge_tokens(task.input)) > f.dedup_threshold:
        return "input_repeats_instruction"
    mine = [" ".join(rouge_tokens(x)) for x in (task.text, task.instruction, task.input) if x.strip()]
    theirs = [" ".join(rouge_tokens(x)) for e in examples for x in (e.text, e.instruction, e.input) if x.strip()]
    if any(m == t or (len(t.split()) >= 5 and f" {t} " in f" {m} ") for m in mine for t in theirs):
        return "copies_prompt"
    return None


def check_answer(task: Task, output: str, finish_reason: str, f: FilterConfig) -> str | None:
    out = output.strip()
    if not out:
        return "empty_output"
    if f.reject_unprintable and _unprintable(out):
        return "unprintable"
    if finish_reason == "length" and not f.allow_truncated:
        return "truncated_output"
    if len(out) < f.min_output_chars:
        return "output_too_short"
    if len(out) > f.max_output_chars:
        return "output_too_long"
    said, asked = " ".join(rouge_tokens(out)), " ".join(rouge_tokens(task.text))
    if said == asked or (said and f" {said} " in f" {asked} "):  # the answer repeats (part of) the task
        return "output_copies_instruction"
    return None


# ---------------------------------------------------------------- pipeline
def load_seeds(path: str) -> list[Task]:
    from alignloop.data import DataError, iter_rows, to_messages

    tasks = []
    for row, where in iter_rows(path):
        to_messages(row, where, "instruction")  # same checks as SFT data: names file:line on a bad row
        tasks.append(Task(row["instruction"].strip(), (row.get("input") or "").strip()))
    if not tasks:
        raise DataError(f"{path}: no seed tasks")
    return tasks


def sample_examples(rng: random.Random, seeds: list[Task], generated: list[Task], ex: ExamplesConfig) -> list[Task]:
    from_gen = rng.sample(generated, min(ex.from_generated, len(generated)))
    from_seed = rng.sample(seeds, min(len(seeds), ex.from_seeds + ex.from_generated - len(from_gen)))
    examples = from_seed + from_gen
    rng.shuffle(examples)
    return examples


def fit_prompt(engine, examples: list[Task], budget: int) -> tuple[list[Task], list[int]] | None:
    """Drop trailing examples until the rendered prompt leaves room for the generation; None if one is too many."""
    while examples:
        ids = engine.apply_chat_template([{"role": "user", "content": format_prompt(examples)}])
        if len(ids) <= budget:
            return examples, ids
        examples = examples[:-1]
    return None


def _settings(s: SamplingSection, seed: int):
    from alignloop.rollout import SamplingSettings

    return SamplingSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            n=1, seed=seed)


def make_prompts(engine, rng: random.Random, seeds: list[Task], generated: list[Task], cfg: SynthConfig,
                 rejects: Counter) -> tuple[list[list[Task]], list[list[int]]]:
    """Step 1: ``prompts_per_round`` new-task prompts (their examples and token ids), each fitted to the context."""
    examples, ids = [], []
    for _ in range(cfg.prompts_per_round):
        fitted = fit_prompt(engine, sample_examples(rng, seeds, generated, cfg.examples),
                            cfg.max_model_len - cfg.instruction.max_new_tokens)
        if fitted is None:
            rejects["prompt_too_long"] += 1
        else:
            examples.append(fitted[0])
            ids.append(fitted[1])
    return examples, ids


def filter_tasks(texts: list[str], examples: list[list[Task]], dedup: Deduper, f: FilterConfig,
                 rejects: Counter) -> list[Task]:
    """Steps 2-3: parse each generated task, drop the bad ones; survivors join the dedup pool at once."""
    kept = []
    for text, ex in zip(texts, examples):
        task = parse_task(text)
        reason = check_instruction(task, ex, f) or ("duplicate" if dedup.too_similar(task.text) else None)
        if reason:
            rejects[reason] += 1
        else:
            dedup.add(task.text)
            kept.append(task)
    return kept


def answer_tasks(engine, tasks: list[Task], cfg: SynthConfig, seed: int, rejects: Counter) -> list[tuple[Task, str]]:
    """Steps 4-5: answer each task as an ordinary user turn, drop the bad answers."""
    budget = cfg.max_model_len - cfg.answer.max_new_tokens
    fitting, ids = [], []
    for t in tasks:
        p = engine.apply_chat_template([{"role": "user", "content": _user_turn(t)}])
        if len(p) > budget:
            rejects["prompt_too_long"] += 1
        else:
            fitting.append(t)
            ids.append(p)
    outs = engine.generate(ids, _settings(cfg.answer, seed)) if ids else []
    kept = []
    for t, samples in zip(fitting, outs):
        c = samples[0]
        reason = check_answer(t, c.text, c.finish_reason, cfg.filters)
        if reason:
            rejects[reason] += 1
        else:
            kept.append((t, c.text.strip()))
    return kept


def synthesize(cfg: SynthConfig, engine, seeds: list[Task], out_path: Path, log=print) -> dict:
    """Run the rounds with ``engine``, writing records to ``out_path``; return a summary."""
    from alignloop.data import to_messages

    rng = random.Random(cfg.seed)  # in-context example choice
    seed_rng = random.Random(cfg.seed + 1)  # a fresh base seed per generate call: streams never overlap by offset
    dedup = Deduper(cfg.filters.dedup_threshold)  # the pool: seeds, then every task that passes the filters
    for t in seeds:
        dedup.add(t.text)
    generated: list[Task] = []
    rejected: Counter = Counter()
    rounds_done = 0
    with open(out_path, "w", encoding="utf-8") as fh:
        while len(generated) < cfg.num_instructions and rounds_done < cfg.rounds:
            rounds_done += 1
            rejects: Counter = Counter()
            examples, prompt_ids = make_prompts(engine, rng, seeds, generated, cfg, rejects)  # 1. prompts
            outs = engine.generate(prompt_ids, _settings(cfg.instruction, seed_rng.randrange(2**31))) if prompt_ids else []
            tasks = filter_tasks([o[0].text for o in outs], examples, dedup, cfg.filters, rejects)  # 2-3. tasks
            room = cfg.num_instructions - len(generated)
            if len(tasks) > 2 * room:  # near the target: answer twice what is missing (answers get rejected too)
                rejects["over_target"] += len(tasks) - 2 * room
                tasks = tasks[:2 * room]
            answered = answer_tasks(engine, tasks, cfg, seed_rng.randrange(2**31), rejects)  # 4-5. answers
            if len(answered) > room:
                rejects["over_target"] += len(answered) - room
                answered = answered[:room]
            for task, output in answered:  # 6. write
                record = {"instruction": task.instruction, "input": task.input, "output": output, "source": "synth",
                          "model": cfg.model.path}
                to_messages(record, f"{out_path}:{len(generated) + 1}", "instruction")  # what `alignloop sft` checks
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                generated.append(task)
            fh.flush()
            rejected.update(rejects)
            reasons = ", ".join(f"{k}={v}" for k, v in rejects.most_common()) or "none"
            log(f"[synth] round {rounds_done}: kept {len(answered)}, rejected {sum(rejects.values())} ({reasons}); "
                f"total {len(generated)}/{cfg.num_instructions}", flush=True)
    return {"output": str(out_path), "records": len(generated), "target": cfg.num_instructions, "rounds": rounds_done,
            "rejected": dict(rejected.most_common())}


def _user_turn(task: Task) -> str:
    # The same user turn alignloop.data.to_messages builds from the record, so training sees what generated it.
    return task.instruction if not task.input else f"{task.instruction}\n\n{task.input}"


def _body(argv: list[str]) -> int:
    quiet_env()
    cfg = parse_stage_args("synth", SynthConfig, argv)
    # Fail fast, before any model is loaded: seed rows, output path, model path.
    seeds = load_seeds(cfg.seeds)
    out_path = Path(cfg.output)
    if out_path.exists() and not cfg.overwrite:
        raise ConfigError(f"output: {out_path} exists; set overwrite=true or choose another output")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from alignloop.models import resolve_model_path
    from alignloop.rollout import make_engine

    path = resolve_model_path(cfg.model.path)
    warn_slow_dtypes(cfg)
    t0 = time.time()
    engine = make_engine(cfg.engine, path, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
                         chat_template=cfg.model.chat_template)
    print(f"[synth] engine {engine.kind}, model {path}, {len(seeds)} seed tasks -> {out_path}", flush=True)
    try:
        summary = synthesize(cfg, engine, seeds, out_path)
    finally:
        engine.close()
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary), flush=True)
    if summary["records"] < cfg.num_instructions:
        print(f"[synth] warning: only {summary['records']} of {cfg.num_instructions} records after {cfg.rounds} rounds "
              "(raise rounds or prompts_per_round, or relax filters)", file=sys.stderr)
    return 0 if summary["records"] else 1


def main(argv: list[str]) -> int:
    return run_stage("synth", _body, argv)
