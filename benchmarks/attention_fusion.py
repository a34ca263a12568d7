"""TensorRT's fused-attention verdict (static check, no GPU) per attention block of this project's W8A8 TensorRT
graph (export/model_qdq_fp16.onnx) -> RESULTS.md, "TensorRT fused attention (static check)".

Models: the embedded fmnist-vit and fmnist-swin, and random-init timm deit_tiny_patch16_224,
deit_small_patch16_224, swin_tiny_patch4_window7_224. Students are PTQ (calibration only) on a few Gaussian-noise
images: the verdict reads the graph's structure and shapes, not the calibrated values.

    PYTHONPATH=. python benchmarks/attention_fusion.py [--models ...] [--bits w8a8]
"""
import argparse
import tempfile

import onnx
import torch

from mimiq_deploy.backends.tensorrt import TRT_ONNX
from mimiq_deploy.backends.tensorrt.attention import attention_blocks, table_lines
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import ptq_student
from mimiq_deploy.run_dir import RunDir

MODELS = ("fmnist-vit", "fmnist-swin", "deit_tiny_patch16_224", "deit_small_patch16_224",
          "swin_tiny_patch4_window7_224")


def teacher(name: str):
    if name.startswith("fmnist-"):
        from mimiq_deploy.models import load_model
        return load_model(name)
    import timm
    from mimiq_deploy.families import capture_attention
    return capture_attention(timm.create_model(name, pretrained=False)).eval()


def verdict(name: str, bits: str, images: int) -> list[str]:
    torch.manual_seed(0)
    model = teacher(name)
    student = ptq_student(model, parse_bits(bits), torch.randn(images, *model.pretrained_cfg["input_size"]))
    with tempfile.TemporaryDirectory() as tmp:
        export_student(student, tmp, ExportConfig(), progress=lambda m: None)
        blocks = attention_blocks(onnx.load(str(RunDir(tmp).graph(TRT_ONNX))))
    return [f"### {name} {bits}", "", *table_lines(blocks), ""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--images", type=int, default=16, help="Gaussian-noise calibration images per model.")
    args = ap.parse_args()
    for name in args.models:
        print("\n".join(verdict(name, args.bits, args.images)), flush=True)


if __name__ == "__main__":
    main()
