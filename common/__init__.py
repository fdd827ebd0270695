"""Neutral helpers shared by every package (shards, pipelines, models, train, benchmarks)."""
