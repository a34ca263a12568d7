"""GPU speed of the PyTorch back end's kernels against FP16 -> gpu.json and gpu.md (in --out-dir).

Models, in this order (the one the issue asks the batch-128 ratio of first, so a time limit cuts the others):
random-init timm deit_base_patch16_224, fmnist-vit (the embedded teacher), deit_small_patch16_224 and
swin_tiny_patch4_window7_224, each as PTQ students (calibrated on 8 Gaussian-noise images; fmnist-vit's W8A8 may be
a given --student). Variants, each at batch 1, 32 and 128:
- fp16-eager / fp16-graph / fp16-compiled: the stock float model in FP16 (timm's own attention: fused
  scaled_dot_product_attention where timm uses it, as a user runs it), eager, replayed as one CUDA graph, and under
  torch.compile (mode "default", dynamic batch);
- int8-eager / int8-graph / int8-compiled: the W8A8 student on torch._int_mm (backends/pytorch/kernels.py), float
  parts in FP16;
- w4a16-eager / w4a16-graph: the W4A8 student's INT4 weights on aten._weight_int4pack_mm, BF16 activations;
- fp8-eager / fp8-graph: the fp8 student on torch._scaled_mm (E4M3FN; sm_89+), float parts in FP16.
The variants of one batch size are timed in interleaved turns (bench.time_interleaved, at least --seconds each),
so that a clock or thermal drift falls on all of them. Reported: p50 latency (CUDA events around the call, or around the graph's
replay), images/s, the ratios p50(fp16-compiled) / p50 and p50(fp16-graph) / p50 (graphs against graphs: launch
overhead off both sides), and top-1 agreement and logit cosine with the model the variant implements (the teacher in
FP32 for the fp16 rows, the fake-quant student of that bit setting in FP32 otherwise; the weight-only student,
activation quantizers off, for w4a16), on 2,048 Fashion-MNIST test images for fmnist-vit where the files are found
(--data-dir), else on 256 noise images (random-init models have near-tie logits: agreement is lower than on real
images; the cosine is the better figure there).
Then synthesis and fine-tuning throughput (images x steps / s) with each model's default recipe for a few steps.

Without CUDA every CUDA row is skipped with its reason and a reduced CPU run (--cpu-smoke, automatic) times
fmnist-vit at batch 1 on the CPU (FP32, INT8, W4A16 and FP8 eager) and one synthesis / fine-tuning step, so that
the script itself is exercised. --max-seconds bounds the run: rows past it are skipped, saying so; gpu.json and
gpu.md are rewritten after every model, so a run killed at its limit still leaves what it measured.

    python benchmarks/gpu.py --out-dir runs/gpu                  # from the repository root (no install needed)
    python benchmarks/gpu.py --cpu-smoke --out-dir /tmp/gpu

On a lent GPU (the device tool: torch, timm, onnx, onnxruntime there; not pytorch-msssim or onnxconverter-common),
prepare the carried files here once (wheels of the two missing pure-Python packages, the Fashion-MNIST test set):

    echo /.carry/ >> .git/info/exclude; mkdir -p .carry/whl .carry/fmnist
    pip download --no-deps -d .carry/whl pytorch-msssim==1.0.0 onnxconverter-common==1.16.0
    cp /usr/share/datasets/fashion-mnist/t10k-* .carry/fmnist/

and run it (carry [".carry"]):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out-dir $OUT --data-dir .carry/fmnist --max-seconds 420
"""
import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout (or a carried working tree) without `pip install`

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mimiq_deploy.backends.pytorch.backend import ModuleRunner, compile_module  # noqa: E402
from mimiq_deploy.bench import time_interleaved  # noqa: E402
from mimiq_deploy.backends.pytorch.kernels import describe, fp8_gemm_available, integer_model  # noqa: E402
from mimiq_deploy.config import resolve_recipe_path  # noqa: E402
from mimiq_deploy.errors import MimiqError  # noqa: E402
from mimiq_deploy.finetune import finetune, load_finetune_recipe  # noqa: E402
from mimiq_deploy.io import atomic_write_text  # noqa: E402
from mimiq_deploy.quant import parse_bits  # noqa: E402
from mimiq_deploy.quant.convert import set_quant_enabled  # noqa: E402
from mimiq_deploy.quant.student import load_student, ptq_student  # noqa: E402
from mimiq_deploy.run_dir import Preprocessing  # noqa: E402
from mimiq_deploy.synthesize import load_synthesis_recipe, save_image_set, synthesize_batch  # noqa: E402

MODELS = ("deit_base_patch16_224", "fmnist-vit", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
BATCHES = (1, 32, 128)
KINDS = ("fp16", "int8", "w4a16", "fp8")
VARIANTS = ("fp16-eager", "fp16-graph", "fp16-compiled", "int8-eager", "int8-graph", "int8-compiled",
            "w4a16-eager", "w4a16-graph", "fp8-eager", "fp8-graph")


def models_of(name: str) -> tuple:
    """(the stock model, as a user would run it in float: timm's own attention, fused SDPA where timm uses it;
    the teacher: the same weights with the attention captured, which the students are built from)."""
    from mimiq_deploy.families import capture_attention
    if name == "fmnist-vit":
        from mimiq_deploy.models import load_model
        stock = load_model(name, capture=False)
    else:
        import timm
        torch.manual_seed(0)
        stock = timm.create_model(name, pretrained=False).eval()
    return stock, capture_attention(copy.deepcopy(stock)).eval()


def input_size(model) -> tuple:
    return tuple(Preprocessing.from_timm(model.pretrained_cfg).input_size)


def graph_sampler(module, x: np.ndarray, dtype):
    """One forward captured as a CUDA graph on a static input; each sample times one replay with CUDA events."""
    xd = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to("cuda", dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (cuBLAS handles, workspaces)
            module(xd)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        module(xd)

    def sample():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return sample


def failure(e: BaseException) -> str:
    """A row's one-line reason: the exception's type and first line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def time_variants(samplers: dict, seconds: float) -> tuple[dict, dict]:
    """p50 ms of each sampler, timed in interleaved turns by bench.time_interleaved after a first call per sampler
    (torch.compile compiles there); a sampler failing is reported, the others go on. Returns (timings, failures)."""
    ok, failed, first = {}, {}, {}
    for name, sample in samplers.items():
        try:
            t0 = time.time()
            sample()
            first[name] = time.time() - t0
            ok[name] = sample
        except Exception as e:  # a kernel or the compiler failing on this host: its row says why
            failed[name] = failure(e)
    times = time_interleaved(ok, warmup=2, iters=20, min_seconds=seconds) if ok else {}
    return {name: {"p50_ms": float(np.percentile(t, 50)), "iters": len(t), "first_call_s": round(first[name], 1)}
            for name, t in times.items()}, failed


def eval_images(name: str, teacher, size, device: str, data_dir: Path | None, gen) -> tuple[torch.Tensor, str]:
    """Fashion-MNIST test images for fmnist-vit where found, else Gaussian noise."""
    if name == "fmnist-vit":
        try:
            from mimiq_deploy.data import fmnist_eval_dataset
            ds = fmnist_eval_dataset(teacher.pretrained_cfg, data_dir)
            n = 2048 if device == "cuda" else 64
            return torch.stack([ds[i][0] for i in range(n)]).to(device), f"{n} Fashion-MNIST test images"
        except MimiqError as e:
            print(f"agreement on noise: {e}", file=sys.stderr)
    n = 256 if device == "cuda" else 8
    return torch.randn(n, *size, generator=gen).to(device), f"{n} noise images"


@torch.no_grad()
def agreement(module, reference, x: torch.Tensor, dtype, batch: int = 256) -> dict:
    agree, cos = [], []
    for i in range(0, len(x), batch):
        ref = reference(x[i:i + batch].float()).float()
        out = module(x[i:i + batch].to(dtype)).float()
        agree.append((out.argmax(1) == ref.argmax(1)).float())
        cos.append(torch.nn.functional.cosine_similarity(out, ref, dim=1))
    return {"agreement": 100.0 * torch.cat(agree).mean().item(), "cosine": torch.cat(cos).mean().item()}


def kind_modules(name: str, device: str, kinds, w8_student) -> tuple[dict, dict, tuple]:
    """kind -> (module, dtype, reference model, precision note) for the kinds that build here, and kind -> why
    for the others."""
    stock, teacher = (m.to(device) for m in models_of(name))
    size = input_size(teacher)
    calib = torch.randn(8, *size, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device == "cuda"
    half = torch.float16 if cuda else torch.float32
    built, skipped = {}, {}
    for kind in kinds:
        try:
            if kind == "fp16":
                built[kind] = (stock.to(device, half).eval(), half, teacher,
                               ("FP16" if cuda else "FP32 (CPU)") + ", timm's own attention")
            elif kind == "int8":
                w8 = w8_student.to(device).eval() if w8_student is not None else \
                    ptq_student(teacher, parse_bits("w8a8"), calib)
                module = integer_model(copy.deepcopy(w8), "int", device, half, size)
                built[kind] = (module, half, w8, f"W8A8 {describe(module)['kernels']}")
            elif kind == "w4a16":
                w4 = ptq_student(teacher, parse_bits("w4a8"), calib)
                dtype = torch.bfloat16 if cuda else torch.float32
                module = integer_model(copy.deepcopy(w4), "weight-only", device, dtype, size)
                set_quant_enabled(w4, False, activations_only=True)  # what a weight-only engine computes
                built[kind] = (module, dtype, w4, f"W4A16 {describe(module)['kernels']}")
            elif kind == "fp8":
                ok, why = fp8_gemm_available(device)
                if not ok:
                    skipped[kind] = why
                    continue
                fp8 = ptq_student(teacher, parse_bits("fp8"), calib)
                module = integer_model(copy.deepcopy(fp8), "fp8", device, half, size)
                built[kind] = (module, half, fp8, f"FP8 {describe(module)['kernels']}")
        except Exception as e:  # a kernel refusing a shape on this device (int4pack, _int_mm)
            skipped[kind] = failure(e)
    return built, skipped, (teacher, size)


def model_rows(name: str, device: str, batches, variants, args, deadline, w8_student=None) -> list[dict]:
    """Timed rows of one model on one device (variants: which to run)."""
    if deadline.passed():
        return [dict(model=name, batch=b, variant=v, device=device, skipped="time limit (--max-seconds)")
                for b in batches for v in variants]
    cuda = device == "cuda"
    kinds = [k for k in KINDS if any(v.startswith(k + "-") for v in variants)]
    built, skipped, (teacher, size) = kind_modules(name, device, kinds, w8_student)
    compiled = {k: compile_module(built[k][0], "default") for k in built if f"{k}-compiled" in variants}
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batches:
        x = torch.randn(b, *size, generator=gen).numpy()
        samplers, batch_rows = {}, {}
        for variant in variants:
            kind, how = variant.split("-", 1)
            row = dict(model=name, batch=b, variant=variant, device=device)
            batch_rows[variant] = row
            if kind in skipped:
                row["skipped"] = skipped[kind]
                continue
            module, dtype, _, note = built[kind]
            row["precision"] = {"eager": note, "graph": f"{note}, one CUDA graph",
                                "compiled": f"{note}, torch.compile default"}[how]
            if deadline.passed():
                row["skipped"] = "time limit (--max-seconds)"
            elif how == "graph" and not cuda:
                row["skipped"] = "CUDA graphs: CUDA only"
            elif how == "graph":
                try:
                    samplers[variant] = graph_sampler(module, x, dtype)
                except Exception as e:  # an op that cannot be captured
                    row["skipped"] = f"CUDA graph capture failed: {failure(e)}"
            else:
                samplers[variant] = ModuleRunner(compiled[kind] if how == "compiled" else module, device,
                                                 dtype).sampler(x)
        timings, failed = time_variants(samplers, args.seconds)
        for variant, t in timings.items():
            batch_rows[variant].update(t, images_per_s=b * 1000 / t["p50_ms"])
        for variant, why in failed.items():
            batch_rows[variant]["skipped"] = why
        for ref in ("fp16-compiled", "fp16-graph"):
            base = batch_rows.get(ref, {}).get("p50_ms")
            for row in batch_rows.values():
                if base and row.get("p50_ms"):
                    row[f"ratio_to_{ref.replace('-', '_')}"] = base / row["p50_ms"]
        rows += batch_rows.values()
        del samplers  # frees the captured graphs' memory
    # agreement of what was timed (eager and compiled; a graph replays the eager module), on the last batch's rows
    x_eval, source = eval_images(name, teacher, size, device, args.data_dir, gen)
    last = {r["variant"]: r for r in rows if r["batch"] == batches[-1]}
    for variant, row in last.items():
        kind, how = variant.split("-", 1)
        if row.get("p50_ms") is None or how == "graph" or deadline.passed():
            continue
        module, dtype, reference, _ = built[kind]
        try:
            row.update(agreement(compiled[kind] if how == "compiled" else module, reference, x_eval, dtype),
                       agreement_on=source)
        except Exception as e:  # the compiled module failing at the eval batch size
            row["agreement_error"] = failure(e)
    return rows


def throughput_rows(name: str, device: str, steps: int, deadline) -> list[dict]:
    """Synthesis and fine-tuning images x steps / s with the model's default recipe, for a few steps."""
    if deadline.passed():
        return [dict(model=name, stage=s, device=device, skipped="time limit (--max-seconds)")
                for s in ("synthesize", "finetune")]
    teacher = models_of(name)[1].to(device)
    recipe_path = resolve_recipe_path(None, name)
    rows = []
    overrides = {"steps": steps, **({"batch_size": 4} if device == "cpu" else {})}
    synth = load_synthesis_recipe(recipe_path, overrides)
    t0 = time.time()
    out = synthesize_batch(teacher, synth, teacher.pretrained_cfg, 0, torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    rows.append(dict(model=name, stage="synthesize", device=device, batch=synth.batch_size, steps=steps,
                     seconds=seconds, images_steps_per_s=synth.batch_size * steps / seconds))
    ft = load_finetune_recipe(recipe_path, {"epochs": 1})
    n = ft.batch_size * steps
    reps = (n + len(out["images"]) - 1) // len(out["images"])
    images = out["images"].float().repeat(reps, 1, 1, 1)[:n]
    labels = out["labels"].repeat(reps)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        save_image_set(tmp, name, images, labels, "benchmark", teacher.pretrained_cfg)
        ft = load_finetune_recipe(recipe_path, {"epochs": 1, "calib_images": min(n, 64), "milestones": [1]})
        record = finetune(teacher, name, None, tmp, parse_bits("w8a8"), ft, progress=False)
    seconds = record.train_minutes * 60
    rows.append(dict(model=name, stage="finetune", device=device, batch=ft.batch_size, steps=steps, seconds=seconds,
                     images_steps_per_s=n / seconds))
    return rows


def host_info() -> dict:
    cuda = torch.cuda.is_available()
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import timm
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "CPU",
            "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda, "driver": driver,
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "platform": platform.platform(), "python": platform.python_version()}


def markdown(result: dict) -> str:
    host = result["host"]
    lines = [f"# PyTorch back end: GPU speed ({host['device']})", "",
             f"torch {host['torch']}, CUDA {host['cuda']}, driver {host['driver']}, capability {host['capability']}, "
             f"timm {host['timm']}, Python {host['python']}, {host['platform']}; `{result['command']}` "
             f"({result.get('seconds', 0):.0f} s)", "",
             "| model | batch | variant | device | p50 ms | images/s | vs FP16 compiled | vs FP16 graph | "
             "agreement % | cosine | note |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else ""
        note = r.get("skipped") or r.get("precision", "")
        if r.get("agreement_on"):
            note += f" (agreement on {r['agreement_on']})"
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['device']} | {f('p50_ms', '%.3f')} | "
                     f"{f('images_per_s', '%.0f')} | {f('ratio_to_fp16_compiled', '%.2fx')} | "
                     f"{f('ratio_to_fp16_graph', '%.2fx')} | {f('agreement', '%.2f')} | {f('cosine', '%.5f')} | "
                     f"{note} |")
    lines += ["", "| model | stage | device | batch | steps | images x steps / s | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in result["throughput"]:
        rate = f"{r['images_steps_per_s']:.1f}" if r.get("images_steps_per_s") else ""
        lines.append(f"| {r['model']} | {r['stage']} | {r['device']} | {r.get('batch', '')} | {r.get('steps', '')} | "
                     f"{rate} | {r.get('skipped', '')} |")
    return "\n".join(lines) + "\n"


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def passed(self) -> bool:
        return time.time() > self.end


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--max-seconds", type=float, default=420.0, help="time limit of the whole run")
    ap.add_argument("--cpu-smoke", action="store_true", help="the reduced CPU run (automatic without CUDA)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seconds", type=float, default=1.0, help="least measured time per row")
    ap.add_argument("--steps", type=int, default=5, help="synthesis / fine-tuning steps timed")
    ap.add_argument("--student", type=Path, default=None, help="a fmnist-vit W8A8 student.pt for the INT8 rows")
    ap.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX files (agreement of fmnist-vit)")
    args = ap.parse_args()
    t_start = time.time()
    deadline = Deadline(args.max_seconds)
    models, variants = args.models.split(","), args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    result = {"host": host_info(), "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "rows": [],
              "throughput": []}
    w8 = None
    if args.student is not None:
        try:
            w8 = load_student(args.student)
        except MimiqError as e:
            sys.exit(str(e))
        if w8.model_name != "fmnist-vit" or w8.quant_config.name != "w8a8":
            sys.exit(f"--student must be a fmnist-vit w8a8 student, got {w8.model_name} {w8.quant_config.name}")

    def save():
        result["seconds"] = time.time() - t_start
        args.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out_dir / "gpu.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out_dir / "gpu.md", markdown(result))

    if cuda:
        for name in models:
            result["rows"] += model_rows(name, "cuda", batches, variants, args, deadline,
                                         w8 if name == "fmnist-vit" else None)
            save()
            torch.cuda.empty_cache()
        for name in models:  # after every latency row: the table the issue asks for comes first
            result["throughput"] += throughput_rows(name, "cuda", args.steps, deadline)
            save()
    else:
        why = "--cpu-smoke" if args.cpu_smoke else "no CUDA GPU on this host"
        result["rows"] += [dict(model=m, batch=b, variant=v, device="cuda", skipped=f"CUDA row skipped: {why}")
                           for m in models for b in batches for v in variants]
        result["throughput"] += [dict(model=m, stage=s, device="cuda", skipped=f"CUDA row skipped: {why}")
                                 for m in models for s in ("synthesize", "finetune")]
        # the reduced CPU run: fmnist-vit at batch 1, eager, and one step of each training stage
        result["rows"] += model_rows("fmnist-vit", "cpu", [1], ("fp16-eager", "int8-eager", "w4a16-eager",
                                                                "fp8-eager"), args, deadline, w8)
        result["throughput"] += throughput_rows("fmnist-vit", "cpu", 1, deadline)
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
