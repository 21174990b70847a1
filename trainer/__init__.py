"""tritrain's LoRA fine-tuning trainer: ``python -m trainer``."""

import warnings

# PEFT calls transformers' deprecated `is_gradient_checkpointing` whenever it wraps or loads a model;
# the warning is about PEFT's code, not the user's, and would otherwise print on every run.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
