"""Teachers: the model families mimiq-deploy knows, and loading their weights without running code.

The embedded default `fmnist-vit` is a timm model like any other: registered with
`@register_model` (timm name `fmnist_vit`) and a default_cfg naming the committed weights, so
loading it is one `timm.create_model("fmnist_vit", pretrained=True)`. Other families are timm's
own ViT / DeiT / Swin models, with weights from a checkpoint or timm's local cache. Never downloads.
The second embedded model, `fmnist-swin` (timm name `fmnist_swin`), is a timm SwinTransformer loaded the same way.
What the method needs of each architecture lives in families/ (one module per family).
"""
import os
import re
from pathlib import Path

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.data import resolve_data_config
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .families import family_of
from .data import FMNIST_CLASSES
from .errors import MimiqError
from .io import load_torch_file
from .run_dir import TeacherCheckpoint

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "fmnist-vit"
FMNIST_SWIN = "fmnist-swin"
EMBEDDED = {DEFAULT_MODEL: WEIGHTS_DIR / "fmnist_vit.pt", FMNIST_SWIN: WEIGHTS_DIR / "fmnist_swin.pt"}
TIMM_NAME = {DEFAULT_MODEL: "fmnist_vit", FMNIST_SWIN: "fmnist_swin"}  # timm entrypoint names cannot hold a '-'

# timm 1.0.31 made a Swin stage's merged grid round up (7x7 -> 4x4); fmnist-swin's weights have that shape
SWIN_TIMM = (1, 0, 31)


def _version(text: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


# Fashion-MNIST training-set statistics; they travel with the model as pretrained_cfg.
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
FMNIST_VIT_ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                       num_heads=4, mlp_ratio=2.0, stem="conv")
# 28x28 -> a 14x14 patch grid: stage 1 has 4 windows of 7x7 (every second block shifted), stage 2 one 7x7
# window, stage 3 one 4x4 window (timm shrinks a window to the grid and drops the shift there)
FMNIST_SWIN_ARCH = dict(family="swin", img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=48,
                        depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=7, mlp_ratio=2.0, drop_path_rate=0.05,
                        stem="conv")


def fmnist_pretrained_cfg(name: str = DEFAULT_MODEL) -> dict:
    """The preprocessing of every Fashion-MNIST teacher, as `teacher train` writes it into its checkpoint."""
    return {"input_size": (1, 28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD, "num_classes": 10,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "label_names": FMNIST_CLASSES, "architecture": name}


# timm's pretrained-cfg table of this module, read by @register_model
default_cfgs = {TIMM_NAME[n]: {**fmnist_pretrained_cfg(n), "file": str(EMBEDDED[n])} for n in EMBEDDED}


def build_fmnist_vit(arch: dict) -> VisionTransformer:
    """The embedded default's architecture: a timm VisionTransformer, optionally with a small
    convolutional patch stem (3x3 convs, two of stride 2, instead of one 4x4 patchify conv)."""
    arch = dict(arch)
    arch.pop("family", None)
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


def build_fmnist_swin(arch: dict) -> SwinTransformer:
    """A timm SwinTransformer; stem "conv": a full-resolution 3x3 conv before the patchify conv (local
    features before any downsampling, as fmnist-vit's stem; 28x28 images have few pixels per patch)."""
    if _version(timm.__version__) < SWIN_TIMM:  # older timm merges an odd grid one row short (7 -> 3, not 4)
        raise MimiqError(f"Fashion-MNIST Swin teachers need timm >= {'.'.join(map(str, SWIN_TIMM))}, "
                         f"this is timm {timm.__version__}: older timm sizes the last stage of a 28x28 model "
                         "differently (pip install -U timm)")
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k != "family"}
    stem = arch.pop("stem", "patchify")
    model = SwinTransformer(**arch)
    dim, in_chans, patch = model.embed_dim, arch.get("in_chans", 3), model.patch_embed.patch_size
    if stem == "conv":
        model.patch_embed.proj = nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, stride=1, padding=1), nn.GELU(),
                                               nn.Conv2d(dim // 2, dim, patch, stride=patch))
    elif stem != "patchify":
        raise MimiqError(f"unknown stem {stem!r} for a Swin teacher (use 'patchify' or 'conv')")
    return model


TEACHER_BUILDERS = {"vit": build_fmnist_vit, "swin": build_fmnist_swin}


def build_teacher(arch: dict) -> nn.Module:
    """The model a `teacher train` recipe's [arch] describes; its `family` key picks the builder (default vit)."""
    family = arch.get("family", "vit")
    if family not in TEACHER_BUILDERS:
        raise MimiqError(f"unknown teacher family {family!r} in [arch] (use {', '.join(TEACHER_BUILDERS)})")
    return TEACHER_BUILDERS[family](arch)


def read_checkpoint(path: Path, trust: bool = False, what: str = "checkpoint") -> dict:
    """A checkpoint's dict, loaded without running code: .safetensors, or a torch file (see load_torch_file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MimiqError(f"{what} not found: {path}")
        try:
            return load_safetensors(str(path), device="cpu")
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
    return TeacherCheckpoint.from_checkpoint(ckpt).is_teacher()


def embedded_name(arch: dict) -> str:
    """The embedded model whose family a teacher architecture belongs to (its --model name)."""
    return FMNIST_SWIN if arch.get("family") == "swin" else DEFAULT_MODEL


def teacher_from_checkpoint(ckpt: dict, what: str, name: str) -> nn.Module:
    """A Fashion-MNIST teacher at whatever family, width, depth, heads or stem the training recipe chose."""
    teacher = TeacherCheckpoint.from_checkpoint(ckpt)
    try:
        model = build_teacher(teacher.arch)
    except TypeError as e:  # an arch key the timm model does not know
        raise MimiqError(f"{what} has an architecture this version cannot build: {e}") from None
    _load_into(model, teacher.model, what, name)
    model.pretrained_cfg = dict(teacher.pretrained_cfg)
    return model


def _fmnist_entry(name: str, default_arch: dict, pretrained: bool, overlay, trust: bool, kwargs: dict) -> nn.Module:
    """timm entrypoint of an embedded default. pretrained: the weights of the cfg's `file` (the embedded
    ones, or any `teacher train` checkpoint given as pretrained_cfg_overlay={"file": ...}), with the
    architecture and preprocessing the file carries; else a fresh model of the default architecture."""
    if not pretrained:
        model = build_teacher({**default_arch, **kwargs})
        model.pretrained_cfg = fmnist_pretrained_cfg(name)
        return model
    overlay = dict(overlay or {})
    if "file" not in overlay:  # the embedded weights
        path = Path(default_cfgs[TIMM_NAME[name]]["file"])
        if not path.exists():
            raise MimiqError(f"embedded weights missing at {path}: run `mimiq-deploy teacher train`")
        return teacher_from_checkpoint(read_checkpoint(path), f"embedded weights {path}", name)
    path = overlay["file"]
    ckpt = read_checkpoint(Path(path), trust)
    if not is_teacher_checkpoint(ckpt):
        raise MimiqError(f"{path} is not a `mimiq-deploy teacher train` checkpoint (no architecture in it): "
                         f"{name} takes only those; for timm weights pass a timm model name with --checkpoint")
    return teacher_from_checkpoint(ckpt, f"teacher checkpoint {path}", name)


@register_model
def fmnist_vit(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, trust: bool = False,
               **kwargs) -> nn.Module:
    """timm entrypoint of the embedded default ViT (see _fmnist_entry)."""
    return _fmnist_entry(DEFAULT_MODEL, FMNIST_VIT_ARCH, pretrained, pretrained_cfg_overlay, trust, kwargs)


@register_model
def fmnist_swin(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, trust: bool = False,
                **kwargs) -> nn.Module:
    """timm entrypoint of the embedded Swin (see _fmnist_entry)."""
    return _fmnist_entry(FMNIST_SWIN, FMNIST_SWIN_ARCH, pretrained, pretrained_cfg_overlay, trust, kwargs)


def _cached_weights(name: str) -> str | None:
    """The local file of timm's pretrained weights for `name` (Hugging Face or torch hub cache), or None."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        for fname in (cfg.hf_hub_filename or "model.safetensors", "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        return str(path) if path.exists() else None
    return None


def _timm_teacher(name: str, checkpoint, trust: bool) -> nn.Module:
    """A timm model with weights from `checkpoint`, or timm's pretrained weights in the local cache."""
    if not timm.is_model(name):
        raise MimiqError(f"unknown model {name!r}: use {DEFAULT_MODEL}, or a timm model name "
                         "(e.g. deit_tiny_patch16_224) with --checkpoint PATH")
    if checkpoint is not None:
        sd = _state_dict_of(read_checkpoint(Path(checkpoint), trust))
        head = sd.get("head.weight")
        kwargs = {"num_classes": head.shape[0]} if head is not None and head.ndim == 2 else {}
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_into(model, sd, f"checkpoint {checkpoint}", name)
        return model
    cached = _cached_weights(name)
    if cached is None:
        raise MimiqError(f"no local pretrained weights for {name!r} (nothing is downloaded): "
                         "pass --checkpoint PATH, or put the timm weights in the Hugging Face cache")
    # timm reads the named file (weights_only) instead of asking the hub: no network, no env change
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached})


def is_path(name: str) -> bool:
    """A --model value that names a file (a teacher or student checkpoint), not a model."""
    return name.endswith(".pt") or os.sep in name


def load_teacher(name: str, checkpoint: str | Path | None = None, capture: bool = True, trust: bool = False,
                 ckpt: dict | None = None) -> nn.Module:
    """A teacher in eval mode, its attention captured: see models.load_model for the arguments.
    ckpt: the already read `teacher train` checkpoint when `name` is its path."""
    if is_path(name):
        if ckpt is None:
            if not Path(name).is_file():
                raise MimiqError(f"checkpoint not found: {name}")
            ckpt = read_checkpoint(Path(name))  # holds only plain values: read without trust
        if not is_teacher_checkpoint(ckpt):
            raise MimiqError(f"{name} is not a `mimiq-deploy teacher train` checkpoint")
        model = teacher_from_checkpoint(ckpt, f"teacher checkpoint {name}", name)
    elif name in TIMM_NAME:
        overlay = {"file": str(checkpoint)} if checkpoint is not None else None
        model = timm.create_model(TIMM_NAME[name], pretrained=True, pretrained_cfg_overlay=overlay, trust=trust)
    else:
        model = _timm_teacher(name, checkpoint, trust)
    family = family_of(model)  # a one-line error for a model of no known family
    if capture:
        family.capture(model)
    return model.eval()


def data_config(model: nn.Module) -> dict:
    """input_size / mean / std / crop settings for `model`, the timm way."""
    return resolve_data_config({}, model=model)
