"""Synthesis variants judged on the validation split (5,000 images carved from the training set).

Each variant is a set of recipe overrides `key=value,...` applied on top of --recipe: keys of
[synthesize] change how the set is made, keys prefixed `ft.` change the fine-tuning. Per variant and
seed: synthesize the set, PTQ-calibrate and fine-tune (the recipe's KL + HAD) a student at --bits,
and print validation top-1 of both, with what the set looks like (teacher confidence, pixel
statistics, total variation per image) beside the real images' figures.

    python benchmarks/tune_synthesis.py --bits w3a3 --seeds 0,1 "" "beta=3e-3" "ihc=False,beta=3e-3"
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from accuracy import eval_split, parse_overrides, real_images

from mimiq_deploy.finetune import finetune, load_finetune_recipe
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.run_dir import RunDir
from mimiq_deploy.synthesize import load_synthesis_recipe, load_synthetic, mean_inter_head_similarity, synthesize
from mimiq_deploy.teacher import accuracy


def parse_variant(spec: str) -> tuple[dict, dict]:
    overrides = parse_overrides(spec)
    synth = {k: v for k, v in overrides.items() if not k.startswith("ft.")}
    return synth, {k.removeprefix("ft."): v for k, v in overrides.items() if k.startswith("ft.")}


def set_statistics(teacher, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """What a set looks like: the teacher's confidence in the set's labels and image-level statistics."""
    images, labels = images.to(next(teacher.parameters()).device), labels.to(next(teacher.parameters()).device)
    with torch.no_grad():
        prob = teacher(images).softmax(-1).gather(1, labels[:, None]).mean().item()
    tv = ((images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean()) / 2
    return {"p_label": prob, "head_similarity": mean_inter_head_similarity(teacher, images[:256]), "pixel_mean": images.mean().item(), "pixel_std": images.std().item(),
            "mean_abs_grad": tv.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-vit", choices=["fmnist-vit", "fmnist-swin"])
    ap.add_argument("--recipe", default=None, help="default: calib/<model>-fast.toml")
    ap.add_argument("--bits", default="w3a3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/tune-synthesis")
    ap.add_argument("--json", default=None, help="Also write every measured figure to this JSON file.")
    ap.add_argument("variants", nargs="+", help='Overrides, e.g. "beta=3e-3,steps=300,ft.epochs=12"; "" = the recipe.')
    args = ap.parse_args()
    args.recipe = args.recipe or f"calib/{args.model}-fast.toml"
    teacher = load_model(args.model)
    cfg = teacher.pretrained_cfg
    x_val, y_val = eval_split("val", cfg)
    n = load_synthesis_recipe(args.recipe, {}).num_images
    print(f"teacher {accuracy(teacher, x_val, y_val):.2f} % validation top-1; real images: "
          f"{set_statistics(teacher, *real_images(n, 0, cfg))}", flush=True)
    records = []
    for spec in args.variants:
        synth_overrides, ft_overrides = parse_variant(spec)
        name = spec.replace(",", "_").replace("=", "").replace(".", "p") or "recipe"
        ptq, tuned = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.time()
            set_dir = Path(args.out) / f"{name}-s{seed}"
            synthesize(teacher, args.model, set_dir,
                       load_synthesis_recipe(args.recipe, {"seed": seed, **synth_overrides}), progress=False)
            images, labels, _ = load_synthetic(set_dir)
            stats = set_statistics(teacher, images.float(), labels)
            top1 = {}
            for label, extra in (("ptq", {"epochs": 0}), ("finetuned", {})):
                run = Path(args.out) / f"{name}-s{seed}-{args.bits}-{label}"
                RunDir(run).link_synthetic(set_dir)
                recipe = load_finetune_recipe(args.recipe, {"seed": seed, **ft_overrides, **extra})
                finetune(teacher, args.model, None, run, parse_bits(args.bits), recipe, progress=False)
                top1[label] = accuracy(load_student(run / "student.pt"), x_val, y_val)
            ptq.append(top1["ptq"])
            tuned.append(top1["finetuned"])
            records.append({"variant": spec, "seed": seed, "bits": args.bits, **top1, **stats,
                            "seconds": time.time() - t0})
            print(f"{spec or '(recipe)'} seed {seed}: PTQ {top1['ptq']:.2f}, fine-tuned {top1['finetuned']:.2f} "
                  f"| p(label) {stats['p_label']:.3f} mean {stats['pixel_mean']:+.2f} std {stats['pixel_std']:.2f} "
                  f"|grad| {stats['mean_abs_grad']:.3f} heads {stats['head_similarity']:.3f} | {time.time() - t0:.0f} s", flush=True)
        print(f"== {spec or '(recipe)'}: PTQ {statistics.mean(ptq):.2f}, fine-tuned {statistics.mean(tuned):.2f} "
              f"± {statistics.stdev(tuned) if len(tuned) > 1 else 0:.2f} ({args.bits}, validation)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
