import pytest

from alignloop.config import ConfigError, describe, exact_div, load_config, parse_override
from sft.config import SFTConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\npeft:\n  method: lora\n")
    cfg = load_config(SFTConfig, p, ["peft.lora_r=4", "optim.lr=1e-3", "peft.target_modules=[q_proj,v_proj]", "resume=true"])
    assert cfg.peft.lora_r == 4 and cfg.optim.lr == 1e-3 and cfg.resume is True
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == "a.jsonl" and cfg.train.micro_batch_size == 4  # default kept


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\noptim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert str(p) in str(e.value) and "optim.learning_rate" in str(e.value) and "unknown key" in str(e.value)


def test_unknown_override_lists_known_keys(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p, ["peft.rank=3"])
    msg = str(e.value)
    assert "peft.rank" in msg and "lora_r" in msg


def test_wrong_type_and_value(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="peft.lora_r"):
        load_config(SFTConfig, p, ["peft.lora_r=abc"])
    with pytest.raises(ConfigError, match="peft.method"):
        load_config(SFTConfig, p, ["peft.method=lorax"])
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(SFTConfig, None, [])


def test_batch_divisibility(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(SFTConfig, p, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="ray.num_workers"):
        load_config(SFTConfig, p, ["train.global_batch_size=4", "train.micro_batch_size=4", "ray.num_workers=2"])
    cfg = load_config(SFTConfig, p, ["train.global_batch_size=16", "train.micro_batch_size=2", "ray.num_workers=2"])
    assert cfg.grad_accum == 4
    assert exact_div(12, 4, "x") == 3
    with pytest.raises(ConfigError):
        exact_div(10, 4, "x")


def test_qlora_with_zero3_is_refused(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="qlora"):
        load_config(SFTConfig, p, ["peft.method=qlora", "train.strategy=deepspeed"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    p = write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, p)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("novalue")


def test_config_is_frozen(tmp_path):
    cfg = load_config(SFTConfig, write(tmp_path, "data:\n  train: a.jsonl\n"))
    with pytest.raises(Exception):
        cfg.optim.lr = 3.0


def test_describe_lists_every_key():
    lines = describe(SFTConfig)
    assert any(line.startswith("peft.lora_r (int, default 16)") for line in lines)
    assert any(line.startswith("deepspeed.zero_stage") for line in lines)
