"""`python -m trainer`: the help text, and settings errors answered before torch is imported."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.__main__ import help_text, main
from trainer.config import FIELDS, TrainConfig, _coerce

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "templates"


def _help_options() -> dict[str, tuple[str, str]]:
    """{key: (default as shown, comment)} in the order the help lists them."""
    found = {}
    for line in help_text().splitlines():
        m = re.match(r"^  --([a-z-]+) (\S+)\s+(.*)$", line)
        if m:
            found[m.group(1).replace("-", "_")] = (m.group(2), m.group(3))
    return found


def test_help_lists_subcommands_and_every_key_with_its_real_default_in_readme_order(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "check", "generate"):
        assert re.search(rf"^  {command} ", out, re.M), command
    options = _help_options()
    readme = (ROOT / "README.md").read_text()
    settings = readme[readme.index("## Configuration") :].split("\n## ")[0]  # that section's table only
    readme_keys = re.findall(r"^\| `(\w+)` \|", settings, re.M)
    assert list(options) == readme_keys == list(FIELDS)
    source = (ROOT / "trainer" / "config.py").read_text()
    source = re.sub(r"\n *# ", " ", source)  # a comment over several lines is one comment
    for key, (shown, comment) in options.items():
        default = getattr(TrainConfig(), key)
        typed = "" if shown == '""' else shown
        assert _coerce(key, typed, from_cli=True) == default, (key, shown)  # the real default, not the demo's
        assert "[" not in shown and "'" not in shown, shown  # a list as one types it
        assert comment and comment in source, key  # the field's own comment
    assert options["lr"][0] == "0.0002" and options["max_steps"][0] == "0"
    assert options["output_dir"][0] == "outputs"
    assert options["lora_target_modules"][0] == "all-linear"
    assert "max_steps=200" in out  # the demo's settings are named as such


# Each case: arguments and a piece of the one-line error. Run in one fresh interpreter, which reports
# whether torch had been imported when main() returned.
CASES = {
    "unknown key": (["--learning-rate", "1e-4"], "unknown key 'learning-rate'"),
    "wrong type": (["--max-steps", "ten"], "max_steps: expected int"),
    "bad value": (["--schedule", "step"], "schedule: 'step' is not one of"),
    "too small": (["--max-tokens", "100", "--max-length", "200"], "max_tokens=100 is less than max_length"),
    "patience without validation": (["--patience", "2", "--val-file", ""], "needs validation data"),
    "override without resume": (["--resume-override", "lr"], "resume_override is set but resume is not"),
    "override of a fixed key": (["--resume", "auto", "--resume-override", "model"], "model cannot change"),
    "unknown reporter": (["--report-to", "mlflow"], "report_to: 'mlflow' is not one of"),
    "output dir is a file": (["--output-dir", "{file}"], "is a file; choose a directory"),
    "output dir inside a file": (["--output-dir", "{file}/run"], "which is a file"),
    "check with a bad key": (["check", "--num-batches", "1", "--modle", "x"], "unknown key 'modle'"),
    "explicit train": (["train", "--lr", "fast"], "lr: expected float"),
}
SCRIPT = """
import contextlib, io, json, sys
from trainer.__main__ import main
results = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    results[name] = [rc, err.getvalue(), "torch" in sys.modules]
print(json.dumps(results))
"""


def test_settings_errors_are_one_line_exit_2_before_torch_is_imported(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    cases = {name: [a.format(file=file) for a in args] for name, (args, _) in CASES.items()}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # fmt: skip
    results = json.loads(run.stdout.splitlines()[-1])
    for name, (_, message) in CASES.items():
        rc, err, torch_loaded = results[name]
        assert rc == 2, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert not torch_loaded, name


def test_help_through_python_m_does_not_import_torch():
    code = (
        "import runpy, sys\nsys.argv = ['trainer', '--help']\n"
        "try:\n    runpy.run_module('trainer', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0\nprint('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "--lora-target-modules all-linear" in run.stdout
    assert run.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize("command", ["check", "generate"])
def test_subcommand_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"python -m trainer {command}" in capsys.readouterr().out


def test_a_model_directory_without_tokenizer_files_is_one_line_exit_2(tmp_path):
    """transformers builds an empty one-token tokenizer from such a directory; the run then died later
    with a traceback about the missing chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    argv = ["--model", str(tmp_path / "model"), "--template", "chat_template", "--output-dir", str(out)]
    cmd = [sys.executable, "-m", "trainer", *argv]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"no tokenizer files in {tmp_path / 'model'}" in lines[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def _model_dir(path: Path, *, chat_template: str | None = None, weights: str = "garbage") -> Path:
    """A model directory with the demo tokenizer (``chat_template``: another template, with ChatML's
    tokens) and a small Llama config; ``weights``: "garbage" (a file no loader reads) or "real"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.data import load_tokenizer

    tokenizer = load_tokenizer("demo")
    if chat_template is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    if weights == "real":
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
        (path / "model.safetensors").write_bytes(b"not a safetensors file" * 64)
    return path


@pytest.mark.parametrize("problem", ["bad record", "old checkpoints"])
def test_data_and_output_dir_errors_come_before_the_model_loads(tmp_path, problem):
    """A bad record or a fresh run over an old run's checkpoints is one line, exit 2, before the model is
    loaded (minutes on a real model): here its weights are garbage, so loading it would fail otherwise."""
    model = _model_dir(tmp_path / "model")
    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    if problem == "bad record":
        data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "usr", "content": "x"}]}))
        expected = f"{data}:2: message 1: unknown role 'usr'"
    else:
        data.write_text(json.dumps(good) + "\n")
        (out / "checkpoint-000010").mkdir(parents=True)
        expected = f"output_dir {out} already holds checkpoints (newest checkpoint-000010)"
    argv = ["--model", str(model), "--train-file", str(data), "--val-file", "", "--output-dir", str(out),
            "--device", "cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "trainer", *argv]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "attention layers" not in run.stdout + run.stderr  # printed once the model is loaded


def test_template_auto_takes_the_models_own_chat_template_and_resumes_the_same(tmp_path):
    """A non-GLM-4 tokenizer with the default template used to die after the model loaded ("the chat
    template does not start with [gMASK]<sop>"); auto takes its own template, says so, saves the resolved
    name, and a resumed run with auto resolves the same way."""
    chatml = (FIXTURES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    model = _model_dir(tmp_path / "model", chat_template=chatml, weights="real")
    out = tmp_path / "run"
    argv = ["--model", str(model), "--val-file", "", "--output-dir", str(out), "--device", "cpu",
            "--max-length", "256", "--max-tokens", "256", "--save-every", "1"]  # fmt: skip
    cmd = [sys.executable, "-m", "trainer", *argv]
    run = subprocess.run([*cmd, "--max-steps", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "template: chat_template (auto: " in run.stdout + run.stderr
    import yaml

    assert yaml.safe_load((out / "checkpoint-000001" / "train_config.yaml").read_text())["template"] == (
        "chat_template"
    )
    resumed = subprocess.run([*cmd, "--max-steps", "2", "--resume", "auto", "--resume-override", "max_steps"],
                             capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr


def test_help_gives_a_comment_above_its_field_whole():
    """A field commented on the lines above it gets all of them: --metric-for-best named only the last line's
    metrics, leaving out val_loss and exact_match."""
    options = _help_options()
    metric = options["metric_for_best"][1]
    assert all(name in metric for name in ("val_loss", "exact_match", "similarity", "length_ratio")), metric
    template = options["template"][1]
    assert template.startswith('"auto": glm4 for a GLM-4 tokenizer') and '"chat_template"' in template


def test_only_bitsandbytes_failed_kernel_fetch_is_silenced(caplog):
    """Importing the trainer hides bitsandbytes' line about a hub kernel it never runs, nothing else."""
    import trainer  # noqa: F401  (the filter is installed on import)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "not trusted")
        log.warning("a 4-bit weight could not be read")
    assert [r.getMessage() for r in caplog.records] == ["a 4-bit weight could not be read"]
