"""tritrain's LoRA fine-tuning trainer: ``python -m trainer``, or from Python::

    from trainer import TrainConfig, train

    cfg = TrainConfig(model="/models/Qwen2.5-0.5B-Instruct", template="chat_template",
                      train_file="data/train.jsonl", val_file="", max_steps=100, output_dir="outputs/qwen")
    result = train(cfg)
    print(result["first_loss"], result["last_loss"], result["output_dir"])

``train(cfg)`` checks the config as the command line does (ConfigError), then runs exactly what
``python -m trainer`` runs and returns its final metrics. ``load_config(["--key", "value", ...])`` builds a
config the way the command line does (the demo's settings included). Importing this package does not
import torch: that waits for the first call of ``train``.
"""

import logging
import warnings

from trainer.config import ConfigError, TrainConfig, load_config

# PEFT calls transformers' deprecated `is_gradient_checkpointing` whenever it wraps or loads a model;
# the warning is about PEFT's code, not the user's, and would otherwise print on every run.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# bitsandbytes (the qlora extra), imported by PEFT on every run, tries on a CPU with AVX512-bf16 to fetch a
# 4-bit matmul from the Hugging Face hub through `kernels` and logs its failure; the trainer never runs that
# kernel (trainer/quantize.py keeps the unpacked weight format), so the line would only alarm.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)


def train(cfg: TrainConfig) -> dict:
    """Train a LoRA adapter as ``cfg`` says (see trainer/train.py); returns the final metrics: ``steps``,
    ``first_loss``, ``last_loss``, ``best_val_loss``, ``losses``, ``output_dir``, ..."""
    from trainer.config import validate

    cfg = validate(cfg)  # before torch is imported
    import trainer.train  # which makes itself callable: see its end

    return trainer.train.train(cfg)


__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]
