"""tritrain's LoRA fine-tuning trainer: ``python -m trainer``."""
