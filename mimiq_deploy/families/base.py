"""What the MimiQ method needs to know of a model family (one module per family implements it)."""
import dataclasses

import torch
from torch import nn

from ..attention import attention_modules


@dataclasses.dataclass
class QueryLayout:
    """How one captured attention block's queries and keys lie.

    prefix: leading non-spatial tokens (CLS, distillation, register), excluded as query and key;
    cls: whether token 0 is a CLS token (MaskAQ's importance reads its attention);
    grid: (h, w) of the spatial tokens: the patch grid (ViT) or the window (Swin);
    windows: attention windows per image (the block's tensors hold batch * windows rows);
    keys: None, or a (windows, N, N) bool mask of the keys each query may attend to (Swin's shifted
    windows: keys of another image region are masked, they are no part of the head's map)."""
    prefix: int
    cls: bool
    grid: tuple[int, int]
    windows: int = 1
    keys: torch.Tensor | None = None


class Family:
    """A model family: subclasses say which attention blocks they own and how to capture them."""
    name = "?"
    mask_align = True    # MaskAQ's masked attention alignment applies (one token set shared by all layers)
    gaussian_ihc = True  # L_IHC with a Gaussian SSIM window (ihc_window > 1) applies

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` has this family's (float or captured) attention blocks."""
        raise NotImplementedError

    def capture(self, model: nn.Module) -> nn.Module:
        """Replace the attention blocks in place by CapturedAttention modules; returns model."""
        raise NotImplementedError

    def layouts(self, model: nn.Module) -> list[QueryLayout]:
        """One QueryLayout per captured attention block, in network order."""
        raise NotImplementedError

    def tokens(self, model: nn.Module):
        """(module, to_tokens, prefix): the last block whose output holds the final token features,
        to_tokens(output) -> (B, N, C), and its prefix token count (MaskAQ's patch-similarity entropy)."""
        raise NotImplementedError

    def quantized(self, model: nn.Module, types) -> list[str]:
        """Names of the modules the fake-quant student converts (`types`: the convertible module types).
        Both families quantize every Linear, Conv2d and attention MatMul: qkv, proj, QK^T, AV, MLP,
        patch embedding, Swin's patch-merging reduction and the head."""
        return [n for n, m in model.named_modules() if type(m) in types]


def replace_modules(model: nn.Module, cls, convert) -> nn.Module:
    """Every module of type `cls` in `model` replaced in place by convert(module)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert(module))
    return model


def has_captured(model: nn.Module, cls) -> bool:
    return any(isinstance(m, cls) for m in attention_modules(model))
