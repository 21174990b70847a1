"""``python -m trainer [--config file.yaml] [--key value ...]``: see trainer/config.py for the keys."""

import sys

from trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("check", "generate"):
        import importlib

        return importlib.import_module(f"trainer.{argv[0]}").main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("keys and defaults:")
        for key, value in vars(load_config([])).items():
            print(f"  --{key.replace('_', '-')} {value}")
        return 0
    from trainer.data import DataError
    from trainer.train import TrainingError, train

    try:
        train(load_config(argv))
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
