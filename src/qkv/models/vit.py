"""`ViT`: a Vision Transformer (Dosovitskiy et al. 2021) built from `qkv.layers`.

Legend: B batch, C channels, H x W image, p = (ph, pw) patch, gh x gw patch grid
(gh = H // ph, gw = W // pw), P = gh * gw patches, N tokens (N = P + 1 with the [CLS]
token of pool="cls", N = P with pool="mean"), d model width, K classes.

    images (B, C, H, W) --patch_embed (a p-strided p x p convolution)--> (B, P, d), row-major patches
        [cls_token (1, 1, d) in front]                                   (B, N, d)
        + positions (1, N, d): learned (interpolated to other grids) or 2-D sincos
        -> n_layers x pre-norm Block(bidirectional self-attention, GELU MLP) -> norm  = hidden (B, N, d)
        -> pool: the [CLS] token's state, or the mean of the P patch tokens       (B, d)
        -> [pooler: tanh(Linear)] -> [head: Linear]                               (B, K) or (B, d)

Patch t = r * gw + c covers rows r*ph..(r+1)*ph-1 and columns c*pw..(c+1)*pw-1 of the image
(the layout of Hugging Face's ViT, so its checkpoints load: `qkv.models.hf.load`).

Positions at another image size (the patch must divide it). Learned positions were trained on
the grid (gh0, gw0) of config.image_size; for another grid (gh, gw) the patch part of the
table, seen as a (d, gh0, gw0) image, is resized bicubically (align_corners=False) to
(d, gh, gw), the [CLS] position kept as it is: what Hugging Face's interpolate_pos_encoding=True
computes. Sincos positions are a function of the grid and are computed for each (gh, gw):

    with q = d / 4 and w_k = 10000^(-k / q), k = 0..q-1, the patch in row r, column c gets
    pe(r, c) = [sin(r w_0..w_{q-1}), cos(r w_0..w_{q-1}), sin(c w_0..w_{q-1}), cos(c w_0..w_{q-1})]

(the first half of the channels encodes the row, the second half the column), and the [CLS]
token gets the zero vector.

Attention goes through `qkv.attention` with the backend given to `ViT(config, backend=...)`;
the attention modules are `layers.{i}.self_attn`, so `qkv.inspect.capture(model, ...)` records
their weights (B, heads, rows, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.layers import Block
from qkv.models.config import ViTConfig

__all__ = ["ViT", "ViTConfig", "sincos_positions"]


def sincos_positions(gh: int, gw: int, d: int, *, dtype=torch.float32, device=None) -> Tensor:
    """The 2-D sinusoidal positions of a gh x gw grid: (P, d), row-major (see the module docstring)."""
    if d % 4:
        raise ValueError(f"2-D sincos positions need d a multiple of 4, got {d}")
    q = d // 4
    omega = torch.pow(10000.0, -torch.arange(q, dtype=torch.float64, device=device) / q)      # (q,)
    rows = torch.arange(gh, dtype=torch.float64, device=device)[:, None] * omega               # (gh, q)
    cols = torch.arange(gw, dtype=torch.float64, device=device)[:, None] * omega               # (gw, q)
    r = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(gh, gw, 2 * q)           # (gh, gw, d/2)
    c = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(gh, gw, 2 * q)           # (gh, gw, d/2)
    return torch.cat([r, c], dim=-1).reshape(gh * gw, d).to(dtype)


class ViT(nn.Module):
    """A Vision Transformer from a `ViTConfig`.

    Parameters: `patch_embed` (Conv2d: weight (d, C, ph, pw), bias (d,)), `cls_token` (1, 1, d)
    with pool="cls", `pos_embed` (1, N0, d) with learned positions (N0 the tokens of
    config.image_size), `layers.{i}.{norm1, self_attn.{q,k,v,o}_proj, norm2, ffn.{fc1, fc2}}`
    (pre-norm `qkv.layers.Block`s), `norm`, `pooler` (d, d) with config.pooler, `head` (K, d)
    with config.num_classes.

    forward(images) -> logits (B, K), or the pooled (B, d) without a head (HF's pooler_output
    with config.pooler); hidden(images) -> (B, N, d) after the final norm; grid((H, W)) -> (gh, gw).
    """

    def __init__(self, config: ViTConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a qkv.models.ViTConfig, got {type(config).__name__}")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        d = c.d_model
        self.patch_embed = nn.Conv2d(c.channels, d, kernel_size=c.patch_size, stride=c.patch_size, **factory)
        if c.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **factory))
        else:
            self.register_parameter("cls_token", None)
        if c.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, d, **factory))
        else:
            self.register_parameter("pos_embed", None)
        self.embed_drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            Block(d, c.n_heads, ffn_hidden=c.ffn_hidden, activation=c.activation, norm="layer", norm_position="pre",
                  eps=c.norm_eps, bias=True, dropout=c.dropout, backend=backend, **factory)
            for _ in range(c.n_layers))
        if not c.qkv_bias:
            for block in self.layers:
                for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                    proj.register_parameter("bias", None)
        self.norm = nn.LayerNorm(d, eps=c.norm_eps, **factory)
        self.pooler = nn.Linear(d, d, **factory) if c.pooler else None
        self.head = nn.Linear(d, c.num_classes, **factory) if c.num_classes is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Hugging Face ViT's initialisation: truncated N(0, 0.02) matrices, kernels, [CLS] token and
        learned positions; zero biases; unit LayerNorms."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(m.weight, 0.0, 0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            for p in (self.cls_token, self.pos_embed):
                if p is not None:
                    nn.init.trunc_normal_(p, 0.0, 0.02)

    # -- shapes ----------------------------------------------------------------

    def grid(self, size) -> tuple[int, int]:
        """(gh, gw), the patch grid of an image of size (H, W) (an int: a square image).

        ValueError when the patch does not divide the size, naming the nearest sizes that fit."""
        ph, pw = self.config.patch_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise TypeError(f"size must be an (H, W) pair of ints, got {size!r}")
        H, W = size
        bad = [f"{name}={s} is not a positive multiple of the patch's {p} (use e.g. {max(p, s // p * p)} or "
               f"{(s // p + 1) * p})" for name, s, p in (("H", H, ph), ("W", W, pw)) if s < p or s % p]
        if bad:
            raise ValueError(f"image size {(H, W)} does not fit patch_size {(ph, pw)}: {'; '.join(bad)}; resize "
                             f"or crop the images")
        return H // ph, W // pw

    def position_embeddings(self, grid: tuple[int, int]) -> Tensor | None:
        """The positions added to the tokens of a (gh, gw) grid: (1, N, d) ([CLS] first with pool="cls")."""
        gh, gw = grid
        c = self.config
        ref = self.patch_embed.weight
        if c.positions == "sincos":
            pe = sincos_positions(gh, gw, c.d_model, dtype=ref.dtype, device=ref.device)[None]   # (1, P, d)
            if c.pool == "cls":
                pe = torch.cat([pe.new_zeros(1, 1, c.d_model), pe], dim=1)                   # (1, N, d)
            return pe
        table = self.pos_embed                                                               # (1, N0, d)
        if (gh, gw) == c.grid:
            return table
        lead = table[:, :1] if c.pool == "cls" else table[:, :0]                             # (1, 0 or 1, d)
        gh0, gw0 = c.grid
        patches = table[:, lead.shape[1]:].reshape(1, gh0, gw0, c.d_model).permute(0, 3, 1, 2)  # (1, d, gh0, gw0)
        patches = F.interpolate(patches, size=(gh, gw), mode="bicubic", align_corners=False)   # (1, d, gh, gw)
        return torch.cat([lead, patches.permute(0, 2, 3, 1).reshape(1, gh * gw, c.d_model)], dim=1)

    # -- forward ---------------------------------------------------------------

    def hidden(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) float -> the final token states (B, N, d), after the final norm."""
        grid = self._check(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                  # (B, P, d), row-major patches
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, d)
        x = self.embed_drop(x + self.position_embeddings(grid))
        for block in self.layers:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, N, d) final states -> (B, d): the [CLS] state (pool="cls") or the patches' mean
        ("mean"), through the pooler when the model has one."""
        pooled = tokens[:, 0] if self.config.pool == "cls" else tokens.mean(dim=1)
        return torch.tanh(self.pooler(pooled)) if self.pooler is not None else pooled

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) float -> logits (B, num_classes), or the pooled (B, d) without a head."""
        pooled = self.pool(self.hidden(images))
        return self.head(pooled) if self.head is not None else pooled

    def _check(self, images) -> tuple[int, int]:
        c = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}; convert it, e.g. "
                            f"images.float() / 255 for 8-bit pixels")
        if images.dim() != 4:
            hint = "; for one image pass image[None]" if images.dim() == 3 else ""
            raise ValueError(f"images must be 4-D (B, C, H, W) with C={c.channels}, got shape "
                             f"{tuple(images.shape)}{hint}")
        if images.shape[1] != c.channels:
            raise ValueError(f"images have {images.shape[1]} channel(s) but the model takes {c.channels}: pass "
                             f"(B, {c.channels}, H, W) (channels first; convert grey/RGB images to match)")
        weight = self.patch_embed.weight
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(f"images are {images.dtype} but the model is {weight.dtype}; cast them with "
                            f"images.to({weight.dtype})")
        return self.grid((int(images.shape[2]), int(images.shape[3])))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        c = self.config
        return (f"image_size={c.image_size}, patch_size={c.patch_size}, pool={c.pool!r}, "
                f"positions={c.positions!r}, params={n / 1e6:.2f}M")

