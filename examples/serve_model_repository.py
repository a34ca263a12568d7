"""Serving the exported model repository.

With an inference server (Triton):
    tritonserver --model-repository RUN_DIR/model_repository
Without one, this script does what a client + server pair would: it reads the repository's
ONNX model and the preprocessing.json beside its config.pbtxt (input name, size, mean, std),
and classifies Fashion-MNIST test images, naming the classes from labels.txt.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mimiq_deploy.data import load_fmnist

repo = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist-w4a8/model_repository")
model_dir = next(p for p in sorted(repo.iterdir()) if p.name.endswith("_onnx"))
pre = json.loads((model_dir / "preprocessing.json").read_text())
labels = (model_dir / pre["label_file"]).read_text().splitlines() if pre["label_file"] else None

images, targets = load_fmnist("test")
assert list(images.shape[1:]) == pre["input_size"], "this client feeds 1x28x28 Fashion-MNIST images"
mean = np.array(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
std = np.array(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
batch = ((images[:1000].numpy() * pre["pixel_scale"] - mean) / std).astype(pre["input_dtype"])

session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
logits = session.run([pre["output_name"]], {pre["input_name"]: batch})[0]
top1 = 100 * (logits.argmax(1) == targets[:1000].numpy()).mean()
print(f"{model_dir.name}: top-1 {top1:.2f}% on 1000 test images")
if labels:
    print("first images:", ", ".join(labels[i] for i in logits[:5].argmax(1)))
