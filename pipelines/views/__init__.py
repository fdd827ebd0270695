"""Method-specific views, made in batch on the training device (Kornia + torch, no per-sample Python).

Every view maker takes a uint8 ``(B, 3, H, W)`` batch (:class:`pipelines.batch.Batch.images`)
on any device and a ``generator`` (a ``torch.Generator``, an int seed or ``None``), and returns
float32 tensors on the same device. How reproducibility works: :mod:`pipelines.views.common`.

- :class:`MMGLViews`: RGB + infrared views with stripes shuffled by a shared permutation.
- :class:`PASSViews`: 2 global + 9 region-bound local crops, DINO augmentations.
- :class:`FinetuneViews`: supervised ReID training views and the evaluation transform.
"""

from pipelines.views.common import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, GeneratorLike
from pipelines.views.finetune import FinetuneViews
from pipelines.views.mmgl import MMGLViewBatch, MMGLViews
from pipelines.views.pass_views import PASSViewBatch, PASSViews
from pipelines.views.stripes import RandomStripeShuffle, permutation_matrix, shuffle_stripes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "GeneratorLike",
    "FinetuneViews",
    "MMGLViewBatch",
    "MMGLViews",
    "PASSViewBatch",
    "PASSViews",
    "RandomStripeShuffle",
    "permutation_matrix",
    "shuffle_stripes",
]
