"""ReID evaluation under the published protocols.

- :mod:`train.evaluation.metrics`: ranking metrics (CMC, mAP, mINP) and the distance, pure.
- :mod:`train.evaluation.features`: batched feature extraction of a split, shared by processes.
- :mod:`train.evaluation.protocols`: the :class:`~train.evaluation.protocols.Protocol` registry
  (splits, ranking rule, gallery draws / trials, layouts), :func:`~train.evaluation.protocols.evaluate`
  and the results table.

The command line is :mod:`train.evaluate` (``reid-evaluate``).
"""
