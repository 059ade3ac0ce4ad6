"""lora_train: recipe-driven LoRA / AdaLoRA / QLoRA fine-tuning of text classifiers with Accelerate."""

import logging
import warnings

__version__ = "0.1.0"


class _DropOptionalKernelNotice(logging.Filter):
    """Drop bitsandbytes' warning that the optional ``kernels`` package (a faster bf16 4-bit CPU inference kernel)
    is missing. bitsandbytes logs it at import, and peft imports bitsandbytes for every run, quantized or not; it
    asks for nothing a run here needs (training and evaluation keep the plain 4-bit layout, see
    ``modeling.keep_4bit_training_layout``). Every other bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())

# peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
# run; the attribute is peft's to rename, nothing in a recipe changes it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
