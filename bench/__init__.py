"""Benchmarks of the Clisonix services, run by `clisonix bench <name>` (see bench/README.md)."""
