"""What a benchmark ran on, for its JSON and its table: CPU model, CPUs, GPU.

The CPU model matters: this project's CPU boxes have changed between sessions (an AMD EPYC,
then an Intel Xeon ~2.7x slower per engine call), and figures of two boxes only compare as
ratios against a baseline of the same run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """E.g. "Intel(R) Xeon(R) Processor, 2 CPUs, no GPU"."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} CPUs, {gpu}"
