"""`mimiq-deploy eval`: top-1 of a model on Fashion-MNIST or an ImageNet-style folder."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import fmnist_eval_dataset, imagenet_folder_dataset
from .models import data_config


def eval_dataset(model, val_dir: Path | None = None, data_dir: Path | None = None):
    """(dataset, name): an ImageNet-style folder when given, else the Fashion-MNIST test split."""
    cfg = data_config(model)
    if val_dir:
        return imagenet_folder_dataset(val_dir, cfg, model.num_classes), f"imagefolder:{val_dir}"
    return fmnist_eval_dataset(cfg, data_dir), "fashion-mnist-test"


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 256, progress: bool = True) -> dict:
    """Top-1 (percent) and count over `dataset` of (image, label) pairs."""
    model.eval()
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return {"n": total, "top1": 100.0 * correct / max(1, total)}
