"""The `clisonix` command's help texts, and the error for an unknown stream source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.ingest.sources import SOURCE_KINDS, open_source

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ["broker", "up", "stream", "demo", "bench", "ingest", "model"]


def clisonix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_top_level_help() -> None:
    result = clisonix("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: clisonix" in result.stdout
    assert "real-time, energy-efficient biosignal AI" in result.stdout
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    result = clisonix(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: clisonix {command}" in result.stdout
    # A description paragraph follows the usage lines.
    _, _, rest = result.stdout.partition("\n\n")
    description = rest.split("\n\n")[0].strip()
    assert len(description) > 20, result.stdout
    assert not description.startswith(("positional arguments", "options")), result.stdout


def test_stream_help_lists_source_kinds() -> None:
    out = clisonix("stream", "--help").stdout
    for kind in ("synthetic", "wfdb", "edf", "xdf", "lsl", "brainflow"):
        assert kind in out


def test_no_command_is_a_usage_error() -> None:
    result = clisonix()
    assert result.returncode == 2
    assert "required" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = clisonix("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_unknown_source_kind_names_the_kinds() -> None:
    with pytest.raises(ValueError) as info:
        open_source("telepathy:/dev/brain")
    message = str(info.value)
    assert "unknown source kind 'telepathy'" in message
    for kind in SOURCE_KINDS:
        assert kind in message


def test_source_kind_without_path_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs a path"):
        open_source("wfdb")


def test_stream_with_unknown_source_fails_before_connecting() -> None:
    result = clisonix("stream", "--source", "telepathy:x", "--to", "127.0.0.1:1")
    assert result.returncode != 0
    assert "unknown source kind 'telepathy'" in result.stderr
    assert "synthetic" in result.stderr
