"""Throughput benchmarks. Every figure is measured side by side in one run and recorded with the
machine, the library versions and the settings that produced it."""
