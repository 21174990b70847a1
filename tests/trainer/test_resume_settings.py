"""Resuming with other settings: refused with every change named, or applied on purpose from the next step."""

import json

import pytest
import torch
import yaml

import trainer.train as train_module
from trainer.config import FIELDS, ConfigError, TrainConfig, config_to_dict, load_config
from trainer.resume import FREE, OVERRIDABLE, apply_overrides, changed_settings, compare_with_checkpoint
from trainer.train import lr_lambda, train

# The settings that may change silently. Any other key, including one added later, is compared.
NEVER_CHANGE_THE_WEIGHTS = {"device", "attn_backend", "attn_dropout", "loss_backend",
                            "gradient_checkpointing", "val_file",
                            "log_every", "eval_every", "patience", "save_every", "save_merged", "output_dir",
                            "resume", "resume_override", "report_to", "max_bad_steps", "eval_generate",
                            "eval_max_new_tokens", "metric_for_best", "ref_logps"}  # fmt: skip


def test_every_other_setting_is_compared():
    assert set(FREE) == NEVER_CHANGE_THE_WEIGHTS
    saved = config_to_dict(TrainConfig())
    for key in FIELDS:
        if key in NEVER_CHANGE_THE_WEIGHTS:
            continue
        changed = {**saved, key: "something else"}
        assert list(changed_settings(changed, TrainConfig())) == [key], key


def test_all_changes_named_in_one_line_old_to_new():
    saved = config_to_dict(TrainConfig(lr=5e-3, warmup=10))
    cfg = TrainConfig(lr=1e-2, warmup=4, log_every=1, resume="auto")
    with pytest.raises(ConfigError) as e:
        compare_with_checkpoint(saved, cfg, "ckpt")
    message = str(e.value)
    assert "\n" not in message
    assert "lr 0.005 -> 0.01, warmup 10 -> 4" in message and "--resume-override lr,warmup" in message
    assert "log_every" not in message
    cfg.resume_override = ["lr"]  # one of the two on purpose is not enough
    with pytest.raises(ConfigError, match="warmup 10 -> 4;"):
        compare_with_checkpoint(saved, cfg, "ckpt")
    cfg.resume_override = ["lr", "warmup"]
    assert compare_with_checkpoint(saved, cfg, "ckpt") == {"lr": (5e-3, 1e-2), "warmup": (10, 4)}


def test_data_and_model_settings_cannot_be_overridden():
    saved = config_to_dict(TrainConfig())
    cfg = TrainConfig(max_tokens=4096, lr=1e-3, resume="auto", resume_override=["lr"])
    with pytest.raises(ConfigError, match="max_tokens 8192 -> 4096; these decide which rows"):
        compare_with_checkpoint(saved, cfg, "ckpt")
    assert "max_tokens" not in OVERRIDABLE


def test_a_key_missing_from_an_older_checkpoint_counts_as_its_default():
    saved = config_to_dict(TrainConfig())
    del saved["min_lr_ratio"]
    assert changed_settings(saved, TrainConfig()) == {}
    assert changed_settings(saved, TrainConfig(min_lr_ratio=0.1)) == {"min_lr_ratio": (0.0, 0.1)}


def _optimizer(cfg, total):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def test_overrides_apply_from_the_next_step():
    old = TrainConfig(lr=1e-3, warmup=2, weight_decay=0.0, schedule="linear")
    opt, sched = _optimizer(old, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    saved = opt.state_dict(), sched.state_dict()
    new = TrainConfig(lr=4e-3, warmup=2, weight_decay=0.1, schedule="constant")
    opt, sched = _optimizer(new, 10)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    assert opt.param_groups[0]["lr"] != 4e-3  # loading brings the old lr back: what resume did before
    line = apply_overrides({"lr": (1e-3, 4e-3)}, new, opt, sched)
    assert "from step 5" in line and "lr 0.001 -> 0.004" in line
    assert opt.param_groups[0]["lr"] == 4e-3 and opt.param_groups[0]["weight_decay"] == 0.1
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 4e-3  # and it stays: the constant schedule on the new lr


def test_resume_refuses_a_changed_lr_then_applies_it_on_purpose(tmp_path, capsys, monkeypatch):
    args = ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--log-every", "1",
            "--lr", "5e-3", "--warmup", "0", "--schedule", "constant", "--save-every", "2",
            "--eval-every", "0", "--val-file", "", "--output-dir", str(tmp_path)]  # fmt: skip
    train(load_config([*args, "--max-steps", "2"]))
    refused = r"max_steps 2 -> 4, lr 0.005 -> 0.01; .* --resume-override max_steps,lr"
    with monkeypatch.context() as m, pytest.raises(ConfigError, match=refused):
        m.setattr(train_module, "prepare_model", lambda *a, **k: pytest.fail("refused after loading"))
        train(load_config([*args, "--max-steps", "4", "--lr", "1e-2", "--resume", "auto"]))
    capsys.readouterr()
    override = ["--resume", "auto", "--resume-override", "max_steps,lr"]
    train(load_config([*args, "--max-steps", "4", "--lr", "1e-2", *override]))
    assert "resume override from step 3: max_steps 2 -> 4, lr 0.005 -> 0.01" in capsys.readouterr().out
    records = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == [5e-3, 5e-3, 1e-2, 1e-2]
    for path in (tmp_path / "train_config.yaml", tmp_path / "checkpoint-000004" / "train_config.yaml"):
        assert yaml.safe_load(path.read_text())["lr"] == 1e-2  # what actually ran
