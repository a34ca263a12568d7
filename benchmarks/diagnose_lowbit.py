"""Why a calibration set works or not at low bits: what the activation quantizers see on each set.

For image sets made by benchmarks/accuracy.py (run directories holding `synth/`) and real
validation images, prints per activation quantizer: max |x| and the 99.9th percentile of |x|
relative to the real images, the MSE-calibrated step size relative to the one real images give;
then the validation top-1 of the PTQ student calibrated on each set with each estimator; and
(--sensitivity) the top-1 with only one quantizer group at the low bit width (real-image scales);
(--probs) what the attention probabilities keep on a signed and on an unsigned grid (levels, share
rounded to 0, row sums) and how close the PTQ student's head outputs are to the teacher's (L_HAD's SSIM).

    python benchmarks/diagnose_lowbit.py --bits w3a3 runs/benchmark/{mimiq,base,noise,real}-s0
"""
import argparse
import copy
import dataclasses
from pathlib import Path

import torch

from accuracy import eval_split

from mimiq_deploy.finetune import build_student
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import calibrate, collect_activations, parse_bits, quant_modules
from mimiq_deploy.quant.quantizer import activation_step
from mimiq_deploy.synthesize import load_synthetic
from mimiq_deploy.teacher import accuracy


def short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".attn", "").replace("_quant", "").replace("patch_embed.proj", "stem")


def probabilities_report(teacher, cfg, sets: dict, n: int = 128) -> None:
    """Per set, on its first n images: PTQ student (calibrated on them) with a signed and an unsigned grid
    for the attention probabilities: levels used, share at 0, row sum (last layer), head-output SSIM."""
    from mimiq_deploy.attention import AttentionRecorder
    from mimiq_deploy.similarity import global_ssim

    print(f"\nattention probabilities at {cfg.name} (PTQ on the set's first {n} images)")
    for k, images in sets.items():
        x = images[:n]
        t_rec = AttentionRecorder(teacher, logits=False, outputs=True, maps=True)
        with torch.no_grad():
            teacher(x)
        t_rec.remove()
        for unsigned in (False, True):
            s = build_student(teacher, dataclasses.replace(cfg, unsigned_probs=unsigned))
            calibrate(s, x)
            s_rec = AttentionRecorder(s, logits=False, outputs=True)
            with torch.no_grad():
                s(x)
            s_rec.remove()
            quants = [m.a_quant for name, m in s.named_modules() if name.endswith("attn.av")]
            with torch.no_grad():
                probs = [q(p) for q, p in zip(quants, t_rec.maps)]  # the teacher's probabilities on the grid
            levels = [len(torch.unique(p)) for p in probs]
            zeros = [(p == 0).float().mean().item() for p in probs]
            ssim = [global_ssim(a[:, :, 1:], b[:, :, 1:], dim=2, luminance=False).mean().item()
                    for a, b in zip(t_rec.outputs, s_rec.outputs)]
            print(f"{k[:16]:16s} {'unsigned' if unsigned else 'signed':8s} levels {levels} "
                  f"at 0: {min(zeros):.2f}-{max(zeros):.2f}  row sum (last layer) {probs[-1].sum(-1).mean():.2f}  "
                  f"head-output SSIM {sum(ssim) / len(ssim):.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", help="Run directories holding a synth/ image set.")
    ap.add_argument("--bits", default="w3a3")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--methods", default="mse,minmax,p99.99,p99.9")
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--probs", action="store_true", help="attention probabilities: signed vs unsigned grid")
    ap.add_argument("--input-bits", type=int, default=None, help="bits of the image-input quantizer (default: the scheme's 8)")
    args = ap.parse_args()
    teacher = load_model("fmnist-vit")
    cfg = parse_bits(args.bits)
    x_val, y_val = eval_split("val", teacher.pretrained_cfg)
    g = torch.Generator().manual_seed(1)
    real_calib = x_val[torch.randperm(len(x_val), generator=g)[:args.calib_images]]
    sets = {"real(val)": real_calib}
    for d in args.sets:
        sets[Path(d).name] = load_synthetic(Path(d))[0][:args.calib_images]
    if args.input_bits:
        cfg = dataclasses.replace(cfg, input_bits=args.input_bits)
    base = build_student(teacher, cfg)
    samples = {k: collect_activations(copy.deepcopy(base), v) for k, v in sets.items()}
    ref = samples["real(val)"]
    q0 = next(q for q in quant_modules(base).values() if q.axis is None)
    print(f"teacher val top-1 {accuracy(teacher, x_val, y_val):.2f}")
    print("\nper quantizer: max|x| / real, p99.9|x| / real, MSE step / real (A%d)" % cfg.act_bits)
    print("quantizer".ljust(22) + "".join(f"{k[:14]:>16}" for k in sets))
    for n in ref:
        row = []
        for k in sets:
            x, r = samples[k][n], ref[n]
            amax = (x.abs().max() / r.abs().max()).item()
            p = (torch.quantile(x.abs().double(), 0.999) / torch.quantile(r.abs().double(), 0.999)).item()
            s = (activation_step(x, q0.qmin, q0.qmax) / activation_step(r, q0.qmin, q0.qmax)).item()
            row.append(f"{amax:5.2f} {p:4.2f} {s:4.2f}")
        print(short(n).ljust(22) + "".join(f"{c:>16}" for c in row))
    print(f"\nPTQ {cfg.name} validation top-1 by calibration set and estimator")
    methods = args.methods.split(",")
    print("set".ljust(16) + "".join(f"{m:>9}" for m in methods))
    for k, images in sets.items():
        accs = []
        for m in methods:
            s = copy.deepcopy(base)
            calibrate(s, images, method=m)
            accs.append(accuracy(s, x_val, y_val))
        print(k[:16].ljust(16) + "".join(f"{a:9.2f}" for a in accs), flush=True)
    if args.probs:
        probabilities_report(teacher, cfg, sets)
    if args.sensitivity:
        print(f"\nsensitivity: val top-1 with one group quantized at {cfg.name} (the rest float), real-image MSE scales")
        s = copy.deepcopy(base)
        calibrate(s, real_calib)
        quants = quant_modules(s)
        groups = {}
        for n in quants:  # one group per quantizer role, over all blocks (blocks.*.attn.qkv.input_quant, ...)
            groups.setdefault("blocks.*." + n.split(".", 2)[2] if n.startswith("blocks.") else n, []).append(n)
        for gname, names in groups.items():
            for n, q in quants.items():
                q.enabled = n in names
            print(f"{short(gname):30s} {accuracy(s, x_val, y_val):6.2f}", flush=True)


if __name__ == "__main__":
    main()
