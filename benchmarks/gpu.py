"""GPU speed of the PyTorch back end's kernels against FP16 -> gpu.json and gpu.md (in --out-dir).

Models: fmnist-vit (the embedded teacher) and random-init timm deit_small_patch16_224, deit_base_patch16_224,
swin_tiny_patch4_window7_224, each as PTQ students (calibration only, on Gaussian noise; fmnist-vit's W8A8 may be a
given --student). Per batch size (1, 32, 128):
- FP16 eager and FP16 compiled (torch.compile, dynamic batch): the float model;
- INT8: the W8A8 student on torch._int_mm (backends/pytorch/kernels.py), float parts in FP16, eager and compiled;
- W4A16: the W4A8 student's INT4 weights on aten._weight_int4pack_mm (BF16 activations), eager;
- FP8: needs sm_89+ and an fp8 bit setting, which the package does not have yet: the row says so.
Reported: p50 latency (CUDA events), images/s, the ratio p50(FP16 compiled) / p50, and top-1 agreement with the
fake-quant student of the row's bit setting on 256 noise images (8 on the CPU; near-tie logits: lower than on real images).
Then synthesis and fine-tuning throughput (images x steps / s) with each model's default recipe for a few steps.

Without CUDA every CUDA row is skipped with its reason and a reduced CPU run (--cpu-smoke, automatic) times
fmnist-vit at batch 1 on the CPU (FP32, INT8, W4A16 eager) and one synthesis / fine-tuning step, so that the script
itself is exercised. --max-seconds bounds the run: rows past it are skipped, saying so.

    python benchmarks/gpu.py --out-dir runs/gpu                  # from the repository root (no install needed)
    python benchmarks/gpu.py --cpu-smoke --out-dir /tmp/gpu
"""
import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout (or a carried working tree) without `pip install`

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    import onnxruntime  # noqa: E402,F401  (the back-end registry, mimiq_deploy/backends/__init__.py, imports it)
except ImportError:  # a GPU host without it: the PyTorch back end is loaded without the registry of every back end
    import types

    import mimiq_deploy  # noqa: E402
    _stub = types.ModuleType("mimiq_deploy.backends")
    _stub.__path__ = [str(ROOT / "mimiq_deploy" / "backends")]
    sys.modules["mimiq_deploy.backends"] = _stub

from mimiq_deploy.backends.pytorch.backend import ModuleRunner, compile_module  # noqa: E402
from mimiq_deploy.backends.pytorch.kernels import describe, integer_model  # noqa: E402
from mimiq_deploy.config import resolve_recipe_path  # noqa: E402
from mimiq_deploy.finetune import finetune, load_finetune_recipe, ptq_student  # noqa: E402
from mimiq_deploy.io import atomic_write_text  # noqa: E402
from mimiq_deploy.quant import parse_bits  # noqa: E402
from mimiq_deploy.quant.student import load_student  # noqa: E402
from mimiq_deploy.run_dir import Preprocessing  # noqa: E402
from mimiq_deploy.synthesize import load_synthesis_recipe, save_image_set, synthesize_batch  # noqa: E402

MODELS = ("fmnist-vit", "deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224")
BATCHES = (1, 32, 128)
VARIANTS = ("fp16-eager", "fp16-compiled", "int8-eager", "int8-compiled", "w4a16-eager", "fp8")


def teacher_of(name: str):
    if name == "fmnist-vit":
        from mimiq_deploy.models import load_model
        return load_model(name)
    import timm
    from mimiq_deploy.families import capture_attention
    return capture_attention(timm.create_model(name, pretrained=False)).eval()


def input_size(model) -> tuple:
    return tuple(Preprocessing.from_timm(model.pretrained_cfg).input_size)


def time_module(module, x: np.ndarray, device: str, dtype, seconds: float, max_iters: int = 200) -> dict:
    """p50 ms and images/s of `module` on x, after warm-up: CUDA events on CUDA, a wall clock on the CPU."""
    sample = ModuleRunner(module, device, dtype).sampler(x)
    for _ in range(3):
        sample()
    times, t0 = [], time.time()
    while len(times) < 5 or (time.time() - t0 < seconds and len(times) < max_iters):
        times.append(sample())
    p50 = float(np.percentile(times, 50))
    return {"p50_ms": p50, "images_per_s": len(x) * 1000 / p50, "iters": len(times)}


def agreement(module, student, x: torch.Tensor, dtype) -> float:
    with torch.no_grad():
        ref = student(x.float()).argmax(1)
        out = module(x.to(dtype)).float().argmax(1)
    return 100.0 * (out == ref).float().mean().item()


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def passed(self) -> bool:
        return time.time() > self.end


def model_rows(name: str, device: str, batches, variants, args, deadline: Deadline, w8_student=None) -> list[dict]:
    """Timed rows of one model on one device (variants: which to run; the others are skipped rows)."""
    rows = []
    if deadline.passed():
        return [dict(model=name, batch=b, variant=v, device=device, skipped="time limit (--max-seconds)")
                for b in batches for v in variants]
    teacher = teacher_of(name).to(device)
    size = input_size(teacher)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(8, *size, generator=gen).to(device)
    w8 = w8_student.to(device).eval() if w8_student is not None else ptq_student(teacher, parse_bits("w8a8"), calib)
    w4 = ptq_student(teacher, parse_bits("w4a8"), calib)
    cuda = device == "cuda"
    half = torch.float16 if cuda else torch.float32
    eval_x = torch.randn(256 if cuda else 8, *size, generator=gen).to(device)
    modules = {}  # variant -> (module, dtype, student it is compared with, precision note)
    float_model = copy.deepcopy(teacher).to(device, half).eval()
    modules["fp16-eager"] = (float_model, half, w8, "FP16" if cuda else "FP32 (CPU)")
    modules["fp16-compiled"] = (None, half, w8, "FP16, torch.compile default")
    int8 = integer_model(copy.deepcopy(w8), "int", device, half, size)
    modules["int8-eager"] = (int8, half, w8, f"W8A8 {describe(int8)['kernels']}")
    modules["int8-compiled"] = (None, half, w8, "W8A8, torch.compile default")
    w4a16_dtype = torch.bfloat16 if cuda else torch.float32
    try:
        w4a16 = integer_model(copy.deepcopy(w4), "weight-only", device, w4a16_dtype, size)
        modules["w4a16-eager"] = (w4a16, w4a16_dtype, w4, f"W4A16 {describe(w4a16)['kernels']}")
    except RuntimeError as e:  # the int4pack kernel refused a shape on this device
        modules["w4a16-eager"] = (None, w4a16_dtype, w4, f"int4pack kernel refused: {str(e).splitlines()[0]}")
    for variant in variants:
        if variant == "fp8":
            cap = torch.cuda.get_device_capability() if cuda else None
            why = ("the package has no fp8 bit setting yet" if cap and cap >= (8, 9) else
                   "FP8 needs sm_89+ (and the package has no fp8 bit setting yet)")
            rows += [dict(model=name, batch=b, variant=variant, device=device, skipped=why) for b in batches]
            continue
        module, dtype, student, note = modules[variant]
        if variant.endswith("-compiled"):
            base = float_model if variant.startswith("fp16") else int8
            module = compile_module(base, "default")
        for b in batches:
            row = dict(model=name, batch=b, variant=variant, device=device, precision=note)
            if deadline.passed():
                rows.append({**row, "skipped": "time limit (--max-seconds)"})
                continue
            if module is None:
                rows.append({**row, "skipped": note})
                continue
            try:
                x = torch.randn(b, *size, generator=gen).numpy()
                t0 = time.time()
                row.update(time_module(module, x, device, dtype, args.seconds))
                row["first_call_s"] = round(time.time() - t0, 1)
                if b == batches[-1]:
                    row["agreement"] = agreement(module, student, eval_x, dtype)
            except Exception as e:  # a kernel or the compiler failing on this host: the row says why
                row["skipped"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            rows.append(row)
    by = {(r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        ref = by.get((r["batch"], "fp16-compiled"), {}).get("p50_ms")
        if r.get("p50_ms") and ref:
            r["ratio_to_fp16_compiled"] = ref / r["p50_ms"]
    return rows


def throughput_rows(name: str, device: str, steps: int, deadline: Deadline) -> list[dict]:
    """Synthesis and fine-tuning images x steps / s with the model's default recipe, for a few steps."""
    if deadline.passed():
        return [dict(model=name, stage=s, device=device, skipped="time limit (--max-seconds)")
                for s in ("synthesize", "finetune")]
    teacher = teacher_of(name).to(device)
    recipe_path = resolve_recipe_path(None, name)
    rows = []
    synth = load_synthesis_recipe(recipe_path, {"steps": steps})
    if device == "cpu":
        synth = load_synthesis_recipe(recipe_path, {"steps": steps, "batch_size": 4})
    t0 = time.time()
    out = synthesize_batch(teacher, synth, teacher.pretrained_cfg, 0, torch.device(device))
    seconds = time.time() - t0
    rows.append(dict(model=name, stage="synthesize", device=device, batch=synth.batch_size, steps=steps,
                     seconds=seconds, images_steps_per_s=synth.batch_size * steps / seconds))
    ft = load_finetune_recipe(resolve_recipe_path(None, name), {"epochs": 1})
    n = ft.batch_size * steps
    images = out["images"].float().repeat((n + len(out["images"]) - 1) // len(out["images"]), 1, 1, 1)[:n]
    labels = out["labels"].repeat((n + len(out["labels"]) - 1) // len(out["labels"]))[:n]
    with tempfile.TemporaryDirectory() as tmp:
        save_image_set(tmp, name, images, labels, "benchmark", teacher.pretrained_cfg)
        ft = load_finetune_recipe(resolve_recipe_path(None, name), {"epochs": 1, "calib_images": min(n, 64),
                                                                      "milestones": [1]})
        record = finetune(teacher, name, None, tmp, parse_bits("w8a8"), ft, progress=False)
    seconds = record.train_minutes * 60
    rows.append(dict(model=name, stage="finetune", device=device, batch=ft.batch_size, steps=steps, seconds=seconds,
                     images_steps_per_s=n / seconds))
    return rows


def markdown(result: dict) -> str:
    host = result["host"]
    lines = [f"# PyTorch back end: GPU speed ({host['device']})", "",
             f"torch {host['torch']}, {host['platform']}; {result['command']}", "",
             "| model | batch | variant | device | p50 ms | images/s | vs FP16 compiled | agreement % | note |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['device']} | {f('p50_ms', '%.3f')} | "
                     f"{f('images_per_s', '%.0f')} | {f('ratio_to_fp16_compiled', '%.2fx')} | "
                     f"{f('agreement', '%.1f')} | {r.get('skipped') or r.get('precision', '')} |")
    lines += ["", "| model | stage | device | batch | steps | images x steps / s | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in result["throughput"]:
        rate = f"{r['images_steps_per_s']:.1f}" if r.get("images_steps_per_s") else ""
        lines.append(f"| {r['model']} | {r['stage']} | {r['device']} | {r.get('batch', '')} | {r.get('steps', '')} | "
                     f"{rate} | {r.get('skipped', '')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--max-seconds", type=float, default=540.0, help="time limit of the whole run")
    ap.add_argument("--cpu-smoke", action="store_true", help="the reduced CPU run (automatic without CUDA)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--seconds", type=float, default=1.0, help="measured time per row")
    ap.add_argument("--steps", type=int, default=5, help="synthesis / fine-tuning steps timed")
    ap.add_argument("--student", type=Path, default=None, help="a fmnist-vit W8A8 student.pt for the INT8 rows")
    args = ap.parse_args()
    t_start = time.time()
    deadline = Deadline(args.max_seconds)
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    result = {"host": {"device": device_name, "torch": torch.__version__, "platform": platform.platform(),
                       "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability())
                       if torch.cuda.is_available() else None},
              "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "rows": [], "throughput": []}
    w8 = None
    if args.student is not None:
        w8 = load_student(args.student)
        if w8.model_name != "fmnist-vit" or w8.quant_config.name != "w8a8":
            sys.exit(f"--student must be a fmnist-vit w8a8 student, got {w8.model_name} {w8.quant_config.name}")
    if cuda:
        for name in models:
            result["rows"] += model_rows(name, "cuda", batches, VARIANTS, args, deadline,
                                         w8 if name == "fmnist-vit" else None)
            result["throughput"] += throughput_rows(name, "cuda", args.steps, deadline)
    else:
        why = "--cpu-smoke" if args.cpu_smoke else "no CUDA GPU on this host"
        result["rows"] += [dict(model=m, batch=b, variant=v, device="cuda", skipped=f"CUDA row skipped: {why}")
                           for m in models for b in batches for v in VARIANTS]
        result["throughput"] += [dict(model=m, stage=s, device="cuda", skipped=f"CUDA row skipped: {why}")
                                 for m in models for s in ("synthesize", "finetune")]
        # the reduced CPU run: fmnist-vit at batch 1, eager, and one step of each training stage
        result["rows"] += model_rows("fmnist-vit", "cpu", [1], ("fp16-eager", "int8-eager", "w4a16-eager"),
                                     args, deadline, w8)
        result["throughput"] += throughput_rows("fmnist-vit", "cpu", 1, deadline)
    result["seconds"] = time.time() - t_start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "gpu.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out_dir / "gpu.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
