"""Attention capture: a family's attention re-expressed with its two matmuls as modules.

Each model family (families/) replaces its attention blocks by a `CapturedAttention`: hooks on
`qk` see each head's scaled QK^T (B, H, N, N), hooks on `logits_module()` the per-head logits the
method compares (for ViT the same tensor; for Swin with the relative position bias added), and hooks
on `av` each head's output softmax(.)V (B, H, N, head_dim). The fake-quant student swaps these
`MatMul`s for quantized ones, so both operands of both matmuls can be quantized.
"""
import torch
from torch import nn

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


class Tap(nn.Module):
    """An identity with a name: a hook point inside a block (never quantized: not in QUANT_MODULES)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CapturedAttention(nn.Module):
    """Base of every family's explicit attention: it owns `qk` and `av` MatMul modules."""
    qk: MatMul
    av: MatMul

    def logits_module(self) -> nn.Module:
        """The module whose output is the (B, H, N, N) per-head logits the method reads."""
        return self.qk


def attention_modules(model: nn.Module) -> list[CapturedAttention]:
    """The captured attention blocks in network order."""
    return [m for m in model.modules() if isinstance(m, CapturedAttention)]


class AttentionRecorder:
    """What the captured attention blocks computed in the last forward, one entry per block in network order:
    logits, the per-head logits (B, H, N, N); outputs, the head outputs (B, H, N, head_dim); maps, the
    attention maps after softmax (detached). Synthesis reads logits, distillation outputs (and maps).
    For window attention B counts windows: (batch * windows, H, N, N)."""

    def __init__(self, model, logits: bool = True, outputs: bool = False, maps: bool = False):
        self.logits, self.outputs, self.maps = [], [], []
        blocks = attention_modules(model)
        if not blocks:
            raise MimiqError("model has no captured attention (load it with mimiq_deploy.models.load_model)")
        self.handles = [m.logits_module().register_forward_hook(lambda _m, _i, out: self.logits.append(out))
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


def token_importance(maps: torch.Tensor, prefix: int, cls: bool | None = None) -> torch.Tensor:
    """(B, P) how much attention each patch token gets, from attention maps (B, H, N, N):
    the CLS query's attention averaged over heads; without a CLS token, the attention a
    token receives on average. MaskAQ ranks informative patches by it.
    cls: whether query 0 is a CLS token (default: there are prefix tokens)."""
    attn = maps[:, :, :, prefix:]
    cls = prefix > 0 if cls is None else cls
    return (attn[:, :, 0] if cls else attn[:, :, prefix:].mean(2)).mean(1)
