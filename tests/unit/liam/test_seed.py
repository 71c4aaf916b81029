"""The seed program (/work/shared/seeds/liam-api.md) runs exactly as printed, in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SEED_PROGRAM = """\
# LIAM Binary Algebra - Real Production Code
from liam_core import LaborIntelligenceEngine, BinaryAlgebra

# Initialize LIAM engine
engine = LaborIntelligenceEngine(dimensions=64)
algebra = BinaryAlgebra()

# Ingest labor metrics
tensor = engine.ingest_labor_data({
    'productivity': 85.5,
    'efficiency': 92.3,
    'quality': 88.7,
    'throughput': 120.0
})

# Compute patterns with real matrix algebra
matrix = engine.compute_labor_matrix([tensor])
patterns = engine.analyze_intelligence_patterns(matrix)
print(f"Rank: {patterns['rank']}, Condition: {patterns['condition_number']:.2f}")
"""


def test_seed_program_runs_as_printed(tmp_path: Path) -> None:
    script = tmp_path / "seed.py"
    script.write_text(SEED_PROGRAM)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    # One row: one non-zero singular value, so rank 1 and condition 1.
    assert result.stdout == "Rank: 1, Condition: 1.00\n"
