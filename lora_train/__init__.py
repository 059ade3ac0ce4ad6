"""lora_train: recipe-driven LoRA / AdaLoRA / QLoRA fine-tuning of text classifiers with Accelerate.

Importing the package changes nothing in the process. Programs call :func:`lora_train.startup.prepare_process`
first; see that module for the one call a library user makes before importing peft.
"""

__version__ = "0.1.0"
