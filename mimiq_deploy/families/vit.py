"""The ViT / DeiT family: timm's `Attention` blocks (VisionTransformer, DeiT, distilled DeiT, register-token
and global-pool ViTs). One global patch grid; `num_prefix_tokens` leading tokens (CLS, the distillation
token of deit_*_distilled, register tokens) that are neither queries nor keys of L_IHC."""
import torch
from timm.layers import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn

from ..attention import CapturedAttention, MatMul
from .base import Family, QueryLayout, has_captured, replace_modules


class ExplicitAttention(CapturedAttention):
    """timm's Attention with its matmuls as modules. Same parameters and submodule names (state dicts
    stay compatible); timm's non-fused path, so logits match timm's own forward."""

    def __init__(self, attn: TimmAttention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.gate = getattr(attn, "gate", None)
        self.qk = MatMul()
        self.av = MatMul(a_nonnegative=True)  # softmax output: never negative

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.qk(q * self.scale, k.transpose(-2, -1))
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class ViTFamily(Family):
    name = "vit"

    def owns(self, model):
        return any(isinstance(m, TimmAttention) for m in model.modules()) or has_captured(model, ExplicitAttention)

    def capture(self, model):
        return replace_modules(model, TimmAttention, ExplicitAttention)

    def layouts(self, model):
        prefix = model.num_prefix_tokens
        layout = QueryLayout(prefix, getattr(model, "cls_token", None) is not None, tuple(model.patch_embed.grid_size))
        return [layout] * sum(isinstance(m, ExplicitAttention) for m in model.modules())

    def tokens(self, model):
        return model.blocks[-1], (lambda out: out), model.num_prefix_tokens


FAMILY = ViTFamily()
