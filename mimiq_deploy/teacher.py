"""`mimiq-deploy teacher train`: the embedded teachers (fmnist-vit, fmnist-swin), trained on Fashion-MNIST."""
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import dataclass_from, read_toml
from .data import load_fmnist, normalize_uint8
from .errors import MimiqError
from .evaluate import accuracy
from .io import atomic_torch_save, load_torch_file, restore_resume_state, save_resume_state
from .run_dir import TeacherCheckpoint, TeacherEpoch, TeacherMetrics, TeacherProgress
from .zoo import EMBEDDED, FMNIST_MEAN, FMNIST_STD, FMNIST_VIT_ARCH, build_teacher, embedded_name, fmnist_pretrained_cfg


@dataclasses.dataclass
class TeacherRecipe:
    arch: dict = dataclasses.field(default_factory=lambda: dict(FMNIST_VIT_ARCH))
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


def _split(recipe: TeacherRecipe, data_dir: Path | None):
    """Raw [0, 1] training images and labels, and the normalized validation images carved from the training split."""
    images, labels = load_fmnist("train", data_dir)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))
    val_idx, train_idx = perm[:recipe.val_size], perm[recipe.val_size:]
    if recipe.train_subset:
        train_idx = train_idx[:recipe.train_subset]
    x_val = normalize_uint8(images[val_idx], FMNIST_MEAN, FMNIST_STD)
    return images[train_idx].float() / 255.0, labels[train_idx], x_val, labels[val_idx]


def _optimizer(model, recipe: TeacherRecipe, steps_per_epoch: int):
    """AdamW with a linear warm-up, then cosine decay to zero, stepped per batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total, warmup = recipe.epochs * steps_per_epoch, int(recipe.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                              else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    return opt, sched


def _train_epoch(model, opt, sched, x_train, y_train, recipe: TeacherRecipe, gen, epoch: int) -> float:
    """One epoch of augmented, normalized batches; returns the last batch's loss."""
    mean = torch.tensor(FMNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FMNIST_STD).view(1, -1, 1, 1)
    model.train()
    order = torch.randperm(len(x_train), generator=gen)
    steps = math.ceil(len(x_train) / recipe.batch_size)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch")
    for step in bar:
        idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        x = (_augment(x_train[idx], recipe.shift, recipe.hflip, gen) - mean) / std
        loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    return loss.item()


def train_teacher(recipe: TeacherRecipe, out: Path, data_dir: Path | None = None) -> TeacherMetrics:
    """Train, evaluate on the test split, write the checkpoint atomically; returns metrics.

    Resumable: the state after each epoch is kept in `<out>.resume`; a rerun continues it.
    """
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_val, y_val = _split(recipe, data_dir)
    model = build_teacher(recipe.arch)
    opt, sched = _optimizer(model, recipe, math.ceil(len(x_train) / recipe.batch_size))
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    history, start_epoch, train_seconds = [], 0, 0.0
    resume_path = Path(str(out) + ".resume")
    objects = {"model": model, "opt": opt, "sched": sched}
    if resume_path.exists():
        state = load_torch_file(resume_path, "teacher resume state", own=True)
        done = TeacherProgress.from_json(state)
        if done.recipe == dataclasses.asdict(recipe):  # another recipe starts afresh
            restore_resume_state(state, objects)
            gen.set_state(done.gen)
            history, start_epoch, train_seconds = done.history, done.epoch, done.seconds
            print(f"resuming teacher training at epoch {start_epoch + 1}/{recipe.epochs}")

    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.time()
        loss = _train_epoch(model, opt, sched, x_train, y_train, recipe, gen, epoch)
        train_seconds += time.time() - t0
        val = accuracy(model, x_val, y_val)
        history.append(TeacherEpoch(epoch + 1, val, loss))
        tqdm.write(f"epoch {epoch + 1}: val top-1 {val:.2f}%  ({train_seconds / 60:.1f} min so far)")
        save_resume_state(resume_path, objects, **TeacherProgress(dataclasses.asdict(recipe), gen.get_state(), history,
                                                                  epoch + 1, train_seconds).to_json())

    x_test, y_test = load_fmnist("test", data_dir)
    test = accuracy(model, normalize_uint8(x_test, FMNIST_MEAN, FMNIST_STD), y_test)
    metrics = TeacherMetrics(val_top1=history[-1].val_top1 if history else None, test_top1=test,
                             train_minutes=train_seconds / 60, params=sum(p.numel() for p in model.parameters()),
                             history=history)
    ckpt = TeacherCheckpoint(arch=copy.deepcopy(recipe.arch), pretrained_cfg=fmnist_pretrained_cfg(embedded_name(recipe.arch)),
                             model=model.state_dict(), recipe=dataclasses.asdict(recipe), metrics=metrics.to_json())
    atomic_torch_save(ckpt.to_checkpoint(), out)
    resume_path.unlink(missing_ok=True)
    return metrics


def default_teacher_path(arch: dict | None = None) -> Path:
    """The embedded weights file of the recipe's family (fmnist-vit's without one)."""
    return EMBEDDED[embedded_name(arch or {})]


def check_out_path(out: Path) -> Path:
    if out.exists() and out.is_dir():
        raise MimiqError(f"--out {out} is a directory; pass a file path such as teacher.pt")
    return out
