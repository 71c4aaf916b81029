"""Tide Engine: replicated key-value state over a Kafka command log, with no leader."""
