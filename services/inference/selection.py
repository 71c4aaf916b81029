"""Which model version serves a task: the rules, without I/O (no Tide, no Kafka, no gRPC).

The Tide record `models/active/<task>` holds `{"model": <name>, "version": <version>}` (JSON). The worker serves
the task with that model version when it is in the local repository and loads; otherwise (no record, a record it
cannot read, a model or version it does not have) with its configured default. A ModelInfer request that names
no version gets the newest version of its model, unless that model is the one Tide made active for the task:
then it gets the active version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

JSON = "application/json"
# Where a choice came from: the bounded values of the `source` label.
FROM_TIDE = "tide"
FROM_DEFAULT = "default"


@dataclass(frozen=True)
class ActiveRecord:
    """What a `models/active/<task>` record names (version "" means the newest)."""

    model: str
    version: str


@dataclass(frozen=True)
class ModelChoice:
    """The model version a task is served with, and where the choice came from (FROM_TIDE or FROM_DEFAULT)."""

    model: str
    version: str
    source: str


class BadRecord(ValueError):
    """A `models/active/<task>` record that does not name a model version."""


def is_path_segment(text: str) -> bool:
    """Whether `text` can be one folder name of the repository (no separators, not "." or "..")."""
    return bool(text) and text not in (".", "..") and "/" not in text and "\\" not in text and "\x00" not in text


def parse_active_record(value: bytes, content_type: str) -> ActiveRecord:
    """The model and version a record names; BadRecord when it is not such a JSON object, or names something
    that cannot be a model (a path) or a version (a positive integer, or "" for the newest)."""
    if content_type != JSON:
        raise BadRecord(f"content type {content_type!r}, expected {JSON}")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRecord(f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise BadRecord('expected {"model": <name>, "version": <version>}')
    model = data["model"]
    raw_version = data.get("version", "")
    if isinstance(raw_version, bool) or not isinstance(raw_version, (str, int)):
        raise BadRecord("the version must be a string or an integer")
    version = str(raw_version)
    if not is_path_segment(model):
        raise BadRecord("the model name must be one folder name")
    if version and (not version.isdigit() or int(version) < 1):
        raise BadRecord("the version must be a positive integer")
    return ActiveRecord(model, version)


def request_version(model: str, version: str, active: ModelChoice | None) -> str:
    """The version a ModelInfer request for `model` runs: the one it names; else, when `model` is the task's
    active model from Tide, the active version; else "" (the newest)."""
    if version:
        return version
    if active is not None and active.source == FROM_TIDE and active.model == model:
        return active.version
    return ""
