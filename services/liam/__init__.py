"""LIAM: metric records as vectors, their matrix algebra and principal patterns, and binary hypervectors."""

from services.liam.binary import BinaryAlgebra, HammingIndex
from services.liam.engine import LaborIntelligenceEngine
from services.liam.errors import InvalidHypervector, InvalidMetrics, NonNumericMetric
from services.liam.streaming import PatternStream

__all__ = [
    "BinaryAlgebra",
    "HammingIndex",
    "InvalidHypervector",
    "InvalidMetrics",
    "LaborIntelligenceEngine",
    "NonNumericMetric",
    "PatternStream",
]
