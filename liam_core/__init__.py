"""LIAM analytics as the seed program imports it; the code lives in services.liam."""

from services.liam import (
    BinaryAlgebra,
    HammingIndex,
    InvalidHypervector,
    InvalidMetrics,
    LaborIntelligenceEngine,
    NonNumericMetric,
    PatternStream,
)

__all__ = [
    "BinaryAlgebra",
    "HammingIndex",
    "InvalidHypervector",
    "InvalidMetrics",
    "LaborIntelligenceEngine",
    "NonNumericMetric",
    "PatternStream",
]
