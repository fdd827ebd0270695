"""Vision Transformer with learnable [PART] tokens (PASS).

Token sequence
--------------
A global view (the full image, e.g. 256x128) carries ``[CLS, PART_1 .. PART_K, patches]``; a
local view cut from horizontal region k (e.g. 128x64) carries ``[CLS, PART_k, patches]``. Every
token type has its own learned position embedding: ``cls_pos_embed`` for CLS, one row of
``part_pos_embed`` per part, and ``patch_pos_embed`` on the patch grid of ``img_size``
(16x8 for 256x128), bicubically interpolated when a view has another grid (8x4 for 128x64).

The region of a local view is passed to :meth:`VisionTransformer.forward` as ``region``:

- ``None``: global views, all K part tokens;
- an ``int`` k: every view of the batch comes from region k (the simplest contract);
- an int64 tensor ``(B,)``: view b comes from region ``region[b]``, so the local views of all
  regions (same size) run in one pass. Values must lie in ``[0, K)``; they are not checked on
  the host, to avoid waiting for the device.

Names and layout
----------------
Modules follow timm's ``vision_transformer.py`` (``patch_embed.proj``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``/``fc2``, ``norm``,
``cls_token``). The position embeddings are kept apart (``cls_pos_embed (1, 1, D)``,
``part_pos_embed (1, K, D)``, ``patch_pos_embed (1, N, D)``) so that none of them can silently
load into timm's combined ``pos_embed``; timm's/TransReID's ``pos_embed`` is
``cat([cls_pos_embed, patch_pos_embed], dim=1)``. ``part_tokens`` is ``(1, K, D)``.

Blocks are pre-norm with qkv bias, MLP ratio 4, GELU, LayerNorm eps 1e-6, stochastic depth rising
linearly from 0 in the first block to ``drop_path_rate`` in the last, and attention through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
There is no dropout besides drop path (DINO and PASS use none).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ViTOutput(NamedTuple):
    """The final-normed tokens of a batch of views.

    cls:     ``(B, D)``
    parts:   ``(B, K, D)`` for global views, ``(B, 1, D)`` for local views (PART_k of the region)
    patches: ``(B, N, D)`` with N = (H / patch) * (W / patch), row-major over the patch grid
    """

    cls: torch.Tensor
    parts: torch.Tensor
    patches: torch.Tensor


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability ``drop_prob``
    and scales the kept ones by ``1 / (1 - drop_prob)``, so the expectation is unchanged."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv ``patch x patch`` stride ``patch``.

    ``(B, C, H, W) -> (B, (H/patch) * (W/patch), D)``; H and W must be multiples of ``patch``
    (a remainder would be dropped silently by the strided conv).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        # flatten + transpose rather than view: also valid on channels_last inputs.
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> (3, B, heads, T, D/heads): the layout scaled_dot_product_attention takes.
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``Linear(D, ratio * D) -> GELU -> Linear(ratio * D, D)`` on ``(B, T, D)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then the same with the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a CLS token and ``num_parts`` [PART] tokens (see the module docstring).

    Args:
        img_size: ``(H, W)`` of a global view; fixes the grid ``patch_pos_embed`` is learned on.
        patch_size: patch side and stride of the patch embedding.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's shape.
        num_parts: K, the number of [PART] tokens (= horizontal regions).
        drop_path_rate: stochastic depth of the last block (0.1 for the PASS student).
        eps: LayerNorm epsilon.

    Init: truncated normal (std 0.02, cut at +-2 as ``nn.init.trunc_normal_`` and DINO do, so in
    effect untruncated) for the tokens, the position embeddings and every Linear weight; Linear
    biases 0; LayerNorm weight 1, bias 0; the patch conv keeps PyTorch's default, as in DINO
    and timm.
    """

    def __init__(
        self,
        img_size: tuple[int, int] = (256, 128),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_parts: int = 3,
        drop_path_rate: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        if num_parts < 1:
            raise ValueError(f"num_parts must be positive, got {num_parts}")
        self.img_size = tuple(img_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.embed_dim = embed_dim
        #: Size of :meth:`global_feature`: CLS and the mean PART token side by side.
        self.feature_dim = 2 * embed_dim
        self.num_parts = num_parts
        # Prefix length of a global view (timm's attribute); a local view has 2 (CLS, PART_k).
        self.num_prefix_tokens = 1 + num_parts

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part_tokens = nn.Parameter(torch.zeros(1, num_parts, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part_pos_embed = nn.Parameter(torch.zeros(1, num_parts, embed_dim))
        self.patch_pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        # Plain Python, not torch.linspace: the model can then be built on the meta device.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, eps) for rate in rates))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.cls_token, self.part_tokens, self.cls_pos_embed, self.part_pos_embed, self.patch_pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """``patch_pos_embed`` resampled to a ``grid = (h, w)`` patch grid: ``(1, h * w, D)``.

        Bicubic, ``align_corners=False``, without antialiasing (as DINO / PASS), computed in
        float32. On the learned grid it returns the parameter itself.
        """
        if tuple(grid) == self.grid_size:
            return self.patch_pos_embed
        gh, gw = self.grid_size
        pos = self.patch_pos_embed.float().reshape(1, gh, gw, self.embed_dim).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2).to(self.patch_pos_embed.dtype)

    def _prefix_tokens(self, batch: int, region: int | torch.Tensor | None) -> torch.Tensor:
        """``[CLS, parts]`` with their position embeddings: ``(B, 1 + K, D)`` or ``(B, 2, D)``."""
        cls = (self.cls_token + self.cls_pos_embed).expand(batch, -1, -1)
        parts = self.part_tokens + self.part_pos_embed  # (1, K, D)
        if region is None:
            parts = parts.expand(batch, -1, -1)
        elif isinstance(region, torch.Tensor):
            if region.shape != (batch,):
                raise ValueError(f"region must have shape ({batch},), got {tuple(region.shape)}")
            parts = parts[0, region].unsqueeze(1)
        else:
            if not 0 <= region < self.num_parts:
                raise ValueError(f"region must be in [0, {self.num_parts}), got {region}")
            parts = parts[:, region : region + 1].expand(batch, -1, -1)
        return torch.cat([cls, parts], dim=1)

    def forward_features(self, images: torch.Tensor, region: int | torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: ``(B, 3, H, W) -> (B, P + N, D)``.

        P (the prefix) is ``1 + K`` for global views (``region=None``) and 2 for local views.
        """
        h, w = images.shape[-2:]
        patch = self.patch_embed.patch_size
        patches = self.patch_embed(images) + self.interpolate_patch_pos_embed((h // patch, w // patch))
        x = torch.cat([self._prefix_tokens(images.shape[0], region), patches], dim=1)
        return self.norm(self.blocks(x))

    def forward(self, images: torch.Tensor, region: int | torch.Tensor | None = None) -> ViTOutput:
        """``(B, 3, H, W)`` float views -> :class:`ViTOutput` (CLS, parts, patches)."""
        tokens = self.forward_features(images, region)
        num_parts = self.num_parts if region is None else 1
        return ViTOutput(tokens[:, 0], tokens[:, 1 : 1 + num_parts], tokens[:, 1 + num_parts :])

    def global_feature(self, images: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """The ReID feature of global views, ``cat(CLS, mean(PART_k))`` (the PASS / TransReID
        fine-tuning feature): ``(B, 3, H, W)`` -> ``(B, feature_dim)`` (``modality`` unused)."""
        out = self(images)
        return torch.cat([out.cls, out.parts.mean(dim=1)], dim=1)


def vit_small(num_parts: int = 3, img_size: tuple[int, int] = (256, 128), drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-S/16: dim 384, depth 12, 6 heads. 21,641,856 parameters with 3 parts at 256x128."""
    return VisionTransformer(img_size, 16, 3, 384, 12, 6, num_parts=num_parts, drop_path_rate=drop_path_rate)


def vit_base(num_parts: int = 3, img_size: tuple[int, int] = (256, 128), drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-B/16: dim 768, depth 12, 12 heads."""
    return VisionTransformer(img_size, 16, 3, 768, 12, 12, num_parts=num_parts, drop_path_rate=drop_path_rate)


def vit_tiny_test(
    num_parts: int = 3, img_size: tuple[int, int] = (256, 128), depth: int = 2, drop_path_rate: float = 0.0
) -> VisionTransformer:
    """A tiny ViT for tests: dim 48, 3 heads, patch 16, the same code path."""
    return VisionTransformer(img_size, 16, 3, 48, depth, 3, num_parts=num_parts, drop_path_rate=drop_path_rate)


# --- key conversions for other code bases (used by models.export) ---------------------------------
#: Extra keys of :func:`to_timm_state_dict`: the [PART] tokens and their position embeddings,
#: which timm / TransReID models do not have (``load_state_dict(..., strict=False)`` skips them).
TIMM_EXTRA_KEYS = ("part_tokens", "part_pos_embed")


def to_timm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`VisionTransformer` ``state_dict`` in the key layout of timm's
    ``VisionTransformer`` and of TransReID's ViT.

    Same names for ``patch_embed.proj.*``, ``cls_token``, ``blocks.N.*`` and ``norm.*``;
    ``pos_embed`` ``(1, 1 + N, D)`` is ``cat([cls_pos_embed, patch_pos_embed], dim=1)`` (CLS row
    first, then the patch grid row-major). Kept as extra keys: ``part_tokens`` ``(1, K, D)`` and
    ``part_pos_embed`` ``(1, K, D)`` (:data:`TIMM_EXTRA_KEYS`).
    """
    out = {k: v for k, v in state.items() if k not in ("cls_pos_embed", "patch_pos_embed")}
    out["pos_embed"] = torch.cat([state["cls_pos_embed"], state["patch_pos_embed"]], dim=1)
    return out


def to_pass_reid_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`VisionTransformer` ``state_dict`` in the key layout of PASS-reID's fine-tuning
    ViT (``PASS_transreid``): ``cls_token``, ``part_token{k}`` ``(1, 1, D)``, ``cls_pos``,
    ``part{k}_pos`` ``(1, 1, D)`` for k = 1..K, ``pos_embed`` = the patch position embeddings
    only ``(1, N, D)``; ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*`` unchanged."""
    renamed = {"cls_pos_embed": "cls_pos", "patch_pos_embed": "pos_embed"}
    out = {renamed.get(k, k): v for k, v in state.items() if k not in ("part_tokens", "part_pos_embed")}
    for k in range(state["part_tokens"].shape[1]):
        out[f"part_token{k + 1}"] = state["part_tokens"][:, k : k + 1].clone()
        out[f"part{k + 1}_pos"] = state["part_pos_embed"][:, k : k + 1].clone()
    return out


def from_pass_reid_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_pass_reid_state_dict`: a backbone ``state_dict`` in the layout of
    PASS-reID's ViT (``PASS/vision_transformer.py`` pre-training, ``PASS_transreid`` fine-tuning:
    ``part_token{k}``, ``cls_pos``, ``part{k}_pos`` ``(1, 1, D)``, ``pos_embed`` of the patches
    ``(1, N, D)``) -> this module's keys (``part_tokens``, ``part_pos_embed`` ``(1, K, D)``,
    ``cls_pos_embed``, ``patch_pos_embed``). K is the number of ``part_token{k}`` keys (1..K,
    none missing); other keys pass unchanged (the caller loads strictly to catch strays)."""
    ks = sorted(int(k[len("part_token"):]) for k in state if k.startswith("part_token") and k[len("part_token"):].isdigit())
    if ks != list(range(1, len(ks) + 1)) or not ks:
        raise KeyError(f"part_token1..K expected, found part tokens {ks}")
    missing = [name for k in ks for name in (f"part{k}_pos",) if name not in state] + [
        name for name in ("cls_pos", "pos_embed") if name not in state]
    if missing:
        raise KeyError(f"missing {', '.join(missing)}")
    parts = {f"part_token{k}" for k in ks} | {f"part{k}_pos" for k in ks}
    renamed = {"cls_pos": "cls_pos_embed", "pos_embed": "patch_pos_embed"}
    out = {renamed.get(k, k): v for k, v in state.items() if k not in parts}
    out["part_tokens"] = torch.cat([state[f"part_token{k}"] for k in ks], dim=1)
    out["part_pos_embed"] = torch.cat([state[f"part{k}_pos"] for k in ks], dim=1)
    return out


def patch_grid_of(num_patches: int, hw_ratio: int = 2) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of ``num_patches`` position embeddings of an image ``hw_ratio``
    times as high as wide (16x8 for 128 at 2:1), as PASS_transreid's ``resize_pos_embed`` infers
    it (``PRETRAIN_HW_RATIO``); refused when ``h * w != num_patches``."""
    h = int(math.sqrt(num_patches * hw_ratio))
    w = h // hw_ratio
    if h * w != num_patches:
        raise ValueError(f"{num_patches} position embeddings are not an h x w grid with h = {hw_ratio} w")
    return h, w


def resize_patch_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Patch position embeddings ``(1, gh * gw, D)`` on ``old_grid`` resampled to ``new_grid``:
    ``(1, h * w, D)``, row-major. ``mode="bilinear"`` (``align_corners=False``) is what
    PASS_transreid / TransReID's ``load_param`` does when the fine-tuning input differs from
    the pre-training one (384x128 from 256x128: 16x8 -> 24x8); the ViT's own per-forward
    interpolation (:meth:`VisionTransformer.interpolate_patch_pos_embed`) is bicubic, as DINO."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    gh, gw = old_grid
    d = pos.shape[-1]
    grid = pos.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)


def adapt_to_model(model: VisionTransformer, state: dict[str, torch.Tensor], hw_ratio: int = 2) -> dict[str, torch.Tensor]:
    """``state`` (this module's keys) with ``patch_pos_embed`` resized to ``model``'s grid
    (:func:`resize_patch_pos_embed`, bilinear as the reference's loader; the old grid from
    :func:`patch_grid_of` with ``hw_ratio``): a model built for 384x128 loads weights
    pre-trained at 256x128. Everything else is returned as it is."""
    pos = state["patch_pos_embed"]
    new = model.grid_size
    if pos.shape[1] == new[0] * new[1]:
        return state
    return {**state, "patch_pos_embed": resize_patch_pos_embed(pos, patch_grid_of(pos.shape[1], hw_ratio), new)}
