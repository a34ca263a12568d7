"""The Python API, stage by stage (the CLI is a thin layer over these calls)."""
import sys
from pathlib import Path

from mimiq_deploy.build import build
from mimiq_deploy.evaluate import eval_dataset, evaluate
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.finetune import FinetuneRecipe, finetune, load_student
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.synthesize import SynthesisRecipe, mean_inter_head_similarity, load_synthetic, synthesize
from mimiq_deploy.verify import format_verify, verify

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/api")
teacher = load_model("fmnist-vit")
synthesize(teacher, "fmnist-vit", run, SynthesisRecipe(num_images=256, batch_size=64, steps=100, jitter=0))
images, labels, _ = load_synthetic(run)
print("inter-head |SSIM| of the synthetic set:", round(mean_inter_head_similarity(teacher, images), 4))

finetune(teacher, "fmnist-vit", None, run, parse_bits("w8a8"), FinetuneRecipe(epochs=2, batch_size=32, milestones=[1]))
student = load_student(run / "student.pt")
dataset, name = eval_dataset(student)
print("fake-quant student:", evaluate(student, dataset))

export_student(student, run, ExportConfig())
build(run)
print(format_verify(verify(run, limit=2000)))
