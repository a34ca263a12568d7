"""`mimiq-deploy teacher train`: the embedded default teacher, trained on Fashion-MNIST."""
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import dataclass_from, read_toml
from .data import FMNIST_CLASSES, load_fmnist, normalize_uint8
from .errors import MimiqError, atomic_torch_save, load_torch_file
from .models import EMBEDDED, DEFAULT_MODEL, build_fmnist_vit

# Fashion-MNIST training-set statistics; they travel with the model as pretrained_cfg.
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


@dataclasses.dataclass
class TeacherRecipe:
    arch: dict = dataclasses.field(default_factory=lambda: dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
        num_heads=4, mlp_ratio=2.0, stem="conv"))
    seed: int = 0
    val_size: int = 5000        # carved from the training split for recipe search
    train_subset: int = 0       # 0 = all remaining training images (search runs use fewer)
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    shift: int = 2              # random translation, pixels
    hflip: bool = True


def load_recipe(path: str | Path | None) -> TeacherRecipe:
    return dataclass_from(TeacherRecipe, read_toml(path), str(path)) if path else TeacherRecipe()


def _augment(x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation (zero padded) and horizontal flip on a raw [0, 1] batch."""
    n, _, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift,) * 4)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 in percent on normalized images."""
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return 100.0 * correct / len(images)


def train_teacher(recipe: TeacherRecipe, out: Path, data_dir: Path | None = None) -> dict:
    """Train, evaluate on the test split, write the checkpoint atomically; returns metrics.

    Resumable: the state after each epoch is kept in `<out>.resume`; a rerun continues it.
    """
    torch.manual_seed(recipe.seed)
    images, labels = load_fmnist("train", data_dir)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))
    val_idx, train_idx = perm[:recipe.val_size], perm[recipe.val_size:]
    if recipe.train_subset:
        train_idx = train_idx[:recipe.train_subset]
    x_train, y_train = images[train_idx].float() / 255.0, labels[train_idx]
    x_val = normalize_uint8(images[val_idx], FMNIST_MEAN, FMNIST_STD)
    y_val = labels[val_idx]
    mean = torch.tensor(FMNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FMNIST_STD).view(1, -1, 1, 1)

    model = build_fmnist_vit(recipe.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, int(recipe.warmup_epochs * steps_per_epoch)
    # Linear warm-up, then cosine decay to zero, stepped per batch.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                              else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    history, start_epoch, train_seconds = [], 0, 0.0
    resume_path = Path(str(out) + ".resume")
    if resume_path.exists():
        state = load_torch_file(resume_path, "teacher resume state", own=True)
        if state["recipe"] == dataclasses.asdict(recipe):
            model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"]); gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            history, start_epoch, train_seconds = state["history"], state["epoch"], state["seconds"]
            print(f"resuming teacher training at epoch {start_epoch + 1}/{recipe.epochs}")

    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.time()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch")
        for step in bar:
            idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            x = (_augment(x_train[idx], recipe.shift, recipe.hflip, gen) - mean) / std
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        train_seconds += time.time() - t0
        val = accuracy(model, x_val, y_val)
        history.append({"epoch": epoch + 1, "val_top1": val, "loss": loss.item()})
        tqdm.write(f"epoch {epoch + 1}: val top-1 {val:.2f}%  ({train_seconds / 60:.1f} min so far)")
        atomic_torch_save({"recipe": dataclasses.asdict(recipe), "model": model.state_dict(), "opt": opt.state_dict(),
                           "sched": sched.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                           "history": history, "epoch": epoch + 1, "seconds": train_seconds}, resume_path)

    x_test, y_test = load_fmnist("test", data_dir)
    test = accuracy(model, normalize_uint8(x_test, FMNIST_MEAN, FMNIST_STD), y_test)
    metrics = {"val_top1": history[-1]["val_top1"] if history else None, "test_top1": test,
               "train_minutes": train_seconds / 60, "params": sum(p.numel() for p in model.parameters()),
               "history": history}
    pretrained_cfg = {"input_size": (1, 28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD, "num_classes": 10,
                      "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                      "label_names": FMNIST_CLASSES, "architecture": DEFAULT_MODEL}
    atomic_torch_save({"arch": copy.deepcopy(recipe.arch), "pretrained_cfg": pretrained_cfg,
                       "model": model.state_dict(), "recipe": dataclasses.asdict(recipe), "metrics": metrics}, out)
    resume_path.unlink(missing_ok=True)
    return metrics


def default_teacher_path() -> Path:
    return EMBEDDED[DEFAULT_MODEL]


def check_out_path(out: Path) -> Path:
    if out.exists() and out.is_dir():
        raise MimiqError(f"--out {out} is a directory; pass a file path such as teacher.pt")
    return out
