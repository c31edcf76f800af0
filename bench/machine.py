"""What the numbers were measured on: cores, memory, GPU, commit; and GPU utilisation sampling via nvidia-smi."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Self

from bench.inputs import REPO_ROOT


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi sees (empty without nvidia-smi or GPU)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """Cores, CPU, memory, GPU(s), load, software versions and the commit measured."""
    import ray
    import torch

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "gpu": gpu_names(),
        "cuda_available": bool(torch.cuda.is_available()),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "commit_dirty": bool(dirty) if dirty is not None else None,
        "platform": platform.platform(),
    }


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, cpu seconds incl. reaped children)`` of ``pid`` from ``/proc/<pid>/stat``, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    try:
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    except (IndexError, ValueError):
        return None
    return ppid, (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def _label(pid: int) -> str:
    """A short name for a process: Ray's process title (``ray::ServeReplica:app:Deployment``) or the program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode("utf-8", "replace").strip() if argv and argv[0] else "?"
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0][:60]  # drop the method ("...FusionIngress.handle_request")
    if " (" in first:  # a process title such as "ray-dashboard-NodeHead-0 (/usr/bin/python ...)"
        return first.split(" (")[0].rstrip("-0123456789")[:60]
    words = [a.decode("utf-8", "replace") for a in argv if a]
    for i, word in enumerate(words):  # python -m pkg / python script.py
        if word == "-m" and i + 1 < len(words):
            return words[i + 1][:60]
        if word.endswith(".py"):
            return Path(word).name[:60]
        if word == "-c":
            return "python -c"
    return Path(first).name[:60]


def process_tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """``{pid: (label, CPU seconds so far)}`` for ``root`` and all its descendants (Linux ``/proc``).

    Reaped children (e.g. finished ffmpeg decodes) count through their parent's ``cutime``/``cstime``.
    Empty when ``/proc`` or ``root`` is missing.
    """
    if not Path("/proc").is_dir():
        return {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, tuple[str, float]] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        out[pid] = (_label(pid), stats[pid][1])
        stack.extend(children.get(pid, []))
    return out


def cpu_delta_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two :func:`process_tree_cpu` snapshots, summed per label.

    A process that started in between counts in full; one that ended in between is lost (its last
    CPU is unknown), so a replica replaced mid-cell never makes a total go negative.
    """
    out: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        prior = before.get(pid)
        spent = cpu - prior[1] if prior is not None and prior[0] == label else cpu
        out[label] = out.get(label, 0.0) + max(spent, 0.0)
    return out


def process_tree_cpu_s(root: int) -> float | None:
    """CPU seconds used so far by ``root`` and all its descendants (None without ``/proc`` or ``root``)."""
    snapshot = process_tree_cpu(root)
    return sum(cpu for _, cpu in snapshot.values()) if snapshot else None


class GpuMonitor:
    """Samples GPU utilisation and memory with ``nvidia-smi -lms`` while a block runs; a no-op without it."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.available = shutil.which("nvidia-smi") is not None
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.available:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"-lms={self.interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line.strip())

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            if self._reader is not None:
                self._reader.join(timeout=5)

    def summary(self) -> dict[str, Any] | None:
        """Mean and max utilisation (%) and max memory used (MiB) over all GPUs and samples, or None."""
        return summarize_gpu_samples(self._lines) if self.available else None


def summarize_gpu_samples(lines: list[str]) -> dict[str, Any] | None:
    """Parse ``utilization.gpu, memory.used`` CSV lines from nvidia-smi into a summary."""
    util: list[float] = []
    mem: list[float] = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            util.append(float(parts[0]))
            mem.append(float(parts[1]))
        except ValueError:
            continue
    if not util:
        return None
    return {
        "gpu_util_mean_pct": round(sum(util) / len(util), 1),
        "gpu_util_max_pct": round(max(util), 1),
        "gpu_mem_max_mib": round(max(mem), 1),
        "gpu_samples": len(util),
    }
