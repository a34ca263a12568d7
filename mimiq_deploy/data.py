"""Evaluation and training data: Fashion-MNIST (IDX files) and ImageNet-style class folders."""
import gzip
from pathlib import Path

import numpy as np
import torch
from timm.data import ImageNetInfo, create_transform
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder

from .errors import MimiqError
from .run_dir import Preprocessing

FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MimiqError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MimiqError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise MimiqError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_fmnist_file(name: str, data_dir: Path | None) -> Path:
    """A local IDX file, gzipped or not. Nothing is downloaded: the README promises no network at run time."""
    d = Path(data_dir) if data_dir else FMNIST_DEBIAN_DIR
    for candidate in (d / name, d / name.removesuffix(".gz")):
        if candidate.exists():
            return candidate
    if data_dir:
        raise MimiqError(f"{name} not found in --data-dir {data_dir} (it needs the four Fashion-MNIST IDX files: "
                         f"{', '.join(f for pair in FMNIST_FILES.values() for f in pair)})")
    raise MimiqError(f"Fashion-MNIST not found in {FMNIST_DEBIAN_DIR}: install it with "
                     "`apt-get install dataset-fashion-mnist`, or pass --data-dir with the four IDX files "
                     "(train/t10k images and labels, .gz or not)")


def load_fmnist(split: str, data_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Fashion-MNIST: uint8 images (N, 1, 28, 28) and int64 labels (N,)."""
    img_name, lbl_name = FMNIST_FILES[split]
    images = _read_idx(_find_fmnist_file(img_name, data_dir))
    labels = _read_idx(_find_fmnist_file(lbl_name, data_dir))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MimiqError(f"Fashion-MNIST {split} files have inconsistent shapes {images.shape} / {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, normalized by the model's pretrained_cfg mean/std."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def fmnist_eval_dataset(data_cfg: dict | Preprocessing, data_dir: Path | None = None, split: str = "test") -> Dataset:
    """Fashion-MNIST normalized for a model whose input is (1, 28, 28) (data_cfg: a timm pretrained_cfg or
    data config)."""
    prep = Preprocessing.from_timm(data_cfg)
    if tuple(prep.input_size) != (1, 28, 28):
        raise MimiqError(
            f"Fashion-MNIST is 1x28x28 but the model expects {tuple(prep.input_size)}: "
            "pass --val-dir with an ImageNet-style folder for this model")
    images, labels = load_fmnist(split, data_dir)
    return TensorDataset(normalize_uint8(images, prep.mean, prep.std), labels)


def imagenet_folder_dataset(val_dir: Path, data_cfg: dict, num_classes: int) -> Dataset:
    """An ImageNet-style folder (one subfolder per synset, e.g. n01440764) in timm's class order."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise MimiqError(f"--val-dir {val_dir} is not a directory")
    synsets = ImageNetInfo().label_names()
    if num_classes != len(synsets):
        raise MimiqError(f"the model has {num_classes} classes, an ImageNet folder needs {len(synsets)}")
    index = {s: i for i, s in enumerate(synsets)}
    transform = create_transform(**data_cfg, is_training=False)
    ds = ImageFolder(str(val_dir), transform=transform)
    unknown = [c for c in ds.classes if c not in index]
    if unknown:
        raise MimiqError(f"--val-dir subfolders must be ImageNet synsets (e.g. n01440764); unknown: {unknown[:3]}")
    # ImageFolder numbers classes alphabetically; remap to timm's ImageNet order.
    ds.target_transform = lambda t: index[ds.classes[t]]
    return ds
