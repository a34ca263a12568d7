"""`mimiq-deploy eval`: top-1 of a model on Fashion-MNIST or an ImageNet-style folder.

top1_correct is the one top-1 count of the package (eval, teacher training, synthesis, verify)."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import fmnist_eval_dataset, imagenet_folder_dataset
from .run_dir import Accuracy
from .zoo import data_config


def top1_correct(logits, labels) -> int:
    """How many rows of `logits` have their largest value at `labels` (torch tensors or numpy arrays)."""
    if isinstance(logits, np.ndarray):
        return int((logits.argmax(1) == np.asarray(labels)).sum())
    return int((logits.argmax(-1) == labels).sum().item())


def eval_dataset(model, val_dir: Path | None = None, data_dir: Path | None = None):
    """(dataset, name): an ImageNet-style folder when given, else the Fashion-MNIST test split."""
    cfg = data_config(model)
    if val_dir:
        return imagenet_folder_dataset(val_dir, cfg, model.num_classes), f"imagefolder:{val_dir}"
    return fmnist_eval_dataset(cfg, data_dir), "fashion-mnist-test"


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 in percent on a tensor of normalized images."""
    model.eval()
    correct = sum(top1_correct(model(images[i:i + batch_size]), labels[i:i + batch_size])
                  for i in range(0, len(images), batch_size))
    return 100.0 * correct / len(images)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 256, progress: bool = True) -> Accuracy:
    """Top-1 (percent) and count over `dataset` of (image, label) pairs (dataset: the caller names it)."""
    model.eval()
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        correct += top1_correct(model(x), y)
        total += len(y)
    return Accuracy(n=total, top1=100.0 * correct / max(1, total))
