"""Losses, one per file, each with its tensor shapes in the docstring."""
