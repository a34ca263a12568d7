"""The Python API, stage by stage (the CLI is a thin layer over these calls).

    python examples/python_api.py [RUN_DIR] [--num-images N --steps N --epochs N --verify-limit N]
"""
import argparse
from pathlib import Path

from mimiq_deploy.build import build
from mimiq_deploy.evaluate import eval_dataset, evaluate
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.finetune import FinetuneRecipe, finetune
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.synthesize import SynthesisRecipe, mean_inter_head_similarity, load_synthetic, synthesize
from mimiq_deploy.verify import format_verify, verify

parser = argparse.ArgumentParser()
parser.add_argument("run", nargs="?", type=Path, default=Path("runs/api"))
parser.add_argument("--num-images", type=int, default=256)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--verify-limit", type=int, default=2000)
args = parser.parse_args()
run = args.run

teacher = load_model("fmnist-vit")
synthesize(teacher, "fmnist-vit", run, SynthesisRecipe(num_images=args.num_images, batch_size=64, steps=args.steps,
                                                        jitter=0))
images, labels, _ = load_synthetic(run)
print("inter-head |SSIM| of the synthetic set:", round(mean_inter_head_similarity(teacher, images), 4))

finetune(teacher, "fmnist-vit", None, run, parse_bits("w8a8"),
         FinetuneRecipe(epochs=args.epochs, batch_size=32, milestones=[1]))
student = load_student(run / "student.pt")
dataset, name = eval_dataset(student)
print("fake-quant student:", evaluate(student, dataset))

export_student(student, run, ExportConfig())
build(run)
print(format_verify(verify(run, limit=args.verify_limit)))
