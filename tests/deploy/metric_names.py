"""Which metric names exist: from the services' metric factories, from a /metrics text, from the recording
rules; and which names a PromQL expression uses."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}
# Names PromQL itself or Prometheus provides.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_FUNCTIONS_AND_KEYWORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "delta", "deriv", "histogram_quantile",
    "vector", "and", "or", "unless", "offset", "bool", "topk", "bottomk", "abs", "clamp_min", "clamp_max",
    "label_replace", "time", "predict_linear", "avg_over_time", "max_over_time", "min_over_time", "printf",
}  # fmt: skip


def sample_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """The sample names that (family name, type) pairs expose (counters add _total, histograms _bucket ...)."""
    names = set()
    for name, kind in families:
        base = name.removesuffix("_total") if kind == "counter" else name
        names |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return names


def factory_metric_names() -> set[str]:
    """Every sample name the metric factories of ingest, fusion, inference (API and worker) and tide declare."""
    from services.common.metrics import ServiceMetrics
    from services.fusion.handlers import FusionMetrics
    from services.inference.handlers import InferenceWorkerMetrics
    from services.inference.metrics import InferenceMetrics
    from services.ingest.pipeline import IngestMetrics
    from services.ingest.sessions import RegistryMetrics
    from services.tide.replica import TideMetrics

    families: list[Metric] = []
    for service, factories in {
        "ingest": (IngestMetrics.create, RegistryMetrics.create),
        "fusion": (FusionMetrics.create,),
        "inference": (InferenceMetrics.create, InferenceWorkerMetrics.create),
        "tide": (TideMetrics.create,),
    }.items():
        metrics = ServiceMetrics.create(service, CollectorRegistry(auto_describe=True))
        for create in factories:
            create(metrics)
        families.extend(metrics.registry.collect())
    return sample_names((family.name, family.type) for family in families)


def exposition_metric_names(text: str) -> set[str]:
    """The sample names a /metrics text declares with `# TYPE` (labelled families without samples included)."""
    return sample_names(
        (parts[2], parts[3]) for line in text.splitlines() if (parts := line.split())[:2] == ["#", "TYPE"]
    )


def recording_rule_names(rule_file: Path) -> set[str]:
    groups = yaml.safe_load(rule_file.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def rule_expressions(rule_file: Path) -> list[str]:
    groups = yaml.safe_load(rule_file.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def expression_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and keywords left out)."""
    text = _QUOTED.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, [5m] or [$__rate_interval]
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = {m.group(1) for m in _NAME.finditer(text)}
    return {n for n in names if n not in _FUNCTIONS_AND_KEYWORDS and not re.fullmatch(r"[0-9.e]+", n)}
