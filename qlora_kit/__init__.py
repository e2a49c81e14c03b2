"""qlora-kit: plan, train and export QLoRA fine-tunes on one GPU."""

__version__ = "0.1.0"
