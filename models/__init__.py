"""Backbones and heads for ReID pre-training.

- :mod:`models.resnet`: ResNet-50 with last stride 1, one-stream and two-stream (RGB / IR stems)
  for MMGL; parameter names follow torchvision's ResNet-50.
- :mod:`models.vit`: ViT-S/16 and ViT-B/16 with learnable [PART] tokens for PASS.
- :mod:`models.heads`: the DINO head and one head per token type (PASS); the permutation head
  with Sinkhorn normalization and the stripe part projection (MMGL).
"""
