"""What a run or a measurement ran on: one description of the machine for model cards, studies and benchmarks."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Optional


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers narrow), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def native_bf16() -> bool:
    """Whether this process's device computes bfloat16 at full speed: CPUs (bf16 autocast), ROCm GPUs, and NVIDIA GPUs
    from Ampere on (compute capability 8.0). ``torch.cuda.is_bf16_supported()`` also says yes on older GPUs (T4, V100),
    which only emulate it, slowly; Accelerate then accepts bf16 too."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available():
        return True
    if torch.version.hip:
        return True
    device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()  # the GPU this process will use
    return torch.cuda.get_device_capability(device)[0] >= 8


def machine_info(threads: Optional[int] = None) -> dict[str, Any]:
    """CPU, cores, GPU, torch threads, load average and library versions: where a figure comes from."""
    import peft
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "cpu_count": usable_cores(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def hardware_summary(device: Any = "cpu", num_processes: int = 1) -> str:
    """One line naming the hardware, e.g. ``1 x NVIDIA H100 80GB HBM3`` or ``CPU: <model name> (2 cores)``."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{num_processes} x {torch.cuda.get_device_name(torch.device(device))}"
    procs = f", {num_processes} processes" if num_processes > 1 else ""
    return f"CPU: {cpu_name()} ({usable_cores()} cores{procs})"
