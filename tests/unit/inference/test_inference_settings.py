"""Inference settings: the ports ARCHITECTURE.md gives, and the model list from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.inference.settings import InferenceSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CLISONIX_"):
            monkeypatch.delenv(name)


def test_defaults():
    settings = InferenceSettings()
    assert (settings.service_name, settings.grpc_port, settings.metrics_port) == ("inference", 8001, 9103)
    assert settings.model_repository == Path("models") and settings.models == ()
    assert settings.max_batch_size == 32 and settings.max_queue_delay_s == 0.0
    assert (settings.topic_fused, settings.topic_results) == (
        "clisonix.signals.fused.v1",
        "clisonix.inference.results.v1",
    )
    assert (settings.consumer_group, settings.worker_model, settings.kafka_worker) == (
        "clisonix-inference",
        "ecg-beat-pruned",
        True,
    )


@pytest.mark.parametrize(
    ("value", "models"),
    [("a,b", ("a", "b")), (" a , b ,", ("a", "b")), ('["a", "b"]', ("a", "b")), ("", ())],
)
def test_models_from_the_environment(monkeypatch, value, models):
    monkeypatch.setenv("CLISONIX_MODELS", value)
    monkeypatch.setenv("CLISONIX_MAX_QUEUE_DELAY_MS", "0.5")
    settings = InferenceSettings()
    assert settings.models == models
    assert settings.max_queue_delay_s == pytest.approx(0.0005)


def test_bad_batching_values_are_refused():
    with pytest.raises(ValueError):
        InferenceSettings(max_batch_size=0)
    with pytest.raises(ValueError):
        InferenceSettings(max_queue_delay_ms=-1)
