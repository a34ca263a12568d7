"""Serving the exported model repository.

With an inference server (Triton):
    tritonserver --model-repository RUN_DIR/model_repository
Without one, this script does what a client + server pair would: it reads the repository's
ONNX model and its config (input name, dims, preprocessing) and classifies Fashion-MNIST test
images, normalized as the config's comments say.
"""
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mimiq_deploy.data import load_fmnist, normalize_uint8

repo = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist-w4a8/model_repository")
model_dir = next(p for p in sorted(repo.iterdir()) if p.name.endswith("_onnx"))
config = (model_dir / "config.pbtxt").read_text()
mean = [float(v) for v in re.search(r"mean \(?([\d., ]+)", config).group(1).strip(" ,").split(",") if v.strip()]
std = [float(v) for v in re.search(r"std \(?([\d., ]+)", config).group(1).strip(" ,").split(",") if v.strip()]

session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
images, labels = load_fmnist("test")
batch = normalize_uint8(images[:1000], mean, std).numpy()
logits = session.run(["logits"], {"input": batch})[0]
print(f"{model_dir.name}: top-1 {100 * (logits.argmax(1) == labels[:1000].numpy()).mean():.2f}% on 1000 test images")
