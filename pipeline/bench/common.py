"""What every benchmark section shares: the attack settings, timing (median of repeats, device
sync), the synthetic 48 kHz clip, process memory from /proc, the CPU contention meter, machine
information and the fresh-process runner of the memory and ensemble sections."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata as md
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.engine import PGDParams
from pipeline.demo import synthesize
from pipeline.encoders.base import CLAP_RATE, CLAP_SAMPLES

WINDOW_SECONDS = 10.0  # one CLAP window of audio
TRACK_RATE = 44_100  # pipeline and memory tracks: 44.1 kHz
# Attack settings of configs/demo.yaml (ε ≈ -50.5 dBFS); early stop off.
EPS, ALPHA, SIGMA = 0.003, 0.0006, 0.00075
GPU_NOT_AVAILABLE = "GPU: not available on this machine (unmeasured)"
PARTS = ("engine", "baseline", "pipeline", "layouts", "memory", "gpu", "ensemble")
# GPU section: eager, torch.compile, and torch.compile with CUDA graphs (mode="reduce-overhead").
GPU_MODES = ("eager", "compiled", "cudagraphs")
# Where the protect actor's compute runs relative to the CPU stages (decode, quality, encode, write):
#   dedicated: the accelerator is the actor's own. On CPU the actor takes all cores but one
#              (torch threads = runtime.num_cpus_per_actor = cores - 1), the CPU stages the rest;
#              on CUDA the actor has the GPU. The engine reference runs with the same threads.
#   shared:    CPU only: the actor's torch threads = all cores, so every CPU stage preempts them.
PLACEMENTS = ("dedicated", "shared")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sync_for(device: torch.device) -> Callable[[], None] | None:
    """What makes a timing wait for the device's queued work (None on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def clip_48k(seed: int) -> torch.Tensor:
    """A 10 s music-like mono clip at 48 kHz, float32 torch [480000]."""
    samples = synthesize(WINDOW_SECONDS, CLAP_RATE, 1, 90 + 10 * (seed % 7), 165.0 + 20 * (seed % 5), seed)
    return torch.from_numpy(samples[:CLAP_SAMPLES, 0].copy())


def attack_params(steps: int, precision: str) -> PGDParams:
    return PGDParams(eps=EPS, alpha=ALPHA, steps=steps, sigma=SIGMA, target_delta_e=float("inf"), precision=precision)


def proc_status_kib(field_name: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in KiB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    if field_name == "VmHWM":
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return 0


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS reflects live data only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log("memory: cannot reset the peak-RSS mark; peaks include the track's preparation")


def run_child(flag: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `python -m pipeline.bench <flag> <spec>` in a fresh process (its own peak RSS) and
    return the JSON object it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{flag.strip('-')} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine from /proc/stat (0, 0 where unavailable)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Contention:
    """CPU use of the whole machine during one section vs this process (and its waited children).

    `other_pct` is what processes outside the benchmark used, as a share of all cores: timings of a
    section with a large share are inflated by someone else's work. In the pipeline section Ray's
    worker processes are the benchmark's own but are not counted as `own`, so only `busy_pct` is
    meaningful there."""

    section: str
    wall_seconds: float
    busy_pct: float
    own_pct: float

    @property
    def other_pct(self) -> float:
        return max(0.0, self.busy_pct - self.own_pct)


@contextlib.contextmanager
def cpu_meter(section: str, sink: list[Contention]) -> Iterator[None]:
    busy0, total0 = _machine_jiffies()
    own0, wall0 = _own_cpu_seconds(), time.perf_counter()
    try:
        yield
    finally:
        busy1, total1 = _machine_jiffies()
        wall = time.perf_counter() - wall0
        cores = os.cpu_count() or 1
        busy = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")
        own = 100.0 * (_own_cpu_seconds() - own0) / (wall * cores) if wall > 0 else float("nan")
        sink.append(Contention(section, wall, busy, min(own, 100.0)))


def wait_for_idle(max_seconds: float, threshold: float = 0.3, probe: float = 5.0) -> float:
    """Wait (up to `max_seconds`) until the machine is ≤ `threshold` busy over a `probe`-second
    window; returns the last busy fraction seen."""
    deadline = time.monotonic() + max_seconds
    while True:
        busy0, total0 = _machine_jiffies()
        time.sleep(probe)
        busy1, total1 = _machine_jiffies()
        busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        log(f"machine {100 * busy:.0f} % busy with other work; waiting for it to go idle")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def _cpu_details() -> tuple[str, str, str]:
    """(CPU model, bf16-relevant CPU flags, total memory) from /proc."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = [f for f in ("avx512f", "amx_bf16", "avx512_bf16") if f" {f}" in text]
        flags = ", ".join(found)
    return cpu, flags, memory


def machine_info(device: str = "cpu") -> dict[str, str]:
    cpu, flags, memory = _cpu_details()
    info = {
        "CPU": cpu,
        "CPU flags": flags or "-",
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": memory or "-",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "laion-clap": _version("laion-clap"),
        "numpy": _version("numpy"),
        "device": device,
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    return info


def minutes(seconds: float) -> str:
    """A track length as the tables and section labels write it ("1 min", "0.5 min")."""
    return f"{seconds / 60:g} min"
