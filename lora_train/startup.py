"""What a lora_train program sets up for its process before it imports peft: nothing happens at ``import lora_train``.

Every entry point (``lora_train.commands``, ``lora_lab.commands``) calls :func:`prepare_process` first. A library user
who imports peft or bitsandbytes in their own program and wants the same protection calls
:func:`block_hub_kernels` once, before that import.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from typing import Callable, Optional


class _ExecWithoutHubKernels(importlib.abc.Loader):
    """Runs a module's code while ``import kernels`` fails, then puts ``kernels`` back as it was."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        missing = object()
        saved = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail
        try:
            self.loader.exec_module(module)
        finally:
            if saved is missing:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = saved


class _BitsandbytesWithoutHubKernels(importlib.abc.MetaPathFinder):
    """Keep bitsandbytes' CPU backend from fetching a compiled kernel from the Hugging Face Hub.

    On CPUs with AVX512-BF16, importing ``bitsandbytes.backends.cpu.ops`` calls ``kernels.get_kernel(
    "kernels-community/quantization-bitsandbytes")``: a Hub request at ``import peft`` (peft imports bitsandbytes for
    every run, quantized or not), then a binary downloaded and run in-process. That is remote code whatever the
    recipe's ``trust_remote_code`` says, so while that one module runs ``kernels`` is unimportable and bitsandbytes
    keeps the CPU kernels it ships (the ones every figure in docs/ was measured with). transformers >= 5.25 installs
    ``kernels``; without it bitsandbytes takes the same path."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path, target=None):
        if name != self.MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _ExecWithoutHubKernels(spec.loader)
        return spec


class _DropOptionalKernelNotice(logging.Filter):
    """Drop bitsandbytes' warning that it could not load the Hub kernel above. It asks for nothing a run here needs
    (training and evaluation keep the plain 4-bit layout, see ``modeling.keep_4bit_training_layout``). Every other
    bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def block_hub_kernels() -> None:
    """Make bitsandbytes keep the CPU kernels it ships instead of downloading one from the Hub (idempotent).

    Must run before bitsandbytes is first imported (directly, or through ``import peft``)."""
    if not any(isinstance(finder, _BitsandbytesWithoutHubKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesWithoutHubKernels())
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())


def prepare_process() -> None:
    """Called first by every program: the Hub kernel guard, and one upstream deprecation warning silenced."""
    block_hub_kernels()
    # peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
    # run; the attribute is peft's to rename, nothing in a recipe changes it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""oneDNN's primitive cache and PyTorch's own cache of oneDNN kernels (ideep's): each keeps up to 1024 compiled
kernels by default; one more shape of a bf16 matrix product held about 0.6 MB in the two, of a GELU 0.3 MB
(docs/serving.md)."""


def bound_kernel_caches(capacity: int) -> None:
    """Keep at most ``capacity`` compiled oneDNN kernels in each of :data:`KERNEL_CACHE_VARIABLES`' caches.

    oneDNN compiles a kernel per operation and shape, and a batching server meets many shapes (texts per batch times
    padded length), so these caches are much of what a CPU server's memory grows by under load (the rest is free
    heap memory glibc keeps, see :func:`heap_release`). Bounding only
    oneDNN's own leaves PyTorch's holding the same kernels. Each cache reads its variable when first used: call this
    before the process's first oneDNN operation (a bf16 product or GELU on a CPU)."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ[name] = str(capacity)


def heap_release() -> Optional[Callable[[], object]]:
    """glibc's ``malloc_trim(0)``: hands the free pages of every malloc arena back to the OS; None where the C library
    has no such call (macOS, musl).

    A long-running CPU server allocates and frees activations of every batch shape in several threads, and glibc keeps
    what is freed in each thread's arena (docs/serving.md, "Free heap memory handed back")."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def configure_logging(is_main: bool) -> None:
    """Readable logs on the main process; warnings only elsewhere (called once the process knows its rank)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        force=True,
    )
    import datasets
    import transformers

    if not is_main:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    else:
        transformers.utils.logging.set_verbosity_warning()
