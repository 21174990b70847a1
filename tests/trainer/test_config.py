import dataclasses
from pathlib import Path

import pytest
import yaml

from trainer.config import DEMO, ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_YAML = str(ROOT / "trainer" / "assets" / "lora.yaml")


def test_no_arguments_is_the_demo():
    cfg = load_config([])
    assert cfg.model == "demo"
    for key, value in DEMO.items():
        assert getattr(cfg, key) == value


def test_demo_settings_apply_only_to_the_demo_model():
    cfg = load_config(["--model", "/models/glm-4-9b-chat-hf"])
    assert cfg.lr == TrainConfig.lr and cfg.max_steps == TrainConfig.max_steps


def test_yaml_then_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: /m\nlr: 5e-4\nmax_steps: 30\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(["--config", str(path), "--max-steps", "7", "--gradient_checkpointing=true"])
    assert cfg.lr == 5e-4  # YAML 1.1 reads "5e-4" as a string: coerced, not rejected
    assert cfg.max_steps == 7
    assert cfg.gradient_checkpointing is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cli = load_config(["--lora-target-modules", "q_proj,k_proj", "--model", "x"])
    assert cli.lora_target_modules == ["q_proj", "k_proj"]


def test_unknown_key_is_one_line_listing_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--learning-rate", "1e-4"])
    message = str(e.value)
    assert "\n" not in message
    assert "'learning-rate'" in message
    assert all(f.name in message for f in dataclasses.fields(TrainConfig))
    path = tmp_path / "bad.yaml"
    path.write_text("modle: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'modle'; valid keys: model, "):
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "fast"], "lr: expected float, got 'fast'"),
        (["--max-steps", "1.5"], "max_steps: expected int, got '1.5'"),
        (["--gradient-checkpointing", "maybe"], "gradient_checkpointing: expected bool"),
        (["--schedule", "step"], "schedule: 'step' is not one of cosine, linear, constant"),
        (["--grad-accum", "0"], "grad_accum: must be at least 1"),
        (["--lr"], "--lr needs a value"),
        (["lr", "1"], "expected --key value, got 'lr'"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_values_are_one_line_errors(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_yaml_type_errors(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match="max_steps: expected int, got 'ten'"):
        load_config(["--config", str(path)])
    path.write_text("lora_r: true\n")
    with pytest.raises(ConfigError, match="lora_r: expected int, got True"):
        load_config(["--config", str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(["--config", str(path)])


def test_every_field_has_a_comment():
    source = (ROOT / "trainer" / "config.py").read_text()
    for f in dataclasses.fields(TrainConfig):
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{f.name}:"))
        above = source.splitlines()[source.splitlines().index(line) - 1].strip()
        assert "#" in line or above.startswith("#"), f.name


def test_shipped_example_yaml_loads():
    with open(EXAMPLE_YAML) as f:
        keys = yaml.safe_load(f)
    cfg = load_config(["--config", EXAMPLE_YAML])
    for key, value in keys.items():
        assert getattr(cfg, key) == value or getattr(cfg, key) == float(value), key
