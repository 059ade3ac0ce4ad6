"""lora_train: recipe-driven LoRA / AdaLoRA / QLoRA fine-tuning of text classifiers with Accelerate."""

__version__ = "0.1.0"
