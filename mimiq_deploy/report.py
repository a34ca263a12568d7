"""The run report: report.json (every figure of every stage, versions, device, recipe) and
report.md (the same as tables, with plots), plus the summary table printed at the end."""
import copy
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from .backends import BACKENDS
from .evaluate import eval_dataset, evaluate
from .io import atomic_write, atomic_write_text
from .quant import QuantConfig, collect_activations, quantize_model
from .run_dir import ActivationRanges, BenchRecord, HeadSimilarity, ReportRecord, RunDir, SynthManifest, VerifyRecord
from .synthesize import load_synthetic, mean_inter_head_similarity


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    packages = ("torch", "timm", "onnx", *(p for b in BACKENDS.values() for p in b.packages), "mimiq-deploy")
    versions = {p: _version(p) for p in dict.fromkeys(packages)}
    device = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        device["gpu"] = torch.cuda.get_device_name(0)
    return {"versions": versions, "device": device}


def _save_png(fig, path: Path) -> None:
    """A plot written under a temporary name, then renamed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_report(run_dir: Path | RunDir, teacher, model_name: str, recipe_path, timings: dict, val_dir=None,
                 data_dir=None) -> ReportRecord:
    rd = RunDir.of(run_dir)
    dataset, dataset_name = eval_dataset(teacher, val_dir, data_dir)
    old = rd.read_report()
    teacher_eval = old.teacher if old and old.teacher and old.teacher.dataset == dataset_name else None
    if teacher_eval is None:
        teacher_eval = evaluate(teacher, dataset, progress=False)
        teacher_eval.dataset = dataset_name
    images, labels, manifest = load_synthetic(rd)
    real_pairs = [dataset[i] for i in range(min(256, len(dataset)))]
    real = torch.stack([x for x, _ in real_pairs])
    report = ReportRecord(
        teacher=teacher_eval,
        inter_head_similarity=HeadSimilarity(mean_inter_head_similarity(teacher, images[:256]),
                                             mean_inter_head_similarity(teacher, real), manifest.kind, 256),
        activation_ranges=activation_ranges(teacher, images[:256], real),
        model=model_name, recipe=str(recipe_path) if recipe_path else None,
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in teacher.pretrained_cfg.items()
                        if isinstance(v, (str, int, float, list, tuple, type(None)))},
        synthesize=manifest, finetune=rd.read_finetune(),
        export=rd.read_export() if rd.export_record.exists() else None,
        build=rd.read_build() if rd.build_record.exists() else None, verify=rd.read_verify(), bench=rd.read_bench(),
        stage_seconds=timings, **environment())
    rd.write_report(report)
    plots = _plots(rd, report)
    plots.append(_image_grid(rd, images, labels, real, torch.tensor([int(y) for _, y in real_pairs]), manifest))
    atomic_write_text(rd.report_md, render_markdown(report, plots))
    return report


def activation_ranges(teacher, synthetic: torch.Tensor, real: torch.Tensor) -> ActivationRanges:
    """99.9th percentile of |x| at every activation quantizer's input, on synthetic and on real images:
    what calibration sees (a set whose ranges stray far from the real ones gives the wrong step sizes)."""
    probe = quantize_model(copy.deepcopy(teacher), QuantConfig())
    out = ActivationRanges(percentile=99.9)
    syn, ref = collect_activations(probe, synthetic), collect_activations(probe, real)
    for name in ref:
        out.names.append(name)
        out.synthetic.append(torch.quantile(syn[name].abs().double(), 0.999).item())
        out.real.append(torch.quantile(ref[name].abs().double(), 0.999).item())
    return out


def summary_rows(report: ReportRecord) -> list[tuple]:
    """(artifact, precision, top-1 %, agreement %, p50 ms at batch 1, p50 ms at the largest batch)."""
    v, b = report.verify or VerifyRecord(), report.bench or BenchRecord()
    rows = [("teacher (PyTorch fp32)", "fp32", report.teacher.top1, None, None, None),
            ("student (PyTorch fake-quant)", report.export.bits if report.export else "",
             v.student_top1 if report.verify else None, 100.0, None, None)]
    batches = b.batches
    for name, r in v.artifacts.items():
        rows.append((name, r.precision, r.top1, r.agreement, b.p50(name, batches[0]) if batches else None,
                     b.p50(name, batches[-1]) if batches else None))
    return rows


def format_summary(report: ReportRecord) -> str:
    batches = (report.bench or BenchRecord()).batches or [None]
    head = f"{'':<30} {'precision':<26} {'top-1 %':>8} {'agree %':>8} {f'p50 ms b{batches[0]}':>11} {f'p50 ms b{batches[-1]}':>11}"
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    lines = [head] + [f"{n:<30} {p[:26]:<26} {fmt(t, '8.2f'):>8} {fmt(a, '8.2f'):>8} {fmt(l1, '11.3f'):>11} "
                      f"{fmt(l2, '11.3f'):>11}" for n, p, t, a, l1, l2 in summary_rows(report)]
    for reason in (report.build.skipped if report.build else {}).values():
        lines.append(reason)
    return "\n".join(lines)


def _plots(rd: RunDir, report: ReportRecord) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = summary_rows(report)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r[0] for r in rows], [r[2] or 0 for r in rows], color="tab:blue")
    ax.set_xlabel(f"top-1 % on {report.teacher.dataset}")
    lo = min(r[2] for r in rows if r[2] is not None)
    ax.set_xlim(max(0, lo - 5), 100)
    _save_png(fig, rd.plot("accuracy.png"))
    made.append("accuracy.png")
    bench = report.bench or BenchRecord()
    if bench.rows:
        fig, ax = plt.subplots(figsize=(7, 3))
        batches = bench.batches
        names = list(dict.fromkeys(r.artifact for r in bench.rows))
        width = 0.8 / max(1, len(batches))
        for i, bsz in enumerate(batches):
            vals = [bench.p50(n, bsz) or 0 for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"batch {bsz}")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel("p50 latency (ms)"); ax.set_yscale("log"); ax.legend()
        _save_png(fig, rd.plot("latency.png"))
        made.append("latency.png")
    ranges = report.activation_ranges
    fig, ax = plt.subplots(figsize=(9, 3))
    for values, label, color in ((ranges.synthetic, "synthetic", "tab:orange"), (ranges.real, "real", "tab:green")):
        ax.plot(values, marker=".", color=color, label=label)
    ax.set_xticks(range(len(ranges.names)), [n.replace("blocks.", "b").replace("_quant", "") for n in ranges.names],
                  rotation=90, fontsize=5)
    ax.set_ylabel("p99.9 |x|"); ax.set_yscale("log"); ax.legend()
    ax.set_title("input range of each activation quantizer")
    _save_png(fig, rd.plot("activation_ranges.png"))
    made.append("activation_ranges.png")
    curve, history = report.synthesize.loss_curve, report.finetune.history if report.finetune else []
    if curve or history:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        steps = (curve or {}).get("step")
        for key, values in (curve or {}).items():
            if key not in ("step", "total", "tv", "teacher_top1", "student_top1"):
                axes[0].plot(steps, values, label=key)
        axes[0].set_xlabel("synthesis step"); axes[0].set_title("synthesis losses (mean over shards)")
        epochs = [h.epoch for h in history]
        for label, values in (("kl", [h.kl for h in history]), ("had", [h.had for h in history])):
            if any(values):
                axes[1].plot(epochs, values, marker=".", label=label)
        axes[1].set_xlabel("fine-tuning epoch"); axes[1].set_title("fine-tuning losses (epoch means)")
        for ax in axes:
            ax.legend()
        _save_png(fig, rd.plot("loss_curves.png"))
        made.append("loss_curves.png")
    sim = report.inter_head_similarity
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.bar([f"synthetic ({sim.synthetic_kind})", "real"], [sim.synthetic, sim.real], color=["tab:orange", "tab:green"])
    ax.set_ylabel("mean inter-head |SSIM|")
    _save_png(fig, rd.plot("inter_head_similarity.png"))
    made.append("inter_head_similarity.png")
    return made


def _image_grid(rd: RunDir, images, labels, real, real_labels, manifest: SynthManifest, per_class: int = 2) -> str:
    """Synthetic images beside real ones of the same classes (two rows per class at most 10 classes)."""
    import matplotlib.pyplot as plt

    mean = torch.tensor(manifest.mean).view(-1, 1, 1)
    std = torch.tensor(manifest.std).view(-1, 1, 1)
    classes = [c for c in sorted(set(labels.tolist())) if (real_labels == c).any()][:10] or sorted(set(labels.tolist()))[:10]
    fig, axes = plt.subplots(len(classes), 2 * per_class, figsize=(2 * per_class * 0.9, len(classes) * 0.9), squeeze=False)
    for row, c in enumerate(classes):
        syn = images[labels == c][:per_class]
        ref = real[real_labels == c][:per_class]
        for col in range(2 * per_class):
            ax = axes[row][col]
            ax.axis("off")
            src, i = (syn, col) if col < per_class else (ref, col - per_class)
            if i < len(src):
                pixels = (src[i].float() * std + mean).clamp(0, 1)
                ax.imshow(pixels.permute(1, 2, 0).squeeze(-1), cmap="gray" if pixels.shape[0] == 1 else None,
                          vmin=0, vmax=1)
            if row == 0:
                ax.set_title("synthetic" if col < per_class else "real", fontsize=6)
        axes[row][0].text(-0.1, 0.5, str(c), transform=axes[row][0].transAxes, ha="right", va="center", fontsize=6)
    _save_png(fig, rd.plot("synthetic_vs_real.png"))
    return "synthetic_vs_real.png"


def render_markdown(report: ReportRecord, plots: list[str]) -> str:
    v, b, s = report.verify or VerifyRecord(), report.bench or BenchRecord(), report.synthesize
    bits = report.export.bits if report.export else ""
    out = [f"# mimiq-deploy run: {report.model} {bits}", "",
           f"Eval set: {report.teacher.dataset} ({report.teacher.n} images). "
           f"Device: {report.device}. Versions: {report.versions}.", "",
           "## Accuracy and agreement with the fake-quant student", "",
           "| model | precision | top-1 % | agreement % | cosine | max abs err |", "|---|---|---|---|---|---|",
           f"| teacher (PyTorch) | fp32 | {report.teacher.top1:.2f} | | | |",
           f"| student (PyTorch fake-quant) | {bits} | {v.student_top1:.2f} | 100 | 1 | 0 |"]
    for name, r in v.artifacts.items():
        against = "" if r.reference == "student" else f" (against the {r.reference}: activation quantizers off)"
        out.append(f"| {name} | {r.precision}{against} | {r.top1:.2f} | {r.agreement:.2f} | {r.cosine:.5f} | "
                   f"{r.max_abs_error:.4f} |")
    for name, info in (report.build.backends if report.build else {}).items():  # what each back end's build chose
        lines = BACKENDS[name].report_lines(info) if name in BACKENDS else []
        out += ["", *lines] if lines else []
    out += ["", "## Latency and throughput", "", "| artifact | batch | p50 ms | p90 ms | p99 ms | images/s |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r.artifact} | {r.batch} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | {r.p99_ms:.3f} | "
            f"{r.throughput_ips:.0f} |" for r in b.rows]
    out += [f"- speed-up of {x.quantized} over {x.float} at batch {x.batch} (p50 ratio): "
            f"{x.float_over_quantized_p50:.2f}x"
            for x in b.speedups]
    out += [f"- {reason}" for reason in b.skipped.values()]
    if b.profiles:
        out += ["", "Time by op type (ONNX Runtime profiler, share of kernel time):", ""]
        out += [f"- {p.artifact} batch {p.batch}: " + ", ".join(f"{g} {v:.0f}%" for g, v in p.by_group.items()
                                                                if v >= 0.5) for p in b.profiles]
    sim = report.inter_head_similarity
    out += ["", "## Synthetic calibration set", "",
            f"{s.num_images_done} {s.kind} images; final losses {s.final_losses}; "
            f"mean inter-head |SSIM| synthetic {sim.synthetic:.4f} vs real {sim.real:.4f} ({sim.n} images each).",
            "", "## Stage wall time (s)", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {t:.1f} |" for k, t in report.stage_seconds.items()]
    out += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)
