"""Fine-tuning variants on the validation split (5,000 images carved from the training set).

One synthetic set (a run directory of `mimiq-deploy synthesize`), one bit setting, recipe
overrides given as `key=value,...` per variant; prints validation top-1 and wall time.

    python benchmarks/tune_finetune.py --data runs/benchmark/mimiq-s0 --bits w4a4 \\
        "epochs=0" "augment=True,learn_weight_scales=True" "augment=False" "augment=False,learn_weight_scales=False"
"""
import argparse
import dataclasses
import time
from pathlib import Path

from accuracy import eval_split, parse_overrides

from mimiq_deploy.finetune import finetune, load_finetune_recipe
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.run_dir import RunDir
from mimiq_deploy.teacher import accuracy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Run directory holding the synthetic set.")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--model", default="fmnist-vit", choices=["fmnist-vit", "fmnist-swin"])
    ap.add_argument("--recipe", default=None, help="default: calib/<model>-fast.toml")
    ap.add_argument("--out", default="runs/tune")
    ap.add_argument("--signed-probs", action="store_true",
                    help="attention probabilities on the signed grid (the scheme before the unsigned one)")
    ap.add_argument("variants", nargs="+", help="Recipe overrides, e.g. augment=False,gamma=1.0")
    args = ap.parse_args()
    args.recipe = args.recipe or f"calib/{args.model}-fast.toml"
    teacher = load_model(args.model)
    x, y = eval_split("val", teacher.pretrained_cfg)
    print(f"teacher: {accuracy(teacher, x, y):.2f} % validation top-1")
    for spec in args.variants:
        overrides = parse_overrides(spec)
        run = Path(args.out) / f"{args.bits}{'-signed' if args.signed_probs else ''}-{spec.replace(',', '_').replace('=', '')}"
        RunDir(run).link_synthetic(args.data)
        t0 = time.time()
        cfg = dataclasses.replace(parse_bits(args.bits), unsigned_probs=not args.signed_probs)
        finetune(teacher, args.model, None, run, cfg, load_finetune_recipe(args.recipe, overrides),
                 progress=False)
        print(f"{args.bits} {spec}: {accuracy(load_student(run / 'student.pt'), x, y):.2f} % validation top-1 "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
