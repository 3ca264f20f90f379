"""Shared by the benchmark scripts: a one-line description of the machine they ran on."""

import os
import platform

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model or cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
