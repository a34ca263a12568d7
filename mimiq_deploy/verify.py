"""`mimiq-deploy verify`: does each deployed artifact compute what the fake-quant student computed?

The same inputs go to the PyTorch student and to every artifact of build.json; reported:
top-1 agreement with the student, mean logit cosine similarity, max abs logit error, and
top-1 accuracy on the labelled eval set. Weight-only artifacts (W4A16: INT4 weights, float activations) are
compared with what they implement, the student with its activation quantizers off.
"""
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .backends import BACKENDS
from .evaluate import eval_dataset, top1_correct
from .export import stored_export_config
from .quant.convert import set_quant_enabled
from .quant.student import load_student
from .run_dir import RunDir, VerifyRecord, VerifyRow


@dataclasses.dataclass
class _Tally:
    agree: int = 0
    correct: int = 0
    cosine_sum: float = 0.0
    max_err: float = 0.0


@torch.no_grad()
def verify(run_dir, val_dir: Path | None = None, data_dir: Path | None = None, limit: int | None = None,
           batch_size: int = 250, progress: bool = True, trust: bool = False) -> dict:
    """trust: unpickle the teacher checkpoint named in student.pt fully (`--trust-checkpoint`)."""
    rd = RunDir.of(run_dir)
    built = rd.read_build()
    thresholds = stored_export_config(rd.read_export()).verify
    student = load_student(rd.require_student(), trust=trust)
    dataset, dataset_name = eval_dataset(student, val_dir, data_dir)
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    runners = {name: BACKENDS[a.backend].runner(a) for name, a in built.artifacts.items()}
    tallies = {name: _Tally() for name in runners}
    weight_only = {name for name, a in built.artifacts.items() if a.weight_only}
    weight_only_student = None
    if weight_only:
        weight_only_student = copy.deepcopy(student)
        set_quant_enabled(weight_only_student, False, activations_only=True)
    student_correct = n = 0
    for x, y in tqdm(DataLoader(dataset, batch_size), desc="verify", unit="batch", disable=not progress):
        full = student(x).numpy()
        student_correct += top1_correct(full, y.numpy())
        n += len(y)
        refs = {False: full, True: weight_only_student(x).numpy() if weight_only_student is not None else None}
        for name, run in runners.items():
            out, t, ref = run(x.numpy()), tallies[name], refs[name in weight_only]
            t.agree += top1_correct(out, ref.argmax(1))
            t.correct += top1_correct(out, y.numpy())
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
            t.cosine_sum += float(cos.sum())
            t.max_err = max(t.max_err, float(np.abs(out - ref).max()))
    record = VerifyRecord(dataset_name, n, 100.0 * student_correct / n, thresholds=dataclasses.asdict(thresholds))
    for name, t in tallies.items():
        art = built.artifacts[name]
        # Thresholds bind artifacts that implement the student's arithmetic (integer QDQ graphs, and weight-only
        # ones against the weight-only student); float twins compute something else on purpose.
        row = VerifyRow(art.precision, 100.0 * t.agree / n, t.cosine_sum / n, t.max_err, 100.0 * t.correct / n,
                        checked=art.quantized,
                        reference="weight-only student" if art.weight_only else "student")
        if row.checked and (row.agreement < thresholds.min_agreement or row.cosine < thresholds.min_cosine):
            record.failed.append(name)
        record.artifacts[name] = row
    rd.write_verify(record)
    return record.to_json()


def format_verify(report: VerifyRecord | dict) -> str:
    """verify's table; takes the record or verify()'s return value."""
    report = VerifyRecord.from_json(report) if isinstance(report, dict) else report
    lines = [f"verify on {report.dataset} ({report.n} images); fake-quant student top-1 {report.student_top1:.2f}%",
             f"{'artifact':<22} {'precision':<28} {'agree %':>8} {'cosine':>8} {'max err':>9} {'top-1 %':>8}  check"]
    for name, r in report.artifacts.items():
        verdict = ("FAIL" if name in report.failed else "ok") if r.checked else "-"
        mark = "*" if r.reference != "student" else " "
        lines.append(f"{name:<22}{mark}{r.precision[:28]:<28} {r.agreement:8.2f} {r.cosine:8.5f} "
                     f"{r.max_abs_error:9.4f} {r.top1:8.2f}  {verdict}")
    if any(r.reference != "student" for r in report.artifacts.values()):
        lines.append("* weight-only: against the student with its activation quantizers off")
    return "\n".join(lines)
