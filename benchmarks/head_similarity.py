"""Mean inter-head |SSIM| (what L_IHC raises) per attention block, on real test images and on small
synthetic sets made with and without L_IHC: where a family's heads agree, and what synthesis changes.

    python benchmarks/head_similarity.py --model fmnist-swin --images 64 --steps 100
"""
import argparse
import json

import torch

from mimiq_deploy.attention import AttentionRecorder
from mimiq_deploy.data import load_fmnist, normalize_uint8
from mimiq_deploy.families import family_of
from mimiq_deploy.models import load_model
from mimiq_deploy.config import config_dir
from mimiq_deploy.similarity import head_pair_ssim
from mimiq_deploy.synthesize import load_synthesis_recipe, synthesize_batch
from mimiq_deploy.zoo import data_config


@torch.no_grad()
def per_block(model, images: torch.Tensor) -> list[float]:
    """Mean |SSIM| over images, head pairs and queries, one value per attention block."""
    rec = AttentionRecorder(model)
    try:
        model(images)
        return [head_pair_ssim(logits, l.grid, l.prefix, 0, l.keys).abs().mean().item()
                for logits, l in zip(rec.logits, family_of(model).layouts(model))]
    finally:
        rec.remove()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-swin")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    model = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = data_config(model)
    x, _ = load_fmnist("test")
    sets = {"real": normalize_uint8(x[:args.images], cfg["mean"], cfg["std"])}
    recipe_path = config_dir("calib") / f"{args.model}-fast.toml"
    for kind, ihc in (("base (CE + TV)", False), ("MimiQ", True)):
        recipe = load_synthesis_recipe(recipe_path, {"num_images": args.images, "batch_size": args.images,
                                                     "steps": args.steps, "ihc": ihc})
        sets[kind] = synthesize_batch(model, recipe, cfg, 0, torch.device("cpu"))["images"].float()
    rows = {kind: per_block(model, images) for kind, images in sets.items()}
    print(json.dumps({"model": args.model, "blocks": rows,
                      "mean": {k: sum(v) / len(v) for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
