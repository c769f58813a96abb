"""What every SegLens benchmark shares: CUDA synchronisation, the environment record, the busy-machine
warning and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def load_average() -> float | None:
    """The 1-minute load average, read at a benchmark's start (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, load_at_start: float | None) -> dict:
    """Device, versions, threads and machine load, recorded beside every result."""
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min_at_start": load_at_start,
    }


def print_environment(env: dict, device: torch.device) -> None:
    """The device line of a report, and a warning when other processes were loading the CPUs."""
    print(f"- device: {env['device']}, torch {env['torch']}, {env['torch_threads']} CPU threads, {env['cpu_count']} CPUs")
    load = env["load_average_1min_at_start"]
    if load is not None and device.type == "cpu" and load > 1.0:
        print(f"- WARNING: 1-minute load average {load:.2f} when the benchmark started: if other processes still share "
              "the CPUs, timings will be slow and noisy")


def write_json(path: Path, payload: dict) -> None:
    """Write a benchmark's full result as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}", file=sys.stderr)
