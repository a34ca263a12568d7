"""The run report: report.json (every figure of every stage, versions, device, recipe) and
report.md (the same as tables, with plots), plus the summary table printed at the end."""
import copy
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from .evaluate import eval_dataset, evaluate
from .io import atomic_write, atomic_write_text
from .quant import QuantConfig, collect_activations, quantize_model
from .run_dir import RunDir
from .synthesize import load_synthetic, mean_inter_head_similarity


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    versions = {p: _version(p) for p in ("torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                                         "mimiq-deploy")}
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


def write_report(run_dir: Path, teacher, model_name: str, recipe_path, timings: dict, val_dir=None, data_dir=None) -> dict:
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    dataset, dataset_name = eval_dataset(teacher, val_dir, data_dir)
    report = rd.read(rd.report_json) or {}
    if report.get("teacher", {}).get("dataset") != dataset_name:
        report["teacher"] = {"dataset": dataset_name, **evaluate(teacher, dataset, progress=False)}
    images, labels, manifest = load_synthetic(run_dir)
    real_pairs = [dataset[i] for i in range(min(256, len(dataset)))]
    real = torch.stack([x for x, _ in real_pairs])
    report["inter_head_similarity"] = {"synthetic": mean_inter_head_similarity(teacher, images[:256]),
                                       "real": mean_inter_head_similarity(teacher, real),
                                       "synthetic_kind": manifest["kind"], "n": 256}
    report["activation_ranges"] = activation_ranges(teacher, images[:256], real)
    report.update(model=model_name, recipe=str(recipe_path) if recipe_path else None,
                  pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in teacher.pretrained_cfg.items()
                                  if isinstance(v, (str, int, float, list, tuple, type(None)))},
                  synthesize=manifest, finetune=rd.read(rd.finetune_record), export=rd.read(rd.export_record),
                  build=rd.read(rd.build_record), verify=rd.read(rd.verify_record), bench=rd.read(rd.bench_record),
                  stage_seconds=timings, **environment())
    rd.write(rd.report_json, report)
    plots = _plots(run_dir, report)
    plots.append(_image_grid(run_dir, images, labels, real, torch.tensor([int(y) for _, y in real_pairs]), manifest))
    atomic_write_text(rd.report_md, render_markdown(report, plots))
    return report


def activation_ranges(teacher, synthetic: torch.Tensor, real: torch.Tensor) -> dict:
    """99.9th percentile of |x| at every activation quantizer's input, on synthetic and on real images:
    what calibration sees (a set whose ranges stray far from the real ones gives the wrong step sizes)."""
    probe = quantize_model(copy.deepcopy(teacher), QuantConfig())
    out = {"percentile": 99.9, "names": [], "synthetic": [], "real": []}
    syn, ref = collect_activations(probe, synthetic), collect_activations(probe, real)
    for name in ref:
        out["names"].append(name)
        for key, acts in (("synthetic", syn), ("real", ref)):
            out[key].append(torch.quantile(acts[name].abs().double(), 0.999).item())
    return out


def summary_rows(report: dict) -> list[tuple]:
    """(artifact, precision, top-1 %, agreement %, p50 ms at batch 1, p50 ms at the largest batch)."""
    v, b = report.get("verify") or {}, report.get("bench") or {}
    rows = [("teacher (PyTorch fp32)", "fp32", report["teacher"]["top1"], None, None, None),
            ("student (PyTorch fake-quant)", report["export"]["bits"] if report.get("export") else "",
             v.get("student_top1"), 100.0, None, None)]
    batches = sorted({r["batch"] for r in b.get("rows", [])})
    for name, r in v.get("artifacts", {}).items():
        lat = {x["batch"]: x["p50_ms"] for x in b.get("rows", []) if x["artifact"] == name}
        rows.append((name, r["precision"], r["top1"], r["agreement"], lat.get(batches[0]) if batches else None,
                     lat.get(batches[-1]) if batches else None))
    return rows


def format_summary(report: dict) -> str:
    b = report.get("bench") or {}
    batches = sorted({r["batch"] for r in b.get("rows", [])}) or [None]
    head = f"{'':<30} {'precision':<26} {'top-1 %':>8} {'agree %':>8} {f'p50 ms b{batches[0]}':>11} {f'p50 ms b{batches[-1]}':>11}"
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    lines = [head] + [f"{n:<30} {p[:26]:<26} {fmt(t, '8.2f'):>8} {fmt(a, '8.2f'):>8} {fmt(l1, '11.3f'):>11} "
                      f"{fmt(l2, '11.3f'):>11}" for n, p, t, a, l1, l2 in summary_rows(report)]
    for reason in (report.get("build") or {}).get("skipped", {}).values():
        lines.append(reason)
    return "\n".join(lines)


def _plots(run_dir: Path, report: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = summary_rows(report)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r[0] for r in rows], [r[2] or 0 for r in rows], color="tab:blue")
    ax.set_xlabel(f"top-1 % on {report['teacher']['dataset']}")
    lo = min(r[2] for r in rows if r[2] is not None)
    ax.set_xlim(max(0, lo - 5), 100)
    _save_png(fig, RunDir(run_dir).plot("accuracy.png"))
    made.append("accuracy.png")
    bench_rows = (report.get("bench") or {}).get("rows", [])
    if bench_rows:
        fig, ax = plt.subplots(figsize=(7, 3))
        batches = sorted({r["batch"] for r in bench_rows})
        names = list(dict.fromkeys(r["artifact"] for r in bench_rows))
        width = 0.8 / max(1, len(batches))
        for i, bsz in enumerate(batches):
            vals = [next((r["p50_ms"] for r in bench_rows if r["artifact"] == n and r["batch"] == bsz), 0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"batch {bsz}")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel("p50 latency (ms)"); ax.set_yscale("log"); ax.legend()
        _save_png(fig, RunDir(run_dir).plot("latency.png"))
        made.append("latency.png")
    ranges = report["activation_ranges"]
    fig, ax = plt.subplots(figsize=(9, 3))
    for key, color in (("synthetic", "tab:orange"), ("real", "tab:green")):
        ax.plot(ranges[key], marker=".", color=color, label=key)
    ax.set_xticks(range(len(ranges["names"])), [n.replace("blocks.", "b").replace("_quant", "") for n in ranges["names"]],
                  rotation=90, fontsize=5)
    ax.set_ylabel("p99.9 |x|"); ax.set_yscale("log"); ax.legend()
    ax.set_title("input range of each activation quantizer")
    _save_png(fig, RunDir(run_dir).plot("activation_ranges.png"))
    made.append("activation_ranges.png")
    curve, history = report["synthesize"].get("loss_curve"), (report.get("finetune") or {}).get("history")
    if curve or history:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        for key in [k for k in (curve or {}) if k not in ("step", "total", "tv", "teacher_top1", "student_top1")]:
            axes[0].plot(curve["step"], curve[key], label=key)
        axes[0].set_xlabel("synthesis step"); axes[0].set_title("synthesis losses (mean over shards)")
        for key in ("kl", "had"):
            if history and any(h.get(key) for h in history):
                axes[1].plot([h["epoch"] for h in history], [h[key] for h in history], marker=".", label=key)
        axes[1].set_xlabel("fine-tuning epoch"); axes[1].set_title("fine-tuning losses (epoch means)")
        for ax in axes:
            ax.legend()
        _save_png(fig, RunDir(run_dir).plot("loss_curves.png"))
        made.append("loss_curves.png")
    sim = report["inter_head_similarity"]
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.bar([f"synthetic ({sim['synthetic_kind']})", "real"], [sim["synthetic"], sim["real"]], color=["tab:orange", "tab:green"])
    ax.set_ylabel("mean inter-head |SSIM|")
    _save_png(fig, RunDir(run_dir).plot("inter_head_similarity.png"))
    made.append("inter_head_similarity.png")
    return made


def _image_grid(run_dir: Path, images, labels, real, real_labels, manifest: dict, per_class: int = 2) -> str:
    """Synthetic images beside real ones of the same classes (two rows per class at most 10 classes)."""
    import matplotlib.pyplot as plt

    mean = torch.tensor(manifest["mean"]).view(-1, 1, 1)
    std = torch.tensor(manifest["std"]).view(-1, 1, 1)
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
    _save_png(fig, RunDir(run_dir).plot("synthetic_vs_real.png"))
    return "synthetic_vs_real.png"


def render_markdown(report: dict, plots: list[str]) -> str:
    v, b, s = report.get("verify") or {}, report.get("bench") or {}, report["synthesize"]
    out = [f"# mimiq-deploy run: {report['model']} {report['export']['bits'] if report.get('export') else ''}", "",
           f"Eval set: {report['teacher']['dataset']} ({report['teacher']['n']} images). "
           f"Device: {report['device']}. Versions: {report['versions']}.", "",
           "## Accuracy and agreement with the fake-quant student", "",
           "| model | precision | top-1 % | agreement % | cosine | max abs err |", "|---|---|---|---|---|---|",
           f"| teacher (PyTorch) | fp32 | {report['teacher']['top1']:.2f} | | | |",
           f"| student (PyTorch fake-quant) | {report['export']['bits']} | {v.get('student_top1', 0):.2f} | 100 | 1 | 0 |"]
    for name, r in v.get("artifacts", {}).items():
        out.append(f"| {name} | {r['precision']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['cosine']:.5f} | "
                   f"{r['max_abs_error']:.4f} |")
    enc = (report.get("build") or {}).get("ort_encoding")
    if enc:
        out += ["", f"ONNX Runtime 8-bit encoding chosen by build: **{enc['encoding']}** ({enc['reason']})."]
    out += ["", "## Latency and throughput", "", "| artifact | batch | p50 ms | p90 ms | p99 ms | images/s |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['artifact']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['throughput_ips']:.0f} |" for r in b.get("rows", [])]
    out += [f"- speed-up of {x['quantized']} over {x['float']} at batch {x['batch']} (p50 ratio): "
            f"{x['float_over_quantized_p50']:.2f}x"
            for x in b.get("speedups", [])]
    out += [f"- {reason}" for reason in b.get("skipped", {}).values()]
    if b.get("profiles"):
        out += ["", "Time by op type (ONNX Runtime profiler, share of kernel time):", ""]
        out += [f"- {p['artifact']} batch {p['batch']}: " + ", ".join(f"{g} {v:.0f}%" for g, v in p["by_group"].items()
                                                                  if v >= 0.5) for p in b["profiles"]]
    sim = report["inter_head_similarity"]
    out += ["", "## Synthetic calibration set", "",
            f"{s['num_images_done']} {s['kind']} images; final losses {s.get('final_losses')}; "
            f"mean inter-head |SSIM| synthetic {sim['synthetic']:.4f} vs real {sim['real']:.4f} ({sim['n']} images each).",
            "", "## Stage wall time (s)", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {t:.1f} |" for k, t in report["stage_seconds"].items()]
    out += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)
