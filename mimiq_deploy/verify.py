"""`mimiq-deploy verify`: does each deployed artifact compute what the fake-quant student computed?

The same inputs go to the PyTorch student and to every artifact of build.json; reported:
top-1 agreement with the student, mean logit cosine similarity, max abs logit error, and
top-1 accuracy on the labelled eval set.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .backends import BACKENDS
from .evaluate import eval_dataset, top1_correct
from .export import stored_export_config
from .quant.student import load_student
from .run_dir import RunDir


@torch.no_grad()
def verify(run_dir: Path, val_dir: Path | None = None, data_dir: Path | None = None, limit: int | None = None,
           batch_size: int = 250, progress: bool = True, trust: bool = False) -> dict:
    """trust: unpickle the teacher checkpoint named in student.pt fully (`--trust-checkpoint`)."""
    rd = RunDir(run_dir)
    built = rd.read_build()
    cfg = stored_export_config(rd.read_export().config, f"{rd.export_record} [config]")
    student = load_student(rd.require_student(), trust=trust)
    dataset, dataset_name = eval_dataset(student, val_dir, data_dir)
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    runners = {name: BACKENDS[a.backend].load_artifact(a) for name, a in built.artifacts.items()}
    stats = {name: {"agree": 0, "correct": 0, "cos": 0.0, "max_err": 0.0} for name in runners}
    student_correct = n = 0
    for x, y in tqdm(DataLoader(dataset, batch_size), desc="verify", unit="batch", disable=not progress):
        ref = student(x).numpy()
        student_correct += top1_correct(ref, y.numpy())
        n += len(y)
        for name, run in runners.items():
            out = run(x.numpy())
            s = stats[name]
            s["agree"] += top1_correct(out, ref.argmax(1))
            s["correct"] += top1_correct(out, y.numpy())
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
            s["cos"] += float(cos.sum())
            s["max_err"] = max(s["max_err"], float(np.abs(out - ref).max()))
    report = {"dataset": dataset_name, "n": n, "student_top1": 100.0 * student_correct / n, "artifacts": {},
              "thresholds": {"min_agreement": cfg.min_agreement, "min_cosine": cfg.min_cosine}, "failed": []}
    for name, s in stats.items():
        art = built.artifacts[name]
        row = {"precision": art.precision, "agreement": 100.0 * s["agree"] / n, "cosine": s["cos"] / n,
               "max_abs_error": s["max_err"], "top1": 100.0 * s["correct"] / n}
        # Thresholds bind artifacts that implement the student's arithmetic (integer QDQ graphs);
        # float twins and weight-only engines compute something else on purpose.
        row["checked"] = art.quantized and not art.weight_only
        if row["checked"] and (row["agreement"] < cfg.min_agreement or row["cosine"] < cfg.min_cosine):
            report["failed"].append(name)
        report["artifacts"][name] = row
    rd.write(rd.verify_record, report)
    return report


def format_verify(report: dict) -> str:
    lines = [f"verify on {report['dataset']} ({report['n']} images); fake-quant student top-1 {report['student_top1']:.2f}%",
             f"{'artifact':<22} {'precision':<28} {'agree %':>8} {'cosine':>8} {'max err':>9} {'top-1 %':>8}  check"]
    for name, r in report["artifacts"].items():
        verdict = ("FAIL" if name in report["failed"] else "ok") if r["checked"] else "-"
        lines.append(f"{name:<22} {r['precision'][:28]:<28} {r['agreement']:8.2f} {r['cosine']:8.5f} "
                     f"{r['max_abs_error']:9.4f} {r['top1']:8.2f}  {verdict}")
    return "\n".join(lines)
