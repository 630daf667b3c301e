"""Measurement around one generation: peak memory (CUDA allocator peak on a GPU, sampled RSS on a CPU),
and energy (NVML on a GPU, RAPL on a CPU)."""
from __future__ import annotations

import itertools
import os
import re
import threading
import time
from pathlib import Path

import torch


class PeakMemory:
    """Context manager; `.peak_bytes` after exit: the CUDA allocator's peak on a GPU; on a CPU the
    kernel's own peak resident set (VmHWM, reset through /proc/self/clear_refs: exact, no sampling),
    or, where that reset is not allowed, an RSS sampler waking every `interval` s (psutil; without it, None)."""

    def __init__(self, device: str, interval: float = 0.05) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device
        self.interval = interval
        self.peak_bytes: int | None = None
        self.thread_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False  # the kernel's peak was reset at enter: read it at exit

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _reset_peak_rss():
            self._hwm = True
        elif (process := _this_process()) is not None:
            self._process = process
            self.peak_bytes = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes or 0, self._process.memory_info().rss)
        self.thread_cpu_s = time.thread_time()  # the sampler's own cost, reported beside the run

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._hwm:
            self.peak_bytes = _peak_rss()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes or 0, self._process.memory_info().rss)


def _this_process():
    """psutil's handle on this process, or None without psutil (then there is no peak memory on a CPU)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process()


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------ energy

_nvml_loaded: tuple[object | None, str | None] | None = None  # (module, None) or (None, why not), once per process
_nvml_lock = threading.Lock()


def _init_nvml(module=None) -> tuple[object | None, str | None]:
    try:
        if module is None:
            import pynvml as module
        module.nvmlInit()
        return module, None
    except Exception as err:  # noqa: BLE001 - any failure just means no GPU energy
        return None, f"no NVML: {type(err).__name__}: {err}"


def _load_nvml(injected=None) -> tuple[object | None, str | None]:
    """The real pynvml is initialised once per process (a failure is remembered); an injected one on each use."""
    global _nvml_loaded
    if injected is not None:
        return _init_nvml(injected)
    with _nvml_lock:
        if _nvml_loaded is None:
            _nvml_loaded = _init_nvml()
        return _nvml_loaded


def _gpu_handle(nvml, device: str):
    if torch.cuda.is_available():
        # NVML counts every GPU in PCI order; torch counts the visible ones in its own order: match by UUID
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    return nvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)


def _try(read, *args):
    """One reading, or None where it is unsupported or fails: a missing reading must not stop the others."""
    try:
        return read(*args)
    except Exception:  # noqa: BLE001
        return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _rapl_packages(root: Path) -> list[Path]:
    """Package domains (intel-rapl:N, not their subdomains intel-rapl:N:M) whose counter is readable.
    A 'psys' domain covers the whole platform, packages included, so it is left out to avoid double counting."""
    domains = sorted(p for p in root.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
    return [p for p in domains if (_try((p / "name").read_text) or "").strip() != "psys"
            and _read_int(p / "energy_uj") is not None]


def _trapezoid(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return sum((t1 - t0) * (y0 + y1) / 2 for (t0, y0), (t1, y1) in itertools.pairwise(points))


class EnergyTracker:
    """Context manager measuring one generation's energy (and, on a GPU, its memory and utilisation);
    `.result` after exit. On CUDA: NVML's total-energy counter, else sampled power integrated over time.
    Elsewhere: the CPU packages' RAPL counters. Energy that cannot be measured is None, never 0.
    `samples` counts GPU readings (0 on a CPU: RAPL is read only at enter and exit)."""

    # 0.5 s, not 0.05 s: each NVML call hands the GIL back and forth, which a launch-bound decode loop
    # feels; the energy counter needs no sampling at all. (On an H100 one on/off pair at 0.05 s showed
    # 8-19% fewer tokens/s with sampling on, but that machine's run-to-run spread was as large.)
    def __init__(self, device: str, interval: float = 0.5, nvml=None,
                 powercap_root: str = "/sys/class/powercap") -> None:
        self.device = device
        self.interval = interval
        self.reason: str | None = None  # why energy is unavailable, where known before the run
        self._nvml = self._handle = None
        self._rapl: list[Path] = []
        if device.startswith("cuda"):
            self._nvml, self.reason = _load_nvml(nvml)
            if self._nvml is not None:
                try:
                    self._handle = _gpu_handle(self._nvml, device)
                except Exception as err:  # noqa: BLE001
                    self._nvml, self.reason = None, f"no NVML handle for {device}: {type(err).__name__}: {err}"
        else:
            self._rapl = _rapl_packages(Path(powercap_root))
            if not self._rapl:
                self.reason = f"RAPL not readable under {powercap_root}"
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._power: list[tuple[float, float]] = []  # (perf_counter s, W)
        self._util: list[float] = []
        self._mem_peak: int | None = None
        self._process_mem_peak: int | None = None
        self._samples = 0
        self.thread_cpu_s = 0.0
        # Filled in at exit; until then (or if never entered) every figure reads as unmeasured
        self.result: dict = self._result(None, None, self.reason or "not measured", 0.0)

    def __enter__(self) -> EnergyTracker:
        if self._nvml is not None:
            self._counter_start = _try(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)
            self._sample()
            self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
            self._thread.start()
        else:
            self._rapl_start = {p: _read_int(p / "energy_uj") for p in self._rapl}
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        duration = time.perf_counter() - self._start
        energy, source, reason = None, None, self.reason
        if self._nvml is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            counter_end = _try(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)
            # The counter ticks coarsely: on a very short run it may not move, so integrate power instead
            if self._counter_start is not None and counter_end is not None and counter_end > self._counter_start:
                energy, source = (counter_end - self._counter_start) / 1000, "nvml_counter"
            elif (energy := _trapezoid(self._power)) is not None:
                source = "nvml_power_integral"
            else:
                reason = "NVML reads neither an energy counter nor power on this GPU"
        elif self._rapl:
            energy = self._rapl_joules()
            source = "rapl" if energy is not None else None
            reason = None if energy is not None else "RAPL counter (or, after a wrap, its range) unreadable at exit"
        self.result = self._result(energy, source, reason, duration)

    def _result(self, energy: float | None, source: str | None, reason: str | None, duration: float) -> dict:
        return {
            "energy_j": energy, "energy_source": source,
            "energy_unavailable_reason": None if energy is not None else reason,
            "avg_power_w": energy / duration if energy is not None and duration > 0 else None,
            "gpu_util_pct": sum(self._util) / len(self._util) if self._util else None,
            "gpu_mem_used_peak_bytes": self._mem_peak, "process_gpu_mem_peak_bytes": self._process_mem_peak,
            "samples": self._samples,
        }

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self.thread_cpu_s = time.thread_time()  # the sampler's own cost, reported beside the run

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        now = time.perf_counter()
        if (milliwatts := _try(nvml.nvmlDeviceGetPowerUsage, handle)) is not None:
            self._power.append((now, milliwatts / 1000))
        if (used := _try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used)) is not None:
            self._mem_peak = max(self._mem_peak or 0, int(used))
        if (util := _try(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)) is not None:
            self._util.append(float(util))
        if (mine := _try(self._process_gpu_mem)) is not None:
            self._process_mem_peak = max(self._process_mem_peak or 0, mine)
        self._samples += 1

    def _process_gpu_mem(self) -> int | None:
        used = [p.usedGpuMemory for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                if p.pid == self._pid and p.usedGpuMemory is not None]
        return int(sum(used)) if used else None  # None too where a container hides our pid from the driver

    def _rapl_joules(self) -> float | None:
        total_uj = 0
        for package, start in self._rapl_start.items():
            end = _read_int(package / "energy_uj")
            if start is None or end is None:
                return None  # a partial sum would understate the energy
            if end < start:  # the counter wrapped around once
                wrap = _read_int(package / "max_energy_range_uj")
                if wrap is None:
                    return None
                end += wrap
            total_uj += end - start
        return total_uj / 1e6

    def describe(self) -> str:
        """Which energy source this device will use, or why none."""
        if self._nvml is not None:
            if _try(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle) is not None:
                return f"nvml_counter: NVML total-energy counter of {self.device}"
            if _try(self._nvml.nvmlDeviceGetPowerUsage, self._handle) is not None:
                return (f"nvml_power_integral: NVML power of {self.device} sampled every {self.interval} s"
                        " (no energy counter)")
            return f"none: NVML reads neither an energy counter nor power on {self.device}"
        if self._rapl:
            return f"rapl: {len(self._rapl)} CPU package domain(s) ({', '.join(p.name for p in self._rapl)})"
        return f"none: {self.reason}"


def describe_energy_support(device: str, nvml=None, powercap_root: str = "/sys/class/powercap") -> str:
    """One line for the run manifest: the energy source `EnergyTracker` will use on `device`, or why none."""
    return EnergyTracker(device, nvml=nvml, powercap_root=powercap_root).describe()
