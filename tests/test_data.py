import json

import pytest

from alignloop.data import DataError, check_sft_file, iter_rows, load_sft_examples, to_messages
from alignloop.models import load_tokenizer

ROWS = {
    "instruction": {"instruction": "Add 1 and 2.", "input": "1 + 2", "output": "3"},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
                              {"role": "assistant", "content": "3"}]},
    "conversations": {"conversations": [{"from": "human", "value": "Add 1 and 2."}, {"from": "gpt", "value": "3"}]},
    "prompt_completion": {"prompt": "Add 1 and 2.", "completion": "3"},
}


@pytest.mark.parametrize("kind", list(ROWS))
def test_formats_normalise_to_chat(kind):
    msgs = to_messages(ROWS[kind], "f:1")
    assert msgs[-1] == {"role": "assistant", "content": "3"}
    assert any(m["role"] == "user" and m["content"].startswith("Add 1 and 2.") for m in msgs)


def test_instruction_input_joined():
    msgs = to_messages(ROWS["instruction"], "f:1")
    assert msgs[0]["content"] == "Add 1 and 2.\n\n1 + 2"
    assert to_messages({"instruction": "Hi", "output": "Yo"}, "f:1")[0]["content"] == "Hi"


def test_prompt_completion_message_lists():
    row = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    assert [m["role"] for m in to_messages(row, "x")] == ["user", "assistant"]


@pytest.mark.parametrize("row,needle", [
    ({"instruction": "Hi"}, "missing field 'output'"),
    ({"instruction": "Hi", "output": ""}, "field 'output' is empty"),
    ({"instruction": 3, "output": "x"}, "field 'instruction' must be a string"),
    ({"instruction": "Hi", "input": 5, "output": "x"}, "field 'input' must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "last message must be a non-empty assistant answer"),
    ({"conversations": [{"from": "human", "value": 1}]}, "conversations[0].value must be a string"),
    ({"prompt": "x", "completion": ["y"]}, "both be strings or both message lists"),
    ({"text": "x"}, "cannot tell the record format"),
])
def test_malformed_rows_name_the_line(tmp_path, row, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS["instruction"]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        check_sft_file(str(p))
    assert f"{p}:2:" in str(e.value) and needle in str(e.value)


def test_bad_json_line_and_non_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS["instruction"]) + "\n\n{broken\n")
    with pytest.raises(DataError, match=rf"{p}:3: not valid JSON"):
        check_sft_file(str(p))
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=rf"{p}:1: expected a JSON object"):
        check_sft_file(str(p))


def test_json_parquet_and_datasets_dir(tmp_path):
    rows = [ROWS["instruction"], ROWS["prompt_completion"]]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(rows))
    assert check_sft_file(str(j)) == 2
    import datasets

    ds = datasets.Dataset.from_list([ROWS["instruction"]] * 3)
    pq = tmp_path / "d.parquet"
    ds.to_parquet(str(pq))
    assert check_sft_file(str(pq)) == 3
    ds.save_to_disk(str(tmp_path / "dsdir"))
    assert check_sft_file(str(tmp_path / "dsdir")) == 3
    bad = datasets.Dataset.from_list([ROWS["instruction"], {"instruction": "x", "input": "", "output": ""}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[1\]: field 'output' is empty"):
        check_sft_file(str(tmp_path / "bad"))
    j.write_text(json.dumps([ROWS["instruction"], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"d.json\[1\]: missing field 'output'"):
        check_sft_file(str(j))


def test_unknown_extension_and_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(iter_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        list(iter_rows(tmp_path / "d.csv"))


def test_loss_only_on_answers(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    p = tmp_path / "d.jsonl"
    multi = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]}
    p.write_text(json.dumps(ROWS["instruction"]) + "\n" + json.dumps(multi) + "\n")
    ex = load_sft_examples(str(p), tok, "auto", 256, "answer")
    trained = tok.decode([t for t, lab in zip(ex[0].input_ids, ex[0].labels) if lab != -100])
    assert trained.startswith("3<|im_end|>")
    assert "Add" not in trained and "user" not in trained
    trained2 = tok.decode([t for t, lab in zip(ex[1].input_ids, ex[1].labels) if lab != -100])
    assert "first answer" in trained2 and "second answer" in trained2 and "one" not in trained2 and "two" not in trained2
    every = load_sft_examples(str(p), tok, "auto", 256, "all")
    assert all(lab == t for t, lab in zip(every[0].input_ids, every[0].labels))


def test_truncation_that_removes_the_answer_is_an_error(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "word " * 200, "output": "short"}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:1: no answer tokens left within data.max_length=32"):
        load_sft_examples(str(p), tok, "auto", 32, "answer")


def test_default_chat_template_for_model_without_one(tiny_model, tmp_path):
    import shutil

    from alignloop.models import DEFAULT_CHAT_TEMPLATE

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(str(d))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
