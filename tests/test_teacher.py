"""The embedded default teacher: its accuracy, and the training recipe's machinery."""
import gzip
import json

import pytest
import torch

from mimiq_deploy.data import _read_idx
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.models import load_model
from mimiq_deploy.teacher import TeacherRecipe, train_teacher


def test_embedded_teacher_accuracy(cli):
    result = cli("eval", "--model", "fmnist-vit", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "fmnist-vit" and report["dataset"] == "fashion-mnist-test"
    assert report["n"] == 10000
    assert report["top1"] >= 89.0


def test_embedded_teacher_shape():
    model = load_model("fmnist-vit")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert len(model.blocks) >= 4 and model.blocks[0].attn.num_heads >= 3
    assert model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1] >= 49


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def _tiny_fmnist(root, n_train=96, n_test=32):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g).numpy())
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g).numpy())


def test_idx_reader_rejects_truncated_file(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(MimiqError, match="truncated"):
        _read_idx(path)


def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import mimiq_deploy.teacher as teacher

    _tiny_fmnist(tmp_path)
    arch = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=24, depth=2, num_heads=3,
                mlp_ratio=2.0, stem="conv")
    recipe = TeacherRecipe(arch=arch, val_size=32, epochs=2, batch_size=32)
    straight = train_teacher(recipe, tmp_path / "straight.pt", data_dir=tmp_path)
    assert len(straight["history"]) == 2 and straight["params"] > 0

    # Interrupt during epoch 2's validation: only epoch 1's state is on disk.
    real_accuracy, calls = teacher.accuracy, []
    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_accuracy(*args, **kwargs)
    monkeypatch.setattr(teacher, "accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(recipe, tmp_path / "resumed.pt", data_dir=tmp_path)
    assert (tmp_path / "resumed.pt.resume").exists() and not (tmp_path / "resumed.pt").exists()
    monkeypatch.setattr(teacher, "accuracy", real_accuracy)
    resumed = train_teacher(recipe, tmp_path / "resumed.pt", data_dir=tmp_path)
    assert not (tmp_path / "resumed.pt.resume").exists()
    assert resumed["test_top1"] == straight["test_top1"]
    a = torch.load(tmp_path / "straight.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
