"""``python -m trainer``: argument parsing only. Settings are read and checked before torch is imported,
so ``--help`` and a bad setting answer at once."""

import sys
import textwrap

from trainer.config import DEMO, TrainConfig, field_help, load_config, show_value

USAGE = """\
usage: python -m trainer [train] [--config file.yaml] [--key value ...]
       python -m trainer check [--num-batches N] [--tolerance X] [--config file.yaml] [--key value ...]
       python -m trainer generate --adapter DIR (--prompt TEXT | --conversation FILE) [options]

subcommands:
  train      fine-tune a LoRA adapter (the default: `python -m trainer` trains the built-in demo)
  check      compare this trainer's loss and gradients with plain Hugging Face on your data
  generate   answer a prompt or a conversation with a trained adapter
  (`python -m trainer check --help`, `python -m trainer generate --help`: their own options)

settings: defaults below; a YAML file (--config) overrides them, then --key value (--key-with-dashes
and --key=value work too). Lists are comma-separated: --lora-target-modules q_proj,v_proj"""


def help_text() -> str:
    defaults = TrainConfig()
    width = max(len(key) + len(show_value(getattr(defaults, key))) for _, key, _ in field_help()) + 5
    lines, section = [USAGE], None
    for heading, key, comment in field_help():
        if heading != section:
            lines.append(f"\n{heading}:")
            section = heading
        option = f"--{key.replace('_', '-')} {show_value(getattr(defaults, key))}"
        lines.append(f"  {option:<{width}} {comment}")
    demo = ", ".join(f"{key}={show_value(value)}" for key, value in DEMO.items())
    lines.append("\n" + textwrap.fill(f"with model demo, unless the YAML or command line sets them: {demo}"))
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _without_check_options(argv: list[str]) -> list[str]:
    """check's own options removed, so that its settings are checked like train's before torch loads."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--num-batches", "--tolerance"):
            skip = True
        elif not arg.startswith(("--num-batches=", "--tolerance=")):
            rest.append(arg)
    return rest


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("train", "check", "generate") else "train"
    args = argv[1:] if argv and argv[0] == command else argv
    wants_help = bool(args) and args[0] in ("-h", "--help")
    if command == "train" and wants_help:
        print(help_text())
        return 0
    try:
        if command == "check" and not wants_help:
            load_config(_without_check_options(args))  # only to answer a bad setting before torch loads
        cfg = load_config(args) if command == "train" else None
    except ConfigError as e:
        return _error(e)
    if command != "train":
        import importlib

        return importlib.import_module(f"trainer.{command}").main(args)

    from trainer.data import DataError
    from trainer.lock import OutputDirBusy
    from trainer.train import TrainingError, train

    try:
        train(cfg)
    except (ConfigError, DataError, TrainingError, OutputDirBusy) as e:
        return _error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
