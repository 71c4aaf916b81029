"""Tests of the energy meter: the estimate, a fake powercap tree for RAPL, a fake pynvml, fallbacks."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from itertools import pairwise
from pathlib import Path

import pytest

from services.common.energy import (
    EnergyMeter,
    EnergyReading,
    EnergySourceUnavailable,
    co2_grams,
    rapl_package_zones,
)

MAX_UJ = 262_143_328_850


def burn_cpu(seconds: float) -> None:
    """Keeps one core busy for about `seconds` of process CPU time."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def write_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    """Writes one powercap zone directory as the kernel lays it out."""
    d = root / zone
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(f"{name}\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def set_energy(root: Path, zone: str, energy_uj: int) -> None:
    """Replaces a zone's counter atomically, as sysfs does, so concurrent readers never see an empty file."""
    tmp = root / zone / "energy_uj.tmp"
    tmp.write_text(f"{energy_uj}\n")
    os.replace(tmp, root / zone / "energy_uj")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, a core subzone of package 0 and the control-type directory without counters."""
    (tmp_path / "intel-rapl").mkdir()
    write_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    write_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    write_zone(tmp_path, "intel-rapl:0:0", "core", 300_000)
    return tmp_path


def test_estimate_is_cpu_seconds_times_watts() -> None:
    meter = EnergyMeter("estimate", watts_per_core=12.5)
    with meter.measure() as m:
        burn_cpu(0.2)
    assert m.source == "estimate"
    assert 0.15 <= m.cpu_seconds <= 2.0
    assert m.joules == pytest.approx(m.cpu_seconds * 12.5, rel=1e-9)
    assert m.reading == EnergyReading(m.joules, "estimate", m.cpu_seconds)


def test_estimate_readings_are_monotonic() -> None:
    meter = EnergyMeter("estimate")
    readings = []
    for _ in range(5):
        burn_cpu(0.01)
        readings.append(meter.read())
    assert all(r.source == "estimate" for r in readings)
    assert all(b.joules >= a.joules and b.cpu_seconds >= a.cpu_seconds for a, b in pairwise(readings))
    assert readings[-1].joules > readings[0].joules


def test_read_is_thread_safe_and_monotonic_per_thread(powercap: Path) -> None:
    meter = EnergyMeter("rapl", powercap_root=powercap)
    errors: list[str] = []

    def reader() -> None:
        last = 0.0
        for _ in range(200):
            j = meter.read().joules
            if j < last:
                errors.append(f"{j} < {last}")
            last = j

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for step in range(1, 50):
        set_energy(powercap, "intel-rapl:0", 1_000_000 + step * 1000)
    for t in threads:
        t.join()
    assert errors == []
    assert meter.read().joules == pytest.approx(49 * 1000 / 1e6)


def test_package_zones_skip_subzones_psys_and_duplicates(powercap: Path) -> None:
    write_zone(powercap, "intel-rapl:2", "psys", 9_000_000)
    write_zone(powercap, "intel-rapl-mmio:0", "package-0", 7_000_000)
    zones = rapl_package_zones(powercap)
    assert [z.name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]


def test_package_zones_accept_other_vendors_named_package(tmp_path: Path) -> None:
    write_zone(tmp_path, "amd-rapl:0", "package-0", 0)
    write_zone(tmp_path, "amd-rapl:0:1", "core-1", 0)
    assert [z.name for z in rapl_package_zones(tmp_path)] == ["amd-rapl:0"]


def test_rapl_delta_sums_packages_and_ignores_subzone(powercap: Path) -> None:
    meter = EnergyMeter(powercap_root=powercap)
    assert meter.source == "rapl"
    assert meter.read().joules == 0.0
    set_energy(powercap, "intel-rapl:0", 3_000_000)  # +2 J
    set_energy(powercap, "intel-rapl:1", 5_500_000)  # +0.5 J
    set_energy(powercap, "intel-rapl:0:0", 90_000_000)  # subzone: must not count
    first = meter.read()
    assert first.source == "rapl"
    assert first.joules == pytest.approx(2.5)
    with meter.measure() as m:
        set_energy(powercap, "intel-rapl:1", 6_500_000)  # +1 J
    assert m.source == "rapl"
    assert m.joules == pytest.approx(1.0)
    assert meter.read().joules == pytest.approx(3.5)


def test_rapl_wraparound_gives_positive_delta(powercap: Path) -> None:
    max_uj = 10_000_000
    write_zone(powercap, "intel-rapl:0", "package-0", 9_000_000, max_uj)
    meter = EnergyMeter("rapl", powercap_root=powercap)
    set_energy(powercap, "intel-rapl:0", 500_000)  # wrapped: 1 J to the top, then 0.5 J
    assert meter.read().joules == pytest.approx(1.5)
    set_energy(powercap, "intel-rapl:0", 700_000)
    assert meter.read().joules == pytest.approx(1.7)


def test_missing_tree_falls_back_to_estimate_under_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no NVML either
    meter = EnergyMeter(powercap_root=tmp_path / "absent")
    assert meter.source == "estimate"
    assert meter.read().source == "estimate"


def test_forcing_rapl_on_missing_tree_raises(tmp_path: Path) -> None:
    with pytest.raises(EnergySourceUnavailable, match="no RAPL package zones"):
        EnergyMeter("rapl", powercap_root=tmp_path / "absent")


def test_zone_without_counter_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "name").write_text("package-0\n")
    with pytest.raises(EnergySourceUnavailable, match="cannot read RAPL counters"):
        EnergyMeter("rapl", powercap_root=tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert EnergyMeter(powercap_root=tmp_path).source == "estimate"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_counter_is_unavailable(powercap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (powercap / "intel-rapl:0" / "energy_uj").chmod(0)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert EnergyMeter(powercap_root=powercap).source == "estimate"
    with pytest.raises(EnergySourceUnavailable):
        EnergyMeter("rapl", powercap_root=powercap)


def fake_pynvml(energies_mj: list[list[int]]) -> types.ModuleType:
    """A pynvml stand-in whose devices report successive values from `energies_mj` (one list per device)."""
    mod = types.ModuleType("pynvml")
    calls = {"shutdown": 0}
    iters = [iter(values) for values in energies_mj]
    mod.nvmlInit = lambda: None  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(iters)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTotalEnergyConsumption = lambda h: next(iters[h])  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


def test_nvml_sums_devices_in_millijoules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml([[1000, 3000, 4000], [500, 1500, 1500]])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    meter = EnergyMeter(powercap_root=tmp_path / "absent")  # no RAPL: auto picks NVML
    assert meter.source == "nvml"
    assert meter.read().joules == pytest.approx(3.0)
    assert meter.read().joules == pytest.approx(4.0)
    meter.close()
    assert mod.calls["shutdown"] == 1


def test_nvml_without_devices_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    with pytest.raises(EnergySourceUnavailable, match="no GPU"):
        EnergyMeter("nvml")


def test_forcing_nvml_without_pynvml_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(EnergySourceUnavailable, match="pynvml is not installed"):
        EnergyMeter("nvml")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown energy source"):
        EnergyMeter("battery")
    with pytest.raises(ValueError, match="watts_per_core"):
        EnergyMeter("estimate", watts_per_core=-1.0)


def test_readings_of_different_sources_do_not_subtract() -> None:
    with pytest.raises(ValueError):
        EnergyReading(1.0, "rapl", 0.0) - EnergyReading(0.5, "estimate", 0.0)


def test_co2_grams() -> None:
    assert co2_grams(3.6e6, 400.0) == pytest.approx(400.0)
    assert co2_grams(1800.0, 200.0) == pytest.approx(0.1)
    assert co2_grams(0.0, 500.0) == 0.0
    with pytest.raises(ValueError):
        co2_grams(1.0, -1.0)
