"""A client of `mimiq-deploy serve`: raw images in, labels out, over KServe v2 with tritonclient.

    mimiq-deploy serve runs/fmnist-w4a8 &        # Triton on 127.0.0.1: HTTP 8000, gRPC 8001, metrics 8002
    python examples/serve_model_repository.py runs/fmnist-w4a8 [--url 127.0.0.1:8000] [--grpc] [--num 200]

Fashion-MNIST test images go out as PNG files, as a camera or a browser would send them, 8 to a request; the
server decodes and normalizes them (preprocessing.json, applied by mimiq_deploy/preprocess.py) and runs the
artifact; Triton's classification extension answers each image with its top label (labels.txt). The model's
name comes from the run directory (build.ModelSignature: <model>_<bits>, the model repository's names without
their back end's suffix). Needs the serve extra: pip install 'mimiq-deploy[serve]'.
"""
import argparse
import io

import numpy as np
from PIL import Image

from mimiq_deploy.build import ModelSignature
from mimiq_deploy.data import load_fmnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run_dir", nargs="?", default="runs/fmnist-w4a8")
parser.add_argument("--url", default=None, help="host:port of serve's HTTP (default :8000) or gRPC (:8001) endpoint")
parser.add_argument("--grpc", action="store_true", help="KServe v2 over gRPC instead of HTTP")
parser.add_argument("--num", type=int, default=200, help="test images to classify")
args = parser.parse_args()

if args.grpc:
    import tritonclient.grpc as kserve
else:
    import tritonclient.http as kserve

sig = ModelSignature.of_run(args.run_dir)
url = args.url or ("127.0.0.1:8001" if args.grpc else "127.0.0.1:8000")
client = kserve.InferenceServerClient(url)
if not client.is_model_ready(sig.name):
    raise SystemExit(f"model {sig.name} is not ready at {url}: start `mimiq-deploy serve {args.run_dir}` first")

images, targets = load_fmnist("test")
images, targets = images[:args.num, 0].numpy(), targets[:args.num].numpy()  # uint8 (N, 28, 28), class indices


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


predicted, names = [], []
for start in range(0, len(images), 8):
    batch = np.array([[png(im)] for im in images[start:start + 8]], dtype=np.object_)  # BYTES [n, 1]
    image_bytes = kserve.InferInput("image_bytes", list(batch.shape), "BYTES")
    image_bytes.set_data_from_numpy(batch)
    top1 = kserve.InferRequestedOutput(sig.output_name, class_count=1)  # "score:index:label" per image
    answer = client.infer(sig.name, [image_bytes], outputs=[top1]).as_numpy(sig.output_name)
    for entry in answer[:, 0]:
        score, index, label = entry.decode().split(":", 2)
        predicted.append(int(index))
        names.append(label)

top1 = 100 * float(np.mean(np.array(predicted) == targets))
print(f"{sig.name} at {url} ({'gRPC' if args.grpc else 'HTTP'}): top-1 {top1:.2f}% on {len(images)} test images "
      "sent as PNG")
print("first images:", ", ".join(names[:5]))
