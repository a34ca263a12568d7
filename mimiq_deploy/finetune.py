"""`mimiq-deploy finetune`: head-distilled QAT of the fake-quant student on synthetic images.

loss = KL(teacher || student) at temperature T (times T^2) + gamma * L_HAD, where L_HAD
compares each head's output softmax(QK^T)V of teacher and student (CLS dropped) with SSIM
without the luminance term, statistics over tokens per channel: 1 - mean SSIM.
SGD nesterov, step lr decay, SimCLR-style augmentation (DESIGN.md §3).
MaskAQ's periodic refresh (option): every K epochs a share of the synthetic set is
synthesized anew against the current student, sharded and resumable like the first set.
"""
import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from .attention import attention_modules, token_importance
from .config import dataclass_from, read_toml, with_defaults
from .distributed import barrier, device_for_rank, init_from_env
from .errors import MimiqError, atomic_torch_save, atomic_write_json, load_torch_file
from .quant import QuantConfig, calibrate, quant_modules, quantize_model
from .similarity import global_ssim

STUDENT_FILE = "student.pt"
STATE_FILE = "finetune_state.pt"


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
    values = {}
    if path:
        table = read_toml(path).get("finetune", {})
        values = dict(table) if isinstance(table, dict) else {}
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
        from torchvision.transforms import v2
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


class HeadOutputRecorder:
    """Each captured attention block's head outputs softmax(QK^T)V of the last forward (and, with maps, its attention maps)."""

    def __init__(self, model, maps: bool = False):
        self.outputs, self.maps = [], []

        def keep(_m, inputs, out):
            self.outputs.append(out)
            if maps:
                self.maps.append(inputs[0].detach())
        self.handles = [m.av.register_forward_hook(keep) for m in attention_modules(model)]

    def clear(self):
        self.outputs, self.maps = [], []

    def remove(self):
        for h in self.handles:
            h.remove()


def had_loss(teacher_heads, student_heads, prefix: int, teacher_maps=None) -> torch.Tensor:
    """1 - mean SSIM (no luminance term, stats over tokens per channel) over layers and heads.

    teacher_maps (the teacher's attention maps, per layer): weigh each token by the attention the
    CLS token pays it (head-averaged; without a CLS token, the attention it receives on average),
    so the teacher's most attended tokens count most (MaskAQ's token weighting)."""
    sims = []
    for i, (t, s) in enumerate(zip(teacher_heads, student_heads)):
        weights = None
        if teacher_maps is not None:
            w = token_importance(teacher_maps[i], prefix)                # (B, P)
            weights = (w / w.sum(1, keepdim=True)).view(w.shape[0], 1, -1, 1)
        sims.append(global_ssim(t[:, :, prefix:].detach(), s[:, :, prefix:], dim=2, luminance=False,
                                weights=weights).mean())
    return 1 - torch.stack(sims).mean()


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def build_student(teacher, cfg: QuantConfig):
    """A deep copy of the teacher with fake quantizers (weights' step sizes initialized), all of it trainable.

    The copy must not inherit the frozen teacher's requires_grad=False: that trained only the step sizes."""
    student = quantize_model(copy.deepcopy(teacher), cfg)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def ptq_student(teacher, cfg: QuantConfig, images: torch.Tensor):
    """The student calibrated on `images`, not fine-tuned (what MaskAQ's first synthesis aligns with)."""
    student = build_student(teacher, cfg)
    calibrate(student, images.to(next(teacher.parameters()).device))
    return student


def refresh_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / f"refresh-{epoch:04d}"


def refresh_points(recipe: FinetuneRecipe) -> list[int]:
    """Epoch counts after which the set is refreshed (never after the last epoch)."""
    k = recipe.refresh_every
    return list(range(k, recipe.epochs, k)) if k else []


def refreshed_images(images: torch.Tensor, run_dir: Path, points: list[int]) -> torch.Tensor:
    """The training set after the refreshes at `points`: the i-th refresh's images replace the
    next slice of the set (wrapping around), so successive refreshes rotate through it."""
    from .synthesize import load_synthetic

    images = images.clone()
    for i, epoch in enumerate(points):
        new = load_synthetic(refresh_dir(run_dir, epoch))[0]
        images[(i * len(new) + torch.arange(len(new))) % len(images)] = new
    return images


def refresh(teacher, student, model_name: str, run_dir: Path, epoch: int, count: int, synth_recipe, cfg: QuantConfig,
            progress: bool) -> None:
    """Synthesize `count` new images against the student after `epoch` epochs (resumable)."""
    from .synthesize import synthesize

    recipe = dataclasses.replace(synth_recipe, num_images=count, seed=synth_recipe.seed + 10_000 * epoch)
    synthesize(teacher, model_name, refresh_dir(run_dir, epoch), recipe, progress,
               student=student, student_tag=f"{cfg.name} student after epoch {epoch}")


def save_student(path: Path, student, model_name: str, checkpoint: str | None, cfg: QuantConfig, meta: dict) -> None:
    atomic_torch_save({"format": "mimiq-student-v1", "model_name": model_name,
                       "teacher_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
                       "bits": cfg.name, "input_bits": cfg.input_bits, "state_dict": student.state_dict(),
                       "pretrained_cfg": dict(getattr(student, "pretrained_cfg", {}) or {}), "meta": meta}, path)


def finetune(teacher, model_name: str, checkpoint: str | None, run_dir: Path, cfg: QuantConfig,
             recipe: FinetuneRecipe, progress: bool = True, synth_recipe=None) -> dict:
    """Calibrate and fine-tune the student on run_dir/synth; writes run_dir/student.pt.

    Resumable: run_dir/finetune_state.pt holds the state after each epoch.
    synth_recipe: how refreshes synthesize (recipe.refresh_every > 0); default: as the set was made.
    """
    from .synthesize import SynthesisRecipe, load_synthetic

    run_dir = Path(run_dir)
    images, _, manifest = load_synthetic(run_dir)
    if recipe.refresh_every and synth_recipe is None:
        synth_recipe = SynthesisRecipe(**with_defaults(SynthesisRecipe, manifest["recipe"]))
    if manifest.get("model") != model_name:
        raise MimiqError(f"{run_dir} holds images of {manifest.get('model')!r}, not {model_name!r}")
    rank, world = init_from_env()
    device = device_for_rank(rank)
    torch.manual_seed(recipe.seed)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_student(teacher, cfg)
    calibrate(student, images[:recipe.calib_images].to(device))

    state_path = run_dir / STATE_FILE
    signature = {"bits": cfg.name, "recipe": dataclasses.asdict(recipe), "model": model_name}
    if cfg.act_bits < cfg.input_bits:  # states from before the 8-bit image input are not resumed into it
        signature["input_bits"] = cfg.input_bits
    if not recipe.learn_weight_scales:
        for name, p in student.named_parameters():
            if name.endswith("weight_quant.scale"):
                p.requires_grad_(False)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    if recipe.scale_lr:  # LSQ practice: step sizes on their own learning rate
        is_scale = {id(p) for n, p in student.named_parameters() if n.endswith("_quant.scale")}
        groups = [{"params": [p for p in groups[0]["params"] if id(p) not in is_scale]},
                  {"params": [p for p in groups[0]["params"] if id(p) in is_scale], "lr": recipe.scale_lr}]
    opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    quantizers = list(quant_modules(student).values())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, recipe.milestones, recipe.lr_decay)
    start_epoch, history, seconds = 0, [], 0.0
    if state_path.exists():
        state = load_torch_file(state_path, "fine-tuning resume state", own=True)
        stored = {**state["signature"], "recipe": with_defaults(FinetuneRecipe, state["signature"]["recipe"])}
        if stored != signature:
            raise MimiqError(f"{state_path} is a fine-tuning of another setting ({state['signature']['bits']}, "
                             "other recipe): remove it or use another run directory")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history, seconds = state["epoch"], state["history"], state["seconds"]
        if rank == 0 and start_epoch < recipe.epochs:
            print(f"resuming fine-tuning at epoch {start_epoch + 1}/{recipe.epochs}")

    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    points = refresh_points(recipe)
    refresh_count = max(1, round(recipe.refresh_fraction * len(images)))
    initial_images = images
    images = refreshed_images(initial_images, run_dir, [p for p in points if p < start_epoch])
    gen = torch.Generator().manual_seed(recipe.seed)
    augment = SimCLRAugment(manifest["mean"], manifest["std"], tuple(manifest["input_size"][1:])) if recipe.augment else None
    prefix = teacher.num_prefix_tokens
    t_rec = s_rec = None
    try:
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.time()
            refresh_s = 0.0
            if epoch in points:
                if rank == 0:
                    tqdm.write(f"refreshing {refresh_count} synthetic images against the student after epoch {epoch}")
                refresh(teacher, student, model_name, run_dir, epoch, refresh_count, synth_recipe, cfg, progress)
                images = refreshed_images(initial_images, run_dir, [p for p in points if p <= epoch])
                refresh_s = time.time() - t0
            # recorders live only while training: synthesis forwards must not feed them
            t_rec, s_rec = HeadOutputRecorder(teacher, maps=recipe.had_token_weight), HeadOutputRecorder(student)
            data = TensorDataset(images)
            sampler = DistributedSampler(data, world, rank, shuffle=True, seed=recipe.seed) if world > 1 else None
            if sampler:
                sampler.set_epoch(epoch)
            gen.manual_seed(recipe.seed * 1000 + epoch)  # the epoch's order does not depend on a resume
            loader = DataLoader(data, recipe.batch_size, shuffle=sampler is None, sampler=sampler,
                                generator=gen, drop_last=True)
            model.train()
            sums = {"loss": 0.0, "kl": 0.0, "had": 0.0}
            bar = tqdm(loader, desc=f"finetune {cfg.name} epoch {epoch + 1}/{recipe.epochs}", unit="batch",
                       disable=not progress or rank != 0)
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
                    had = had_loss(t_rec.outputs, s_rec.outputs, prefix,
                                   t_rec.maps if recipe.had_token_weight else None)
                    loss = loss + recipe.gamma * had
                    sums["had"] += had.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for q in quantizers:
                    q.project_scale()
                sums["loss"] += loss.item()
                sums["kl"] += kl.item()
                bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.4f}", refresh=False)
            t_rec.remove(), s_rec.remove()
            sched.step()
            seconds += time.time() - t0
            n = max(1, len(loader))
            history.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "lr": opt.param_groups[0]["lr"],
                            **({"refresh_s": refresh_s} if refresh_s else {})})
            if rank == 0:
                tqdm.write(f"epoch {epoch + 1}/{recipe.epochs}: loss {history[-1]['loss']:.4f} "
                           f"kl {history[-1]['kl']:.4f} had {history[-1]['had']:.4f} ({seconds / 60:.1f} min)")
                atomic_torch_save({"signature": signature, "student": student.state_dict(), "opt": opt.state_dict(),
                                   "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                   "epoch": epoch + 1, "history": history, "seconds": seconds}, state_path)
            barrier()
    finally:
        if t_rec:
            t_rec.remove(), s_rec.remove()
    meta = {"recipe": dataclasses.asdict(recipe), "history": history, "train_minutes": seconds / 60,
            "refresh_minutes": sum(h.get("refresh_s", 0.0) for h in history) / 60,
            "synthetic": {"kind": manifest.get("kind"), "num_images": len(images)}}
    if rank == 0:
        save_student(run_dir / STUDENT_FILE, student.cpu(), model_name, checkpoint, cfg, meta)
        atomic_write_json(run_dir / "finetune.json", {"bits": cfg.name, **meta})
    barrier()
    return meta


def load_student(path: Path, trust: bool = False):
    """The fake-quant student of a `student.pt`, in eval mode.

    student.pt is always loaded without running code (mimiq-deploy writes only plain values);
    trust applies to the teacher checkpoint it names (`--trust-checkpoint`)."""
    from .models import load_model
    from .quant import parse_bits

    ckpt = load_torch_file(Path(path), "student checkpoint", own=True)
    if not isinstance(ckpt, dict):
        raise MimiqError(f"{path} is not a mimiq-deploy student checkpoint (write one with `mimiq-deploy finetune`)")
    if ckpt.get("format") != "mimiq-student-v1":
        raise MimiqError(f"{path} is not a mimiq-deploy student checkpoint (write one with `mimiq-deploy finetune`)")
    teacher = load_model(ckpt["model_name"], ckpt["teacher_checkpoint"], trust=trust)
    cfg = parse_bits(ckpt["bits"])
    # students written before input_bits existed quantized the image at the activation width
    cfg = dataclasses.replace(cfg, input_bits=ckpt.get("input_bits", cfg.act_bits))
    student = build_student(teacher, cfg)
    state = dict(ckpt["state_dict"])
    for name, value in student.state_dict().items():
        if name.endswith("scale_floor"):  # only used in training; absent from older checkpoints
            state.setdefault(name, value)
    try:
        student.load_state_dict(state)
    except RuntimeError:
        raise MimiqError(f"{path} does not match the {ckpt['model_name']} teacher it names "
                         "(was the teacher checkpoint replaced?)") from None
    student.model_name = ckpt["model_name"]
    return student.eval()
