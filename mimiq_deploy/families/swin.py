"""The Swin family: timm's `SwinTransformer` (`WindowAttention` in `SwinTransformerBlock`s, `PatchMerging`
between stages). Attention is local: each block attends within (num_windows * B) windows of
window_size tokens, every second block on a grid cyclically shifted by half a window, where an additive
mask (-100) keeps a window's tokens from different image regions apart. No prefix tokens; the head
average-pools the last stage.

How the method maps onto it:
- L_IHC compares heads' attention rows per window query, on the window grid, with the logits the softmax
  sees (scaled QK^T plus the relative position bias, which is each head's learned positional pattern);
  in shifted windows only the keys of the query's own region count (minmax and SSIM statistics over them).
- L_HAD compares head outputs softmax(.)V per window (statistics over a window's tokens per channel).
- Fake quantization: qkv, proj, both attention matmuls, fc1, fc2, the patch-merging reduction, the
  patch embedding and the head (every Linear / Conv2d / MatMul, as for ViT).
- MaskAQ: the patch-similarity entropy (over the last stage's tokens), token-weighted L_HAD (a token's
  weight: the attention it receives within its window) and the periodic refresh apply. Masked attention
  alignment does not: it picks one set of informative patches per image from attention averaged over
  all layers, but Swin's token set changes at every patch merging and has no CLS query to rank by.
  A Gaussian SSIM window in L_IHC (ihc_window > 1) does not either: a window grid (7x7, or smaller where
  timm shrinks the window to the feature map) is no larger than the Gaussian, and shifted windows mask keys.
"""
import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import nn

from ..attention import CapturedAttention, MatMul, Tap
from ..errors import MimiqError
from .base import Family, QueryLayout, has_captured, replace_modules


class ExplicitWindowAttention(CapturedAttention):
    """timm's WindowAttention with its matmuls as modules and a `scores` tap on the biased logits.
    Same parameters and names (state dicts stay compatible); timm's non-fused path."""

    def __init__(self, attn: WindowAttention):
        super().__init__()
        self.dim = attn.dim
        self.window_size = attn.window_size
        self.window_area = attn.window_area
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.qk = MatMul()
        self.av = MatMul(a_nonnegative=True)  # softmax output: never negative
        self.scores = Tap()

    def logits_module(self) -> nn.Module:
        return self.scores

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.scores(self.qk(q * self.scale, k.transpose(-2, -1)) + self._rel_pos_bias())
        if mask is not None:  # (num_windows, N, N) of 0 / -100: shifted windows
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))


class SwinFamily(Family):
    name = "swin"
    mask_align = False
    gaussian_ihc = False

    def owns(self, model):
        return any(type(m) is WindowAttention for m in model.modules()) or \
            has_captured(model, ExplicitWindowAttention)

    def capture(self, model):
        if any(getattr(b, "dynamic_mask", False) for b in model.modules() if isinstance(b, SwinTransformerBlock)):
            raise MimiqError("Swin models with dynamic_img_size are not supported: build them with a fixed img_size")
        return replace_modules(model, WindowAttention, ExplicitWindowAttention)

    def layouts(self, model):
        out = []
        for block in model.modules():
            if isinstance(block, SwinTransformerBlock) and isinstance(block.attn, ExplicitWindowAttention):
                (h, w), (wh, ww) = block.input_resolution, block.window_size
                windows = -(-h // wh) * -(-w // ww)  # timm pads the feature map to whole windows
                mask = block.attn_mask
                out.append(QueryLayout(0, False, (wh, ww), windows, None if mask is None else mask == 0))
        return out

    def tokens(self, model):
        return model.layers[-1], (lambda out: out.flatten(1, 2)), 0  # (B, H, W, C) -> (B, H*W, C)


FAMILY = SwinFamily()
