"""Shard builder: ReID dataset layouts -> webdataset tar shards + DALI index + manifest.

The on-disk contract lives in :mod:`shards.format`; dataset layouts in :mod:`shards.layouts`;
the build itself in :mod:`shards.build`; ``verify`` and ``inspect`` read what ``build`` wrote.
"""
