"""The run report: report.json (every figure of every stage, versions, device, recipe) and
report.md (the same as tables, with plots), plus the summary table printed at the end."""
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from .evaluate import eval_dataset, evaluate
from .errors import atomic_write_json, atomic_write_text


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


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _save_png(fig, path: Path) -> None:
    """A plot written under a temporary name, then renamed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_report(run_dir: Path, teacher, model_name: str, recipe_path, timings: dict, val_dir=None, data_dir=None) -> dict:
    from .synthesize import load_synthetic, mean_inter_head_similarity

    run_dir = Path(run_dir)
    dataset, dataset_name = eval_dataset(teacher, val_dir, data_dir)
    report = _load(run_dir / "report.json") or {}
    if report.get("teacher", {}).get("dataset") != dataset_name:
        report["teacher"] = {"dataset": dataset_name, **evaluate(teacher, dataset, progress=False)}
    images, _, manifest = load_synthetic(run_dir)
    real = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))])
    report["inter_head_similarity"] = {"synthetic": mean_inter_head_similarity(teacher, images[:256]),
                                       "real": mean_inter_head_similarity(teacher, real),
                                       "synthetic_kind": manifest["kind"], "n": 256}
    report.update(model=model_name, recipe=str(recipe_path) if recipe_path else None,
                  pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in teacher.pretrained_cfg.items()
                                  if isinstance(v, (str, int, float, list, tuple, type(None)))},
                  synthesize=manifest, finetune=_load(run_dir / "finetune.json"),
                  export=_load(run_dir / "export" / "export.json"), build=_load(run_dir / "build.json"),
                  verify=_load(run_dir / "verify.json"), bench=_load(run_dir / "bench.json"),
                  stage_seconds=timings, **environment())
    atomic_write_json(run_dir / "report.json", report)
    plots = _plots(run_dir, report)
    atomic_write_text(run_dir / "report.md", render_markdown(report, plots))
    return report


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
    _save_png(fig, run_dir / "accuracy.png")
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
        _save_png(fig, run_dir / "latency.png")
        made.append("latency.png")
    sim = report["inter_head_similarity"]
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.bar([f"synthetic ({sim['synthetic_kind']})", "real"], [sim["synthetic"], sim["real"]], color=["tab:orange", "tab:green"])
    ax.set_ylabel("mean inter-head |SSIM|")
    _save_png(fig, run_dir / "inter_head_similarity.png")
    made.append("inter_head_similarity.png")
    return made


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
