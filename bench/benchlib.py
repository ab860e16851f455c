"""What the benchmarks share: the machine's description, timing, a measured matmul peak, peak
memory, and writing results. Imports torch only (lverse's modules are imported by each script).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_of(name: str) -> torch.device:
    """``auto``: CUDA if there is one; asking for CUDA without one is an error, not a CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}, but torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


def machine(device: torch.device) -> dict[str, Any]:
    """Hardware and software a figure was measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                      if ln.startswith("model name")), platform.processor() or platform.machine())
        info["device"] = f"cpu: {model}, {os.cpu_count()} cores"
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, taking turns round by round so that the noise of
    a shared machine falls on all of them alike (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 0, reps: int = 5) -> float:
    """FLOP/s of a large square matmul in ``dtype``, measured now: the peak MFU is taken against
    (a vendor's datasheet figure says nothing about this machine's clocks, threads or libraries)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b)
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best


def rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    pages = _read("/proc/self/statm").split()
    return int(pages[1]) * os.sysconf("SC_PAGE_SIZE") if pages else 0


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory (Linux: ``VmHWM``; not ``ru_maxrss``,
    which a child started by fork + exec inherits from its parent's size at the fork)."""
    for ln in _read("/proc/self/status").splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write(result: dict[str, Any], out: str | None) -> None:
    """Print the JSON line; with ``out``, also write it there."""
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")


def tiny_mode() -> bool:
    """``LVERSE_BENCH_TINY=1``: the GPU script's sizes shrunk to check it on a CPU."""
    return os.environ.get("LVERSE_BENCH_TINY", "") not in ("", "0")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)
