"""Data pipelines: sources that yield a :class:`pipelines.batch.Batch` on the training device,
samplers for the device cache, and batched on-device views (Kornia) for each method."""
