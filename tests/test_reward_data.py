"""Preference rows: every accepted shape, and malformed rows named by file and line."""

import json

import pytest

from alignloop.data import DataError
from reward.data import as_pairs, parse_hh_dialogue, read_preferences, to_preference


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_chosen_rejected_with_margin():
    p = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2}, "f:1")
    assert p.conversations == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                               [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]]
    assert p.margin == 2.0 and p.where == "f:1"


def test_hh_rlhf_dialogues_split_at_last_assistant_turn():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?"
    row = {"chosen": shared + "\n\nAssistant: Mix flour and water.", "rejected": shared + "\n\nAssistant: No."}
    p = to_preference(row, "hh:3")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "how do I bake bread?"}]
    assert p.conversations[0] == history + [{"role": "assistant", "content": "Mix flour and water."}]
    assert p.conversations[1] == history + [{"role": "assistant", "content": "No."}]
    # an empty final answer is a real HH answer (preferring silence), kept, not dropped
    assert parse_hh_dialogue(shared + "\n\nAssistant: ", "x", "chosen")[-1] == {"role": "assistant", "content": ""}


def test_chat_message_forms_and_feedback_export_rows():
    msgs = [{"role": "user", "content": "hi"}]
    p = to_preference({"prompt": msgs, "chosen": [{"role": "assistant", "content": "hey"}],
                       "rejected": [{"role": "assistant", "content": "go away"}]}, "c:1")
    assert p.conversations[0][-1] == {"role": "assistant", "content": "hey"}
    implicit = to_preference({"chosen": msgs + [{"role": "assistant", "content": "a"}],
                              "rejected": msgs + [{"role": "assistant", "content": "b"}]}, "c:2")
    assert implicit.conversations[1] == msgs + [{"role": "assistant", "content": "b"}]
    export = {"prompt": "ignored when messages exist", "chosen": "yes", "rejected": "no", "margin": 1.0, "item_id": 7,
              "campaign": "c", "labeler_ids": [1, 2], "created_at": "2026-01-01T00:00:00+00:00",
              "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ok?"}]}
    e = to_preference(export, "c:3")
    assert e.conversations[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ok?"},
                                  {"role": "assistant", "content": "yes"}]


def test_ranked_lists_and_their_pairs():
    p = to_preference({"prompt": "q", "ranked": ["a", "b", "c"]}, "r:1")
    assert [c[-1]["content"] for c in p.conversations] == ["a", "b", "c"]
    pairs = as_pairs([p])
    assert [(x.conversations[0][-1]["content"], x.conversations[1][-1]["content"]) for x in pairs] == \
        [("a", "b"), ("a", "c"), ("b", "c")]


def test_parquet_and_datasets_directory(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert len(read_preferences(tmp_path / "p.parquet")) == 3
    got = read_preferences(tmp_path / "ds")
    assert got[2].conversations[0][0]["content"] == "q2" and got[2].where.endswith("ds[2]")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a number"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "no turns here", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "no '\\n\\nHuman:'"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y\n\nHuman: z", "rejected": "\n\nHuman: x\n\nAssistant: y"},
     "does not end with an '\\n\\nAssistant:' turn"),
    ({"prompt": "q", "ranked": ["only one"]}, "at least 2 answers"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0]"),
    ({"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "must both be strings or both message lists"),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    f = write(tmp_path / "pairs.jsonl", [good, good, row])
    with pytest.raises(DataError) as e:
        read_preferences(f)
    assert str(e.value).startswith(f"{f}:3: ")
    assert message in str(e.value)


def test_bad_json_and_empty_file(tmp_path):
    f = write(tmp_path / "bad.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b"}', '{"prompt": '])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_preferences(f)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no preference rows"):
        read_preferences(tmp_path / "empty.jsonl")
