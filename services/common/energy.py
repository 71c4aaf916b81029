"""Energy meter: joules used since a point in time, measured where the machine allows and estimated otherwise.

Sources, tried in this order under `source="auto"`:

* ``rapl``: the Linux powercap tree (Intel RAPL, and AMD packages exposed through the same interface). It
  measures the energy of whole CPU packages, i.e. the whole machine's CPU energy, not this process's: no
  attribution is done here. Callers that share a machine may attribute by CPU-time share using
  `EnergyReading.cpu_seconds`.
* ``nvml``: the NVIDIA driver's total energy counter, summed over all GPUs (GPU energy only, again
  machine-wide). Used only when the optional `pynvml` package is importable and a GPU answers.
* ``estimate``: this process's CPU time times a fixed power per busy core. It is an estimate, never a
  measurement, and is always labelled ``"estimate"``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SOURCES = ("rapl", "nvml", "estimate")
DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 10.0
_JOULES_PER_KWH = 3.6e6


class EnergySourceUnavailable(RuntimeError):
    """A requested energy source cannot be read on this machine (missing, unreadable or no device)."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy and process CPU time over a span.

    joules: energy used over the span, as measured (rapl, nvml) or estimated (estimate).
    source: where `joules` came from: "rapl", "nvml" or "estimate".
    cpu_seconds: CPU time (user + system, all threads) this process used over the same span.
    """

    joules: float
    source: str
    cpu_seconds: float

    def __sub__(self, earlier: EnergyReading) -> EnergyReading:
        """The reading for the span between `earlier` and this reading (both cumulative from one meter)."""
        if earlier.source != self.source:
            raise ValueError(f"cannot subtract a {earlier.source} reading from a {self.source} reading")
        return EnergyReading(self.joules - earlier.joules, self.source, self.cpu_seconds - earlier.cpu_seconds)


DEFAULT_PROC_STAT = Path("/proc/stat")


def machine_busy_cpu_seconds(proc_stat: Path = DEFAULT_PROC_STAT) -> float:
    """CPU seconds every core of this machine has spent busy since boot (user, nice, system, irq, softirq;
    not idle, iowait or time stolen by a hypervisor), from the kernel's /proc/stat.
    """
    fields = proc_stat.read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"{proc_stat} does not start with the aggregate cpu line")
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_share(process_cpu_s: float, machine_busy_s: float) -> float:
    """The part of the machine's busy CPU time that was this process's, between 0 and 1."""
    if machine_busy_s <= 0:
        return 0.0
    return min(1.0, max(0.0, process_cpu_s / machine_busy_s))


def co2_grams(joules: float, grid_intensity_g_per_kwh: float) -> float:
    """Grams of CO2 emitted for `joules` of energy at a grid intensity given in grams of CO2 per kWh."""
    if grid_intensity_g_per_kwh < 0:
        raise ValueError(f"grid intensity must be >= 0, got {grid_intensity_g_per_kwh}")
    return joules / _JOULES_PER_KWH * grid_intensity_g_per_kwh


class _Source(Protocol):
    name: str

    def joules(self, cpu_seconds: float) -> float:
        """Cumulative joules since creation; `cpu_seconds` is this process's CPU time since then."""
        ...

    def close(self) -> None: ...


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def rapl_package_zones(root: Path) -> list[Path]:
    """The package-level powercap zones under `root`, one per CPU package, sorted by path.

    A zone is a top-level directory `<type>:<N>` (subzones such as `intel-rapl:0:0` are skipped: their energy
    is already part of the package's). It counts when its `name` starts with "package", or, lacking a
    readable name, when it is an `intel-rapl:N` zone. Zones such as "psys" (the whole platform) are skipped
    because they overlap the packages. When two control types expose the same package (`intel-rapl:0` and
    `intel-rapl-mmio:0` both named "package-0"), only one is kept, preferring `intel-rapl`.
    """
    if not root.is_dir():
        return []
    chosen: dict[str, Path] = {}
    # In ASCII "intel-rapl-mmio:0" sorts before "intel-rapl:0"; put intel-rapl first so it wins a shared name.
    for zone in sorted(root.iterdir(), key=lambda p: (not p.name.startswith("intel-rapl:"), p.name)):
        kind, sep, index = zone.name.partition(":")
        if not sep or ":" in index or not index.isdigit():
            continue
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            name = ""
        if name:
            if not name.startswith("package"):
                continue
        elif kind != "intel-rapl":
            continue
        chosen.setdefault(name or zone.name, zone)
    return sorted(chosen.values())


class _RaplSource:
    """Sums `energy_uj` over the package zones, correcting each zone's counter for wraparound."""

    name = "rapl"

    def __init__(self, root: Path) -> None:
        zones = rapl_package_zones(root)
        if not zones:
            raise EnergySourceUnavailable(f"no RAPL package zones under {root}")
        self._zones = zones
        try:
            self._max_uj = [_read_int(z / "max_energy_range_uj") for z in zones]
            self._last_uj = [_read_int(z / "energy_uj") for z in zones]
        except (OSError, ValueError) as exc:
            # Since Linux 5.10 energy_uj is readable by root only (CVE-2020-8694).
            raise EnergySourceUnavailable(f"cannot read RAPL counters under {root}: {exc}") from exc
        self._total_uj = 0

    def joules(self, cpu_seconds: float) -> float:
        """Cumulative package joules since creation. A counter that wraps more than once between two calls
        loses whole ranges (about 262 kJ each), so callers should read at least every few minutes."""
        for i, zone in enumerate(self._zones):
            now = _read_int(zone / "energy_uj")
            delta = now - self._last_uj[i]
            if delta < 0:
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last_uj[i] = now
        return self._total_uj / 1e6

    def close(self) -> None:
        pass


class _NvmlSource:
    """Sums the driver's total energy counter (millijoules since the driver loaded) over all GPUs."""

    name = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise EnergySourceUnavailable("pynvml is not installed") from exc
        self._nvml: Any = pynvml
        initialised = False
        try:
            pynvml.nvmlInit()
            initialised = True
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._last_mj = [self._read(h) for h in self._handles]
        # Any failure of the optional driver (no library, no device, pre-Volta GPU) means "not available".
        except Exception as exc:
            if initialised:
                self._shutdown()
            raise EnergySourceUnavailable(f"NVML energy counter not readable: {exc}") from exc
        if not self._handles:
            self._shutdown()
            raise EnergySourceUnavailable("NVML found no GPU")
        self._total_mj = 0

    def _read(self, handle: Any) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)

    def joules(self, cpu_seconds: float) -> float:
        """Cumulative GPU joules since creation."""
        for i, handle in enumerate(self._handles):
            now = self._read(handle)
            # The counter restarts from zero only when the driver reloads; count what it has since then.
            delta = now - self._last_mj[i]
            self._total_mj += delta if delta >= 0 else now
            self._last_mj[i] = now
        return self._total_mj / 1e3

    def close(self) -> None:
        self._shutdown()


class _EstimateSource:
    """Process CPU time times a fixed power per fully busy core."""

    name = "estimate"

    def __init__(self, watts_per_core: float) -> None:
        self._watts = watts_per_core

    def joules(self, cpu_seconds: float) -> float:
        """Estimated joules for `cpu_seconds` of CPU time."""
        return cpu_seconds * self._watts

    def close(self) -> None:
        pass


class EnergySpan:
    """The energy of a span of work, yielded by `EnergyMeter.measure()`.

    Inside the `with` block its values grow with the work done so far; after the block they are fixed.
    """

    def __init__(self, meter: EnergyMeter, start: EnergyReading) -> None:
        self._meter = meter
        self._start = start
        self._end: EnergyReading | None = None

    def _finish(self) -> None:
        self._end = self._meter.read()

    @property
    def reading(self) -> EnergyReading:
        """The span's energy and CPU time as one reading."""
        end = self._end if self._end is not None else self._meter.read()
        return end - self._start

    @property
    def joules(self) -> float:
        """Joules used over the span (machine-wide for rapl and nvml)."""
        return self.reading.joules

    @property
    def cpu_seconds(self) -> float:
        """This process's CPU time over the span."""
        return self.reading.cpu_seconds

    @property
    def source(self) -> str:
        """One of "rapl", "nvml" or "estimate"."""
        return self._start.source


class EnergyMeter:
    """Cumulative energy since the meter was created, from the best source available.

    source: "auto" (try rapl, then nvml, then estimate) or one of "rapl", "nvml", "estimate" to force it;
        a forced source that cannot be read raises EnergySourceUnavailable.
    powercap_root: root of the Linux powercap tree read by the rapl source.
    watts_per_core: power of one fully busy core, used by the estimate source only.

    `read()` is thread-safe, so a metrics exporter may read from another thread.
    """

    def __init__(
        self,
        source: str = "auto",
        *,
        powercap_root: str | Path = DEFAULT_POWERCAP_ROOT,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    ) -> None:
        if source != "auto" and source not in SOURCES:
            raise ValueError(f"unknown energy source {source!r}; expected 'auto' or one of {SOURCES}")
        if not math.isfinite(watts_per_core) or watts_per_core < 0:
            raise ValueError(f"watts_per_core must be a finite number >= 0, got {watts_per_core}")
        self._lock = threading.Lock()
        self._watts_per_core = watts_per_core
        self._source = self._open(source, Path(powercap_root), watts_per_core)
        self._cpu0 = time.process_time()

    @staticmethod
    def _open(source: str, root: Path, watts_per_core: float) -> _Source:
        if source == "rapl":
            return _RaplSource(root)
        if source == "nvml":
            return _NvmlSource()
        if source == "estimate":
            return _EstimateSource(watts_per_core)
        for name, factory in (("rapl", lambda: _RaplSource(root)), ("nvml", _NvmlSource)):
            try:
                return factory()
            except EnergySourceUnavailable as exc:
                log.debug("energy source %s unavailable: %s", name, exc)
        return _EstimateSource(watts_per_core)

    @property
    def source(self) -> str:
        """The source in use: "rapl", "nvml" or "estimate"."""
        return self._source.name

    @property
    def watts_per_core(self) -> float:
        """The power of one fully busy core that the estimate source assumes (given at construction)."""
        return self._watts_per_core

    def read(self) -> EnergyReading:
        """Energy and process CPU time since the meter was created.

        Raises OSError if a measured source becomes unreadable after construction.
        """
        with self._lock:
            # time.process_time counts every thread of the process, user and system time.
            cpu = time.process_time() - self._cpu0
            return EnergyReading(self._source.joules(cpu), self._source.name, cpu)

    @contextmanager
    def measure(self) -> Iterator[EnergySpan]:
        """Measures the energy of the work done inside a `with` block: `with meter.measure() as m: ...`."""
        span = EnergySpan(self, self.read())
        try:
            yield span
        finally:
            span._finish()

    def close(self) -> None:
        """Releases the source (shuts NVML down); the meter must not be read afterwards."""
        self._source.close()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CpuTimeAttribution:
    """Joules of one piece of work (e.g. a model's forward pass) from the CPU time it took.

    estimate: the work's CPU seconds times the meter's watts per core, as the estimate source counts a process.
    rapl, nvml: the counters are machine-wide, so the work gets the machine's measured energy in proportion to its
        share of the machine's busy CPU time: cpu_seconds x (joules / busy CPU seconds of the machine), the ratio
        taken over the last `interval_s` or more. One forward pass is far shorter than the counters' resolution
        (RAPL updates about every millisecond, /proc/stat in 10 ms ticks), so a ratio read around the pass alone
        would mostly be 0 or a whole tick; over a second it is what EnergyExporter attributes to the process.

    meter: the service's energy meter; its source labels every figure this gives.
    proc_stat: the kernel's CPU accounting (rapl and nvml only).
    interval_s: the shortest span over which the measured ratio is refreshed.

    `joules()` is thread-safe.
    """

    def __init__(self, meter: EnergyMeter, proc_stat: Path = DEFAULT_PROC_STAT, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.meter = meter
        self._proc_stat = proc_stat
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._rate: float | None = None  # joules per busy CPU second of the machine
        if meter.source != "estimate":
            self._since = time.monotonic()
            self._joules0 = meter.read().joules
            self._busy0 = machine_busy_cpu_seconds(proc_stat)

    @property
    def source(self) -> str:
        """Where the figures come from: "rapl", "nvml" or "estimate"."""
        return self.meter.source

    def joules(self, cpu_seconds: float) -> float:
        """The energy attributed to work that took `cpu_seconds` of CPU time (0 until the machine's counters have
        moved at all, for rapl and nvml). Raises OSError if a counter becomes unreadable."""
        if cpu_seconds <= 0:
            return 0.0
        if self.meter.source == "estimate":
            return cpu_seconds * self.meter.watts_per_core
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._since
            if self._rate is None or elapsed >= self._interval_s:
                joules = self.meter.read().joules
                busy = machine_busy_cpu_seconds(self._proc_stat)
                if busy > self._busy0:
                    self._rate = max(0.0, joules - self._joules0) / (busy - self._busy0)
                    # Until a whole interval has passed the span keeps growing from the same start.
                    if elapsed >= self._interval_s:
                        self._since, self._joules0, self._busy0 = now, joules, busy
            return cpu_seconds * (self._rate or 0.0)
