"""How close each fine-tuned student of an accuracy.py run stays to its teacher, not only to the labels.

Where a quantized student is as good as its teacher (W8A8, W4A8 on the embedded default), its top-1 moves by a
few hundredths either way with which of the images the teacher gets wrong it happens to copy: a top-1 difference
between two rows there says little. Agreement with the teacher's top-1 and the KL divergence from the teacher's
output distribution measure what fine-tuning aims at. Reads the students of finished runs; trains nothing.

    python benchmarks/agreement.py --out runs/w3a3-grid7 --bits w8a8,w4a8 --rows 2,6 --seeds 0,1,2
"""
import argparse
import statistics
from pathlib import Path

import torch

from accuracy import ROWS, eval_split
from mimiq_deploy.evaluate import top1_correct
from mimiq_deploy.models import load_model
from mimiq_deploy.quant.student import load_student


@torch.no_grad()
def logits(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def mean_std(values: list) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-vit", choices=["fmnist-vit", "fmnist-swin"])
    ap.add_argument("--out", required=True, help="the --out directory of a finished accuracy.py run")
    ap.add_argument("--bits", default="w8a8,w4a8")
    ap.add_argument("--rows", default="2,6")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    args = ap.parse_args()
    teacher = load_model(args.model).eval()
    x, y = eval_split(args.split, teacher.pretrained_cfg)
    t = logits(teacher, x)
    print(f"teacher top-1 {100 * top1_correct(t, y) / len(y):.2f} on {args.split} ({len(y)} images)\n")
    print("| row | bits | top-1 | agreement with the teacher (%) | KL(teacher ‖ student) ×1e3 |")
    print("|---|---|---|---|---|")
    for row in args.rows.split(","):
        for bits in args.bits.split(","):
            top1, agree, kl = [], [], []
            for seed in args.seeds.split(","):
                runs = sorted(Path(args.out).glob(f"*-s{seed}-{bits}-{row}/student.pt"))
                if len(runs) != 1:
                    raise SystemExit(f"error: expected one finished run *-s{seed}-{bits}-{row} in {args.out}, "
                                     f"found {len(runs)}")
                s = logits(load_student(runs[0]).eval(), x)
                top1.append(100 * top1_correct(s, y) / len(y))
                agree.append(100 * top1_correct(s, t.argmax(1)) / len(y))
                kl.append(torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True,
                                                     reduction="batchmean").item() * 1e3)
            print(f"| {ROWS[int(row) - 1]} | {bits.upper()} | {mean_std(top1)} | {mean_std(agree)} | "
                  f"{mean_std(kl)} |", flush=True)


if __name__ == "__main__":
    main()
