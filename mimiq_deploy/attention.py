"""Attention capture: timm's `Attention` re-expressed with its two matmuls as modules.

Hooks on `qk` see each head's scaled QK^T logits (B, H, N, N) and hooks on `av` see each
head's output softmax(QK^T)V (B, H, N, head_dim). The fake-quant student swaps these
`MatMul`s for quantized ones, so both operands of both matmuls can be quantized.
The math is timm's non-fused path, so logits match timm's own forward.
"""
import torch
from torch import nn
from timm.layers import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Attention as TimmAttention

from .errors import MimiqError


class MatMul(nn.Module):
    """`a @ b` as a module, so hooks and quantizers can attach to it.

    a_nonnegative: the first operand is never negative (attention probabilities), so its
    quantizer may use an unsigned grid (QuantConfig.unsigned_probs)."""

    def __init__(self, a_nonnegative: bool = False):
        super().__init__()
        self.a_nonnegative = a_nonnegative

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class ExplicitAttention(nn.Module):
    """Same parameters and submodule names as timm's Attention (state dicts stay compatible)."""

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
        self.av = MatMul(a_nonnegative=True)

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


def capture_attention(model: nn.Module) -> nn.Module:
    """Replace every timm Attention in `model` (in place) by ExplicitAttention; returns model."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, TimmAttention)]
    for name, attn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExplicitAttention(attn))
    return model


def attention_modules(model: nn.Module) -> list[ExplicitAttention]:
    """The captured attention blocks in network order."""
    return [m for m in model.modules() if isinstance(m, ExplicitAttention)]


class AttentionRecorder:
    """What the captured attention blocks computed in the last forward, one entry per block in network order:
    logits, the scaled QK^T logits (B, H, N, N); outputs, the head outputs softmax(QK^T)V (B, H, N, head_dim);
    maps, the attention maps softmax(QK^T) (detached). Synthesis reads logits, distillation outputs (and maps)."""

    def __init__(self, model, logits: bool = True, outputs: bool = False, maps: bool = False):
        self.logits, self.outputs, self.maps = [], [], []
        blocks = attention_modules(model)
        if not blocks:
            raise MimiqError("model has no captured attention (load it with mimiq_deploy.models.load_model)")
        self.handles = [m.qk.register_forward_hook(lambda _m, _i, out: self.logits.append(out))
                        for m in blocks] if logits else []
        if outputs or maps:
            def keep(_m, inputs, out):
                if outputs:
                    self.outputs.append(out)
                if maps:
                    self.maps.append(inputs[0].detach())
            self.handles += [m.av.register_forward_hook(keep) for m in blocks]

    def clear(self):
        self.logits, self.outputs, self.maps = [], [], []

    def remove(self):
        for h in self.handles:
            h.remove()


def token_importance(maps: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, P) how much attention each patch token gets, from attention maps (B, H, N, N):
    the CLS query's attention averaged over heads; without a CLS token, the attention a
    token receives on average. MaskAQ ranks informative patches by it."""
    attn = maps[:, :, :, prefix:]
    return (attn[:, :, 0] if prefix else attn.mean(2)).mean(1)
