"""Model loading, one function for every verb: the embedded default, timm + checkpoint, or
timm weights already in the local cache. Never downloads."""
import os
from pathlib import Path

import timm
import torch
from torch import nn
from timm.models.vision_transformer import Attention as TimmAttention, VisionTransformer

from .attention import capture_attention
from .errors import MimiqError, load_torch_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "fmnist-vit"
EMBEDDED = {DEFAULT_MODEL: WEIGHTS_DIR / "fmnist_vit.pt"}


def build_fmnist_vit(arch: dict) -> VisionTransformer:
    """The embedded default's architecture: a timm VisionTransformer, optionally with a small
    convolutional patch stem (3x3 convs, two of stride 2, instead of one 4x4 patchify conv)."""
    arch = dict(arch)
    stem = arch.pop("stem", "patchify")
    model = VisionTransformer(**arch)
    dim, in_chans = arch["embed_dim"], arch.get("in_chans", 3)
    if stem == "conv":
        model.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1))
    elif stem == "conv3":  # a full-resolution conv first: local features before any downsampling
        model.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 4, 3, stride=1, padding=1), nn.GELU(),
            nn.Conv2d(dim // 4, dim // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1))
    elif stem != "patchify":
        raise MimiqError(f"unknown stem {stem!r} (use 'patchify', 'conv' or 'conv3')")
    return model


def _read_checkpoint(path: Path, trust: bool = False, what: str = "checkpoint") -> dict:
    """A checkpoint's dict, loaded without running code: .safetensors, or a torch file (see load_torch_file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MimiqError(f"{what} not found: {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise MimiqError(f"cannot read {what} {path} (corrupt or not safetensors): {e}") from None
    ckpt = load_torch_file(path, what, trust=trust)
    if not isinstance(ckpt, dict):
        raise MimiqError(f"{what} {path} holds a {type(ckpt).__name__}, expected a state dict")
    return ckpt


def _state_dict_of(ckpt: dict) -> dict:
    """A plain state dict, or the `model` / `state_dict` entry of a training checkpoint."""
    for key in ("model", "state_dict", "model_state"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {k.removeprefix("module."): v for k, v in ckpt.items()}
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MimiqError("checkpoint holds no state dict (expected tensors, or a 'model' entry)")
    return sd


def _load_into(model: nn.Module, sd: dict, what: str, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        detail = (f"shape mismatch {mismatched[:3]}" if mismatched else f"missing {missing[:3]}" if missing
                  else f"unexpected {unexpected[:3]}")
        raise MimiqError(f"{what} does not match architecture {name!r} ({detail}): "
                         f"pass the --model name the checkpoint was trained as")
    model.load_state_dict(sd)


def is_teacher_checkpoint(ckpt: dict) -> bool:
    """Written by `mimiq-deploy teacher train`: it carries its architecture and preprocessing."""
    return isinstance(ckpt.get("arch"), dict) and isinstance(ckpt.get("pretrained_cfg"), dict) and "model" in ckpt


def _teacher_from_checkpoint(ckpt: dict, what: str, name: str) -> nn.Module:
    """The fmnist-vit family at whatever width, depth, heads or stem the training recipe chose."""
    try:
        model = build_fmnist_vit(ckpt["arch"])
    except TypeError as e:  # an arch key VisionTransformer does not know
        raise MimiqError(f"{what} has an architecture this version cannot build: {e}") from None
    _load_into(model, ckpt["model"], what, name)
    model.pretrained_cfg = dict(ckpt["pretrained_cfg"])
    return model


def _load_embedded(name: str) -> nn.Module:
    path = EMBEDDED[name]
    if not path.exists():
        raise MimiqError(f"embedded weights missing at {path}: run `mimiq-deploy teacher train`")
    return _teacher_from_checkpoint(_read_checkpoint(path), f"embedded weights {path}", name)


def _cached_weights(name: str) -> str | None:
    """The local file of timm's pretrained weights for `name` (Hugging Face or torch hub cache), or None."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo = cfg.hf_hub_id.split("@")[0]
        for fname in (cfg.hf_hub_filename or "model.safetensors", "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        return str(path) if path.exists() else None
    return None


def load_model(name: str, checkpoint: str | Path | None = None, capture: bool = True, trust: bool = False) -> nn.Module:
    """Load a teacher in eval mode, its attention captured (see attention.py).

    name: the embedded default ('fmnist-vit'), or a timm model name. With `checkpoint`, the
    weights come from that file (a plain state dict or a checkpoint with a 'model' entry);
    without it, from timm's pretrained weights in the local Hugging Face / torch hub cache.
    The model's preprocessing is `model.pretrained_cfg` (input_size, mean, std).
    With 'fmnist-vit', `checkpoint` may be any checkpoint `mimiq-deploy teacher train` wrote (it
    carries its architecture). A path as `name` loads that teacher checkpoint, or that fine-tuned
    `student.pt` as its fake-quant student.
    trust: unpickle the checkpoint fully (`--trust-checkpoint`); by default a checkpoint that
    needs more than tensors and plain values is refused, since unpickling it could run code.
    """
    if name.endswith(".pt") or os.sep in name:  # a path: a student, or a teacher from `teacher train`
        from .finetune import load_student
        if not Path(name).is_file():
            raise MimiqError(f"checkpoint not found: {name}")
        # both kinds hold only plain values: read without trust, whatever --trust-checkpoint says
        ckpt = _read_checkpoint(Path(name))
        if not is_teacher_checkpoint(ckpt):
            return load_student(Path(name), trust=trust)
        model = _teacher_from_checkpoint(ckpt, f"teacher checkpoint {name}", name)
    elif name in EMBEDDED:
        if checkpoint is None:
            model = _load_embedded(name)
        else:
            ckpt = _read_checkpoint(Path(checkpoint), trust)
            if not is_teacher_checkpoint(ckpt):
                raise MimiqError(f"{checkpoint} is not a `mimiq-deploy teacher train` checkpoint (no architecture in it): "
                                 f"{name} takes only those; for timm weights pass a timm model name with --checkpoint")
            model = _teacher_from_checkpoint(ckpt, f"teacher checkpoint {checkpoint}", name)
    else:
        if not timm.is_model(name):
            raise MimiqError(f"unknown model {name!r}: use {DEFAULT_MODEL}, or a timm model name "
                             "(e.g. deit_tiny_patch16_224) with --checkpoint PATH")
        if checkpoint is not None:
            sd = _state_dict_of(_read_checkpoint(Path(checkpoint), trust))
            head = sd.get("head.weight")
            kwargs = {"num_classes": head.shape[0]} if head is not None and head.ndim == 2 else {}
            model = timm.create_model(name, pretrained=False, **kwargs)
            _load_into(model, sd, f"checkpoint {checkpoint}", name)
        else:
            cached = _cached_weights(name)
            if cached is None:
                raise MimiqError(f"no local pretrained weights for {name!r} (nothing is downloaded): "
                                 "pass --checkpoint PATH, or put the timm weights in the Hugging Face cache")
            # timm reads the named file (weights_only) instead of asking the hub: no network, no env change
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached})
    if not any(isinstance(m, TimmAttention) for m in model.modules()):
        raise MimiqError(f"{name!r} has no timm ViT Attention blocks: supported are ViT / DeiT models")
    if capture:
        capture_attention(model)
    return model.eval()


def data_config(model: nn.Module) -> dict:
    """input_size / mean / std / crop settings for `model`, the timm way."""
    from timm.data import resolve_data_config
    return resolve_data_config({}, model=model)
