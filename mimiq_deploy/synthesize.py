"""`mimiq-deploy synthesize`: MimiQ data-free calibration images.

Gaussian noise in the model's normalized input space is optimized with
L_G = L_IHC + alpha*CE + beta*TV (the MimiQ paper). MaskAQ's options add a patch-similarity
entropy bonus and, with a quantized student in the loop, masked attention alignment on the
teacher's informative patches. Every batch is one shard with its own seed,
so shards are independent: an interrupted run only redoes missing shards, ranks under
torchrun split the shards, and the result does not depend on either.
"""
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attention import AttentionRecorder, token_importance
from .config import dataclass_from, read_toml, with_defaults
from .distributed import barrier, device_for_rank, init_from_env, on_device
from .errors import MimiqError
from .evaluate import top1_correct
from .families import family_of
from .io import atomic_torch_save, load_torch_file
from .run_dir import Preprocessing, RunDir, SynthManifest
from .similarity import head_pair_ssim
from .zoo import data_config


@dataclasses.dataclass
class SynthesisRecipe:
    num_images: int = 10000
    batch_size: int = 32
    steps: int = 2000
    lr: float = 0.1
    lr_min: float = 1e-3
    alpha: float = 1.0          # CE weight
    beta: float = 2.5e-5        # TV weight
    ihc: bool = True            # False: base synthesis (CE + TV)
    noise_only: bool = False    # True: plain Gaussian noise, no optimization
    ihc_window: int = 0         # 0: one global SSIM window; odd k > 1: Gaussian k x k window
    jitter: int = 30            # random roll, pixels (input size / 7 is a fair choice)
    flip: bool = True
    color_shift: float = 0.1    # std of a per-image, per-channel offset (normalized units)
    noise: float = 0.05         # std of per-pixel noise added each step
    init_std: float = 1.0       # std of the starting Gaussian noise (normalized units)
    init_grid: int = 0          # > 0: starting noise drawn on a grid this wide, upsampled (smooth blobs); 0: white
    patch_entropy: float = 0.0  # MaskAQ option: weight of the patch-similarity entropy bonus (0: off)
    mask_align: float = 0.0     # MaskAQ option: weight of masked attention alignment with a quantized student (0: off)
    keep_start: float = 0.5     # share of patches kept as informative at the first step ...
    keep_end: float = 0.1       # ... decaying linearly to this share at the last step (MaskAQ's 0.5 -> 0.1)
    keep_drop: float = 0.1      # random share of the selected patches dropped at each step
    seed: int = 0


def recipe_table(tables: dict, name: str) -> dict:
    """The table `name` ([synthesize], [finetune]) of a recipe file's tables, {} when it has none."""
    table = tables.get(name, {})
    return dict(table) if isinstance(table, dict) else {}


def load_synthesis_recipe(path: str | Path | None, overrides: dict) -> SynthesisRecipe:
    """Built-in defaults < the recipe's [synthesize] table < command-line overrides."""
    values = {}
    if path:
        tables = read_toml(path)
        values = recipe_table(tables, "synthesize")
        stray = sorted(k for k in tables if k not in ("synthesize", "finetune", "teacher", "meta"))
        if stray:
            raise MimiqError(f"unknown table(s) {stray} in recipe {path}; known: synthesize, finetune")
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = dataclass_from(SynthesisRecipe, values, f"recipe {path or '(defaults)'} [synthesize]")
    if recipe.num_images <= 0 or recipe.batch_size <= 0:
        raise MimiqError(f"--num-images and --batch-size must be positive (got {recipe.num_images}, {recipe.batch_size})")
    if recipe.steps < 0:
        raise MimiqError(f"--steps must be >= 0 (got {recipe.steps})")
    if recipe.init_grid < 0:
        raise MimiqError(f"init_grid must be >= 0 (0: white starting noise), got {recipe.init_grid}")
    if not (0 < recipe.keep_end <= 1 and 0 < recipe.keep_start <= 1 and 0 <= recipe.keep_drop < 1):
        raise MimiqError("keep_start and keep_end must lie in (0, 1], keep_drop in [0, 1)")
    return recipe


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 image prior: norms of the differences to the 4 neighbours."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def ihc_similarity(recorder: AttentionRecorder, model, window: int) -> torch.Tensor:
    """Inter-head SSIM of the last forward's attention, per image: (B, layers, pairs, P) where every layer
    has the same heads and queries (ViT); else (B, values), each layer's (pairs, windows * queries) flattened
    (Swin: heads and windows change from stage to stage)."""
    sims = []
    for logits, layout in zip(recorder.logits, family_of(model).layouts(model)):
        s = head_pair_ssim(logits, layout.grid, layout.prefix, window, layout.keys)
        if layout.windows > 1:  # (B * W, pairs, N) -> (B, pairs, W * N)
            s = s.view(-1, layout.windows, *s.shape[1:]).transpose(1, 2).flatten(2)
        sims.append(s)
    if all(s.shape == sims[0].shape for s in sims):
        return torch.stack(sims, 1)
    return torch.cat([s.flatten(1) for s in sims], 1)


def check_family(model, recipe: SynthesisRecipe) -> None:
    """Refuse the options the model's family has no meaning for (families/swin.py says why)."""
    family = family_of(model)
    if recipe.mask_align and not family.mask_align:
        raise MimiqError(f"mask_align does not apply to {family.name} models (no token set shared by all layers): "
                         "set it to 0")
    if recipe.ihc and recipe.ihc_window > 1 and not family.gaussian_ihc:
        raise MimiqError(f"ihc_window > 1 does not apply to {family.name} models (attention windows are no larger "
                         "than the Gaussian window): use ihc_window = 0")


def patch_similarity_entropy(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B,) differential entropy of the cosine similarities between an image's patch features,
    in the Gaussian closed form 0.5 * log(2*pi*e*var) (MaskAQ: spread them to separate
    informative patches from background)."""
    f = F.normalize(tokens[:, prefix:], dim=-1)
    sim = f @ f.transpose(1, 2)
    p = sim.shape[1]
    off_diagonal = sim[:, ~torch.eye(p, dtype=torch.bool, device=sim.device)]
    return 0.5 * torch.log(2 * math.pi * math.e * off_diagonal.var(1) + 1e-12)


def informative_patches(importance: torch.Tensor, keep: float, drop: float, gen: torch.Generator) -> torch.Tensor:
    """(B, P) bool: per image the `keep` share of patches with the highest importance, less a
    random `drop` share of them (MaskAQ); the top patch always stays."""
    b, p = importance.shape
    order = importance.argsort(1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=order.device).expand(b, p))
    kept = rank < max(1, round(keep * p))
    dropped = (torch.rand((b, p), generator=gen) < drop).to(kept.device)
    return kept & (~dropped | (rank == 0))


def masked_attention_alignment(teacher_logits: list, student_logits: list, mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean L1 distance between teacher's and student's attention rows (softmax over all keys)
    of the informative patches (mask, (B, P)), over layers and heads."""
    rows = mask.to(teacher_logits[0].dtype)[:, None]                     # (B, 1, P)
    dists = []
    for t, s in zip(teacher_logits, student_logits):
        diff = (t.softmax(-1) - s.softmax(-1)).abs().sum(-1)[:, :, prefix:]  # (B, H, P)
        dists.append((diff * rows).sum() / (rows.sum() * diff.shape[1]))
    return torch.stack(dists).mean()


def pixel_bounds(prep: Preprocessing, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid range of normalized pixels: (0 - mean)/std .. (1 - mean)/std per channel."""
    mean = torch.tensor(prep.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def _start_images(model, recipe: SynthesisRecipe, prep: Preprocessing, shard: int, device):
    """The shard's generator, labels and starting noise (clamped to the pixel range)."""
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed * 1_000_003 + shard)
    n = min(recipe.batch_size, recipe.num_images - shard * recipe.batch_size)
    shape = (n, *prep.input_size)
    labels = torch.randint(0, model.num_classes, (n,), generator=gen).to(device)
    if recipe.init_grid and not recipe.noise_only:  # low-frequency start: coarse noise upsampled, at init_std
        coarse = torch.randn((n, shape[1], recipe.init_grid, recipe.init_grid), generator=gen)
        x = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
        x = (x / x.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1) * recipe.init_std).to(device)
    else:
        x = (torch.randn(shape, generator=gen) * recipe.init_std).to(device)
    lo, hi = pixel_bounds(prep, device)
    return gen, labels, torch.maximum(torch.minimum(x, hi), lo)


def _augmented(x: torch.Tensor, recipe: SynthesisRecipe, gen: torch.Generator) -> torch.Tensor:
    """This step's view of the images: random roll, optional flip, colour shift and pixel noise."""
    dy, dx = torch.randint(-recipe.jitter, recipe.jitter + 1, (2,), generator=gen).tolist()
    xa = torch.roll(x, (dy, dx), (2, 3))
    if recipe.flip and torch.rand(1, generator=gen).item() < 0.5:
        xa = xa.flip(3)
    shift = torch.randn((x.shape[0], x.shape[1], 1, 1), generator=gen).to(x.device) * recipe.color_shift
    return xa + shift + torch.randn(tuple(x.shape), generator=gen).to(x.device) * recipe.noise


def _mask_alignment(model, student, xa, recorder, student_recorder, recipe: SynthesisRecipe, step: int, gen):
    """MaskAQ: the student's attention pulled to the teacher's on the teacher's informative patches."""
    student_recorder.clear()
    student(xa)
    keep = recipe.keep_start + (recipe.keep_end - recipe.keep_start) * step / max(1, recipe.steps - 1)
    layout = family_of(model).layouts(model)[0]  # one token set for all layers (families with mask_align)
    with torch.no_grad():
        importance = torch.stack([token_importance(l.softmax(-1), layout.prefix, layout.cls)
                                  for l in recorder.logits]).mean(0)
    mask = informative_patches(importance, keep, recipe.keep_drop, gen)
    return masked_attention_alignment(recorder.logits, student_recorder.logits, mask, layout.prefix)


def _generator_loss(model, x, xa, labels, recipe: SynthesisRecipe, recorder, last_tokens, losses: dict,
                    student=None, student_recorder=None, step: int = 0, gen=None, token_prefix: int = 0) -> torch.Tensor:
    """L_G = alpha*CE + beta*TV (+ L_IHC, - entropy bonus, + masked alignment) of one step; fills `losses`."""
    recorder.clear()
    last_tokens.clear()
    logits = model(xa)
    ce = F.cross_entropy(logits, labels)
    tv = total_variation(x)
    loss = recipe.alpha * ce + recipe.beta * tv
    if recipe.ihc:
        ihc = (1 - ihc_similarity(recorder, model, recipe.ihc_window) ** 2).mean()
        loss = loss + ihc
        losses["ihc"] = ihc.item()
    if recipe.patch_entropy:
        entropy = patch_similarity_entropy(last_tokens[-1], token_prefix).mean()
        loss = loss - recipe.patch_entropy * entropy
        losses["entropy"] = entropy.item()
    if recipe.mask_align:
        align = _mask_alignment(model, student, xa, recorder, student_recorder, recipe, step, gen)
        loss = loss + recipe.mask_align * align
        losses["align"] = align.item()
    losses.update(ce=ce.item(), tv=tv.item())
    return loss


def synthesize_batch(model, recipe: SynthesisRecipe, data_cfg: dict | Preprocessing, shard: int, device,
                     on_step=None, student=None) -> dict:
    """One shard: `batch_size` images optimized from noise with the shard's own seed.

    data_cfg: the model's preprocessing (a timm data config, zoo.data_config).
    student: the fake-quant student for masked attention alignment (recipe.mask_align > 0).
    on_step(losses) is called after every optimization step (progress display)."""
    check_family(model, recipe)
    prep = Preprocessing.from_timm(data_cfg)
    gen, labels, x = _start_images(model, recipe, prep, shard, device)
    losses = {}
    if recipe.noise_only or recipe.steps == 0:
        return {"images": x.half().cpu(), "labels": labels.cpu(), "losses": losses}
    lo, hi = pixel_bounds(prep, device)
    curve = {"step": []}  # the losses at about 50 steps, for the report's loss curve
    every = max(1, recipe.steps // 50)

    x.requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=recipe.lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.steps, eta_min=recipe.lr_min)
    recorder = AttentionRecorder(model)
    student_recorder = AttentionRecorder(student) if recipe.mask_align else None
    last_tokens, token_prefix = [], 0
    if recipe.patch_entropy:
        block, to_tokens, token_prefix = family_of(model).tokens(model)
        recorder.handles.append(block.register_forward_hook(lambda _m, _i, out: last_tokens.append(to_tokens(out))))
    try:
        for step in range(recipe.steps):
            xa = _augmented(x, recipe, gen)
            loss = _generator_loss(model, x, xa, labels, recipe, recorder, last_tokens, losses,
                                   student, student_recorder, step, gen, token_prefix)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            losses["total"] = loss.item()
            if step % every == 0 or step == recipe.steps - 1:
                curve["step"].append(step + 1)
                for k, v in losses.items():
                    curve.setdefault(k, []).append(v)
            if on_step:
                on_step(losses)
    finally:
        recorder.remove()
        if student_recorder:
            student_recorder.remove()
    stored = x.detach().half()
    with torch.no_grad():  # judged on the stored (fp16) images, as fine-tuning will see them
        losses["teacher_top1"] = 100.0 * top1_correct(model(stored.float()), labels) / len(labels)
        if student is not None:
            losses["student_top1"] = 100.0 * top1_correct(student(stored.float()), labels) / len(labels)
    return {"images": stored.cpu(), "labels": labels.cpu(), "losses": losses, "curve": curve}


def manifest_path(run_dir: Path | RunDir) -> Path:
    return RunDir.of(run_dir).synth_manifest


def shard_path(run_dir: Path | RunDir, shard: int) -> Path:
    return RunDir.of(run_dir).shard(shard)


def _check_or_write_manifest(rd: RunDir, header: SynthManifest, rank: int) -> None:
    old = rd.read_manifest()
    if old is not None:
        if old.model != header.model:
            raise MimiqError(f"{rd.root} holds shards of model {old.model!r}, not {header.model!r}: use another --out")
        old_recipe = with_defaults(SynthesisRecipe, old.recipe)
        if old_recipe != header.recipe:
            changed = sorted(k for k in header.recipe if old_recipe.get(k) != header.recipe[k])
            raise MimiqError(f"{rd.root} holds shards made with another recipe (differs in {changed}): use another --out")
        if old.student != header.student:
            raise MimiqError(f"{rd.root} holds shards aligned with another student ({old.student}): use another --out")
        return
    if rank == 0:
        rd.write_manifest(header)


def _header(model_name: str, recipe: SynthesisRecipe, prep: Preprocessing, num_classes: int, kind: str,
            student: str | None = None) -> SynthManifest:
    return SynthManifest(model=model_name, recipe=dataclasses.asdict(recipe),
                         num_shards=math.ceil(recipe.num_images / recipe.batch_size), input_size=list(prep.input_size),
                         mean=list(prep.mean), std=list(prep.std), num_classes=num_classes, kind=kind, student=student)


def synthesize(model, model_name: str, run_dir: Path | RunDir, recipe: SynthesisRecipe, progress: bool = True,
               student=None, student_tag: str | None = None) -> SynthManifest:
    """Write all missing shards of the synthetic set into run_dir/synth; returns the manifest.

    student (with student_tag, its description in the manifest): the fake-quant student that
    masked attention alignment needs; its parameters are left as they were."""
    rd = RunDir.of(run_dir)
    check_family(model, recipe)
    if recipe.mask_align and student is None:
        raise MimiqError("mask_align needs the quantized student in the loop: pass --align-student STUDENT.pt "
                         "(a PTQ student: `mimiq-deploy finetune --epochs 0`)")
    rank, world = init_from_env()
    device = device_for_rank(rank)
    model = on_device(model, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    if recipe.mask_align:
        student = on_device(student, device)
        student_mode = student.training
        student.eval()
        trainable = [p for p in student.parameters() if p.requires_grad]
    else:
        student = None
    prep = Preprocessing.from_timm(data_config(model))
    header = _header(model_name, recipe, prep, model.num_classes, _kind(recipe), student_tag if student else None)
    num_shards = header.num_shards
    _check_or_write_manifest(rd, header, rank)
    barrier()
    mine = [s for s in range(rank, num_shards, world) if not rd.shard(s).exists()]
    steps = 1 if recipe.noise_only else max(1, recipe.steps)
    done_images = recipe.num_images - sum(min(recipe.batch_size, recipe.num_images - s * recipe.batch_size)
                                          for s in range(num_shards) if not rd.shard(s).exists())
    bar = tqdm(total=len(mine) * steps, unit="step", disable=not progress or rank != 0 and world > 1,
               desc=f"synthesize{f' rank {rank}' if world > 1 else ''}")
    t0, work = time.time(), 0
    for p in trainable:  # the student's gradients are not wanted here, only the images'
        p.requires_grad_(False)
    try:
        for shard in mine:
            def on_step(losses):
                bar.update(1)
                bar.set_postfix(images=f"{done_images}/{recipe.num_images}",
                                **{k: f"{v:.3g}" for k, v in losses.items() if k != "total"}, refresh=False)
            out = synthesize_batch(model, recipe, prep, shard, device, on_step, student)
            if recipe.noise_only or recipe.steps == 0:
                bar.update(1)
            atomic_torch_save({**out, "shard": shard}, rd.shard(shard))
            done_images += len(out["labels"])
            work += len(out["labels"]) * steps
    finally:
        bar.close()  # also on an error, so its one line starts a line of its own
        for p in trainable:
            p.requires_grad_(True)
        if student is not None:
            student.train(student_mode)
    elapsed = time.time() - t0
    barrier()
    return finalize_manifest(rd, write=rank == 0, images_steps_per_s=work / elapsed if elapsed > 0 and work else None)


def _kind(recipe: SynthesisRecipe) -> str:
    base = "noise" if recipe.noise_only else "mimiq" if recipe.ihc else "base"
    return base + "+maskaq" if recipe.mask_align and not recipe.noise_only else base


def finalize_manifest(run_dir: Path | RunDir, write: bool = True, images_steps_per_s: float | None = None) -> SynthManifest:
    """Summarize the finished shards (losses, teacher accuracy) into the manifest; write it back if `write`."""
    rd = RunDir.of(run_dir)
    manifest = rd.read_manifest()
    shards = read_shards(rd, manifest.num_shards)
    n = sum(len(s["labels"]) for s in shards)
    stats = {}
    for key in ("ihc", "entropy", "align", "ce", "tv", "teacher_top1", "student_top1"):
        vals = [(s["losses"][key], len(s["labels"])) for s in shards if key in s["losses"]]
        if vals:
            stats[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    curves = [s["curve"] for s in shards if s.get("curve")]
    if curves and all(c["step"] == curves[0]["step"] for c in curves):  # mean over shards, step by step
        keys = [k for k in curves[0] if all(k in c for c in curves)]
        manifest.loss_curve = {k: [sum(v) / len(curves) for v in zip(*(c[k] for c in curves))] for k in keys}
    manifest.complete, manifest.num_images_done, manifest.final_losses = True, n, stats
    if images_steps_per_s:
        manifest.images_steps_per_s = images_steps_per_s
    if write:
        rd.write_manifest(manifest)
    return manifest


def read_shards(run_dir: Path | RunDir, num_shards: int) -> list[dict]:
    rd = RunDir.of(run_dir)
    shards = []
    for s in range(num_shards):
        path = rd.shard(s)
        shard = load_torch_file(path, "synthetic shard", own=True)
        if not isinstance(shard, dict) or not all(isinstance(shard.get(k), torch.Tensor) for k in ("images", "labels")):
            raise MimiqError(f"{path} is not a synthetic shard (no images / labels): remove it and rerun synthesize")
        shards.append(shard)
    return shards


def is_complete(run_dir: Path | RunDir) -> bool:
    manifest = RunDir.of(run_dir).read_manifest()
    return manifest is not None and manifest.complete


def load_synthetic(run_dir: Path | RunDir) -> tuple[torch.Tensor, torch.Tensor, SynthManifest]:
    """All shards of run_dir/synth as (float images, labels, manifest)."""
    rd = RunDir.of(run_dir)
    manifest = rd.read_manifest()
    if manifest is None:
        raise MimiqError(f"no synthetic data in {rd.root} ({rd.synth_manifest} missing): "
                         "run `mimiq-deploy synthesize` first")
    missing = [s for s in range(manifest.num_shards) if not rd.shard(s).exists()]
    if missing:
        raise MimiqError(f"{rd.root} misses {len(missing)} of {manifest.num_shards} shards: rerun synthesize to finish")
    shards = read_shards(rd, manifest.num_shards)
    return torch.cat([s["images"] for s in shards]).float(), torch.cat([s["labels"] for s in shards]), manifest


@torch.no_grad()
def mean_inter_head_similarity(model, images: torch.Tensor, batch_size: int = 64, window: int = 0) -> float:
    """Mean |SSIM| between heads' attention maps of the same query, over layers, queries, pairs."""
    model.eval()
    recorder = AttentionRecorder(model)
    total, count = 0.0, 0
    try:
        for i in range(0, len(images), batch_size):
            recorder.clear()
            model(images[i:i + batch_size])
            sim = ihc_similarity(recorder, model, window).abs()
            total += sim.sum().item()
            count += sim.numel()
    finally:
        recorder.remove()
    return total / max(1, count)


def save_image_set(run_dir: Path | RunDir, model_name: str, images: torch.Tensor, labels: torch.Tensor, kind: str,
                   data_cfg: dict | Preprocessing, shard_size: int = 256) -> SynthManifest:
    """Store an image set made elsewhere (e.g. real images for a reference run) in the shard format.
    data_cfg: the images' preprocessing (a timm pretrained_cfg or data config)."""
    rd, prep = RunDir.of(run_dir), Preprocessing.from_timm(data_cfg)
    recipe = SynthesisRecipe(num_images=len(images), batch_size=shard_size, steps=0)
    header = _header(model_name, recipe, prep, prep.num_classes or int(labels.max()) + 1, kind)
    rd.write_manifest(header)
    for s in range(header.num_shards):
        part = slice(s * shard_size, (s + 1) * shard_size)
        atomic_torch_save({"images": images[part].half(), "labels": labels[part], "losses": {}, "shard": s},
                          rd.shard(s))
    return finalize_manifest(rd)
