"""`mimiq-deploy finetune`: head-distilled QAT of the fake-quant student on synthetic images.

loss = KL(teacher || student) at temperature T (times T^2) + gamma * L_HAD, where L_HAD
compares each head's output softmax(QK^T)V of teacher and student (CLS dropped) with SSIM
without the luminance term, statistics over tokens per channel: 1 - mean SSIM.
SGD nesterov, step lr decay, SimCLR-style augmentation (the MimiQ paper).
MaskAQ's periodic refresh (option): every K epochs a share of the synthetic set is
synthesized anew against the current student, sharded and resumable like the first set.
"""
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.transforms import v2
from tqdm import tqdm

from .attention import AttentionRecorder, token_importance
from .config import dataclass_from, read_toml, with_defaults
from .distributed import barrier, device_for_rank, init_from_env, on_device
from .errors import MimiqError
from .families import family_of
from .io import load_torch_file, restore_resume_state, save_resume_state
from .quant import QuantConfig, calibrate, quant_modules
from .quant.student import build_student, ptq_student, save_student  # noqa: F401 (ptq_student: the API's, beside finetune)
from .run_dir import EpochStats, FinetuneProgress, FinetuneRecord, FinetuneSignature, RunDir
from .similarity import global_ssim
from .synthesize import SynthesisRecipe, load_synthetic, recipe_table, synthesize


@dataclasses.dataclass
class FinetuneRecipe:
    epochs: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    scale_lr: float = 0.0        # learning rate of the quantizers' step sizes (0: same as lr)
    momentum: float = 0.9
    milestones: list = dataclasses.field(default_factory=lambda: [50, 100])
    lr_decay: float = 0.1
    temperature: float = 5.0
    gamma: float = 10.0          # L_HAD weight
    had: bool = True             # False: KL only (ablation)
    had_token_weight: bool = False  # MaskAQ option: tokens weighted by the teacher's CLS attention in L_HAD
    learn_weight_scales: bool = True  # False: weight step sizes stay at their MSE calibration
    augment: bool = True         # SimCLR-style augmentation of synthetic batches
    calib_images: int = 512      # images for the step-size calibration pass
    refresh_every: int = 0       # MaskAQ option: renew synthetic images against the current student every K epochs (0: off)
    refresh_fraction: float = 1.0  # share of the set renewed per refresh (successive refreshes rotate through the set)
    seed: int = 0


def load_finetune_recipe(path: str | Path | None, overrides: dict) -> FinetuneRecipe:
    values = recipe_table(read_toml(path), "finetune") if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = dataclass_from(FinetuneRecipe, values, f"recipe {path or '(defaults)'} [finetune]")
    if recipe.epochs < 0 or recipe.batch_size <= 0:
        raise MimiqError(f"--epochs must be >= 0 and batch size > 0 (got {recipe.epochs}, {recipe.batch_size})")
    if recipe.refresh_every < 0 or not 0 < recipe.refresh_fraction <= 1:
        raise MimiqError(f"refresh_every must be >= 0 and refresh_fraction in (0, 1] "
                         f"(got {recipe.refresh_every}, {recipe.refresh_fraction})")
    return recipe


class SimCLRAugment:
    """Random resized crop, flip, colour jitter, grayscale and blur, per image, in pixel space."""

    def __init__(self, mean, std, size):
        channels = len(mean)
        jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1) if channels == 3 else v2.ColorJitter(0.4, 0.4)
        ops = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
               v2.RandomApply([jitter], p=0.8)]
        if channels == 3:
            ops.append(v2.RandomGrayscale(p=0.2))
        kernel = max(3, (size[0] // 10) | 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
        self.transform = v2.Compose(ops)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = (x * std + mean).clamp(0, 1)
        out = torch.stack([self.transform(img) for img in pixels])
        return (out - mean) / std


def had_loss(teacher_heads, student_heads, prefix, teacher_maps=None, cls=None) -> torch.Tensor:
    """1 - mean SSIM (no luminance term, stats over tokens per channel) over layers and heads.

    prefix: the leading non-spatial tokens to drop, one count for all layers or one per layer (the
    family's QueryLayout); window attention's rows are windows, its statistics over a window's tokens.
    teacher_maps (the teacher's attention maps, per layer): weigh each token by the attention the
    CLS token pays it (head-averaged; without a CLS token, the attention it receives on average),
    so the teacher's most attended tokens count most (MaskAQ's token weighting). cls: whether token 0
    is a CLS token (default: there are prefix tokens), one for all layers or one per layer."""
    n = len(teacher_heads)
    prefixes = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * n
    clss = list(cls) if isinstance(cls, (list, tuple)) else [cls] * n
    sims = []
    for i, (t, s) in enumerate(zip(teacher_heads, student_heads)):
        weights, p = None, prefixes[i]
        if teacher_maps is not None:
            w = token_importance(teacher_maps[i], p, clss[i])          # (B, P)
            weights = (w / w.sum(1, keepdim=True)).view(w.shape[0], 1, -1, 1)
        sims.append(global_ssim(t[:, :, p:].detach(), s[:, :, p:], dim=2, luminance=False,
                                weights=weights).mean())
    return 1 - torch.stack(sims).mean()


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def refresh_dir(run_dir: Path | RunDir, epoch: int) -> Path:
    return RunDir.of(run_dir).refresh(epoch).root


def refresh_points(recipe: FinetuneRecipe) -> list[int]:
    """Epoch counts after which the set is refreshed (never after the last epoch)."""
    k = recipe.refresh_every
    return list(range(k, recipe.epochs, k)) if k else []


def refreshed_images(images: torch.Tensor, run_dir: Path | RunDir, points: list[int]) -> torch.Tensor:
    """The training set after the refreshes at `points`: the i-th refresh's images replace the
    next slice of the set (wrapping around), so successive refreshes rotate through it."""
    rd = RunDir.of(run_dir)
    images = images.clone()
    for i, epoch in enumerate(points):
        new = load_synthetic(rd.refresh(epoch))[0]
        images[(i * len(new) + torch.arange(len(new))) % len(images)] = new
    return images


def refresh(teacher, student, model_name: str, rd: RunDir, epoch: int, count: int, synth_recipe, cfg: QuantConfig,
            progress: bool) -> None:
    """Synthesize `count` new images against the student after `epoch` epochs (resumable)."""
    recipe = dataclasses.replace(synth_recipe, num_images=count, seed=synth_recipe.seed + 10_000 * epoch)
    synthesize(teacher, model_name, rd.refresh(epoch), recipe, progress,
               student=student, student_tag=f"{cfg.name} student after epoch {epoch}")


def _frozen(teacher, device):
    teacher = on_device(teacher, device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _optimizer(student, recipe: FinetuneRecipe):
    """SGD nesterov with step decay; the weight step sizes frozen or on their own learning rate as the recipe says."""
    if not recipe.learn_weight_scales:
        for name, p in student.named_parameters():
            if name.endswith("weight_quant.scale"):
                p.requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": trained}]
    if recipe.scale_lr:  # LSQ practice: step sizes on their own learning rate
        is_scale = {id(p) for n, p in student.named_parameters() if n.endswith("_quant.scale")}
        groups = [{"params": [p for p in trained if id(p) not in is_scale]},
                  {"params": [p for p in trained if id(p) in is_scale], "lr": recipe.scale_lr}]
    opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, recipe.milestones, recipe.lr_decay)


def _signature(cfg: QuantConfig, recipe: FinetuneRecipe, model_name: str) -> FinetuneSignature:
    """What a resume state must have been made with to be continued."""
    return FinetuneSignature(**cfg.to_json(), recipe=dataclasses.asdict(recipe), model=model_name)


def _same_signature(stored: FinetuneSignature, signature: FinetuneSignature) -> bool:
    """The same model, recipe and effective setting: states from before the 8-bit image input or the unsigned
    probability grid (no input_bits / unsigned_probs) are not resumed into them."""
    return (stored.model == signature.model and stored.bits == signature.bits
            and with_defaults(FinetuneRecipe, stored.recipe) == signature.recipe
            and stored.quant.effective == signature.quant.effective)


def _resume(state_path: Path, signature: FinetuneSignature, objects: dict) -> FinetuneProgress:
    """The progress so far (none without a resume state), restoring `objects` from the resume state."""
    if not state_path.exists():
        return FinetuneProgress(signature)
    state = load_torch_file(state_path, "fine-tuning resume state", own=True)
    progress = FinetuneProgress.from_json(state)
    if not _same_signature(progress.signature, signature):
        raise MimiqError(f"{state_path} is a fine-tuning of another setting ({progress.signature.bits}, "
                         "other recipe): remove it or use another run directory")
    restore_resume_state(state, objects)
    return progress


def _train_epoch(model, teacher, loader, opt, quantizers, t_rec, s_rec, recipe: FinetuneRecipe, augment, layouts: list,
                 device, bar) -> EpochStats:
    """One pass over the loader: KL (+ gamma * L_HAD) steps; returns the summed losses."""
    sums = EpochStats()
    for (x,) in bar:
        x = x.to(device)
        if augment:
            x = augment(x)
        t_rec.clear(), s_rec.clear()
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = model(x)
        kl = kd_loss(s_logits, t_logits, recipe.temperature)
        loss = kl
        if recipe.had:
            had = had_loss(t_rec.outputs, s_rec.outputs, [l.prefix for l in layouts],
                           t_rec.maps if recipe.had_token_weight else None, [l.cls for l in layouts])
            loss = loss + recipe.gamma * had
            sums.had += had.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for q in quantizers:
            q.project_scale()
        sums.loss += loss.item()
        sums.kl += kl.item()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.4f}", refresh=False)
    return sums


def _loader(images, recipe: FinetuneRecipe, epoch: int, gen, rank: int, world: int) -> DataLoader:
    data = TensorDataset(images)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=recipe.seed) if world > 1 else None
    if sampler:
        sampler.set_epoch(epoch)
    gen.manual_seed(recipe.seed * 1000 + epoch)  # the epoch's order does not depend on a resume
    return DataLoader(data, recipe.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen, drop_last=True)


def finetune(teacher, model_name: str, checkpoint: str | None, run_dir: Path | RunDir, cfg: QuantConfig,
             recipe: FinetuneRecipe, progress: bool = True, synth_recipe=None) -> FinetuneRecord:
    """Calibrate and fine-tune the student on run_dir/synth; writes run_dir/student.pt and finetune.json.

    Resumable: run_dir/finetune_state.pt holds the state after each epoch.
    synth_recipe: how refreshes synthesize (recipe.refresh_every > 0); default: as the set was made.
    """
    rd = RunDir.of(run_dir)
    images, _, manifest = load_synthetic(rd)
    if recipe.refresh_every and synth_recipe is None:
        synth_recipe = SynthesisRecipe(**with_defaults(SynthesisRecipe, manifest.recipe))
    if manifest.model != model_name:
        raise MimiqError(f"{rd.root} holds images of {manifest.model!r}, not {model_name!r}")
    rank, world = init_from_env()
    device = device_for_rank(rank)
    torch.manual_seed(recipe.seed)
    teacher = _frozen(teacher, device)
    student = build_student(teacher, cfg)
    calibrate(student, images[:recipe.calib_images].to(device))

    opt, sched = _optimizer(student, recipe)
    quantizers = list(quant_modules(student).values())
    objects = {"student": student, "opt": opt, "sched": sched}
    signature = _signature(cfg, recipe, model_name)
    done = _resume(rd.finetune_state, signature, objects)
    start_epoch, history, seconds = done.epoch, done.history, done.seconds
    if rank == 0 and 0 < start_epoch < recipe.epochs:
        print(f"resuming fine-tuning at epoch {start_epoch + 1}/{recipe.epochs}")

    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    points = refresh_points(recipe)
    refresh_count = max(1, round(recipe.refresh_fraction * len(images)))
    initial_images = images
    images = refreshed_images(initial_images, rd, [p for p in points if p < start_epoch])
    gen = torch.Generator().manual_seed(recipe.seed)
    augment = SimCLRAugment(manifest.mean, manifest.std, tuple(manifest.input_size[1:])) if recipe.augment else None
    t_rec = s_rec = None
    try:
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.time()
            refresh_s = 0.0
            if epoch in points:
                if rank == 0:
                    tqdm.write(f"refreshing {refresh_count} synthetic images against the student after epoch {epoch}")
                refresh(teacher, student, model_name, rd, epoch, refresh_count, synth_recipe, cfg, progress)
                images = refreshed_images(initial_images, rd, [p for p in points if p <= epoch])
                refresh_s = time.time() - t0
            # recorders live only while training: synthesis forwards must not feed them
            t_rec = AttentionRecorder(teacher, logits=False, outputs=True, maps=recipe.had_token_weight)
            s_rec = AttentionRecorder(student, logits=False, outputs=True)
            loader = _loader(images, recipe, epoch, gen, rank, world)
            model.train()
            bar = tqdm(loader, desc=f"finetune {cfg.name} epoch {epoch + 1}/{recipe.epochs}", unit="batch",
                       disable=not progress or rank != 0)
            sums = _train_epoch(model, teacher, loader, opt, quantizers, t_rec, s_rec, recipe, augment,
                                family_of(teacher).layouts(teacher), device, bar)
            t_rec.remove(), s_rec.remove()
            sched.step()
            seconds += time.time() - t0
            n = max(1, len(loader))
            stats = EpochStats(epoch + 1, sums.loss / n, sums.kl / n, sums.had / n, sched.get_last_lr()[0],
                               refresh_s or None)
            history.append(stats)
            if rank == 0:
                tqdm.write(f"epoch {epoch + 1}/{recipe.epochs}: loss {stats.loss:.4f} kl {stats.kl:.4f} "
                           f"had {stats.had:.4f} ({seconds / 60:.1f} min)")
                save_resume_state(rd.finetune_state, objects,
                                  **FinetuneProgress(signature, epoch + 1, history, seconds).to_json())
            barrier()
    finally:
        if t_rec:
            t_rec.remove(), s_rec.remove()
    record = FinetuneRecord(**cfg.to_json(), recipe=dataclasses.asdict(recipe), history=history,
                            train_minutes=seconds / 60, refresh_minutes=sum(h.refresh_s or 0.0 for h in history) / 60,
                            synthetic={"kind": manifest.kind, "num_images": len(images)})
    if rank == 0:
        save_student(rd.student, student.cpu(), model_name, checkpoint, cfg, record.to_json())
        rd.write_finetune(record)
    barrier()
    return record
