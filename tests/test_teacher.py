"""The embedded default teacher: its accuracy, and the training recipe's machinery."""
import gzip
import json

import pytest
import torch

from mimiq_deploy.data import _read_idx
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.models import load_model
from mimiq_deploy.teacher import TeacherRecipe, train_teacher


@pytest.mark.parametrize("name", ["fmnist-vit", "fmnist-swin"])
def test_embedded_teacher_accuracy(cli, name):
    result = cli("eval", "--model", name, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == name and report["dataset"] == "fashion-mnist-test"
    assert report["n"] == 10000
    assert report["top1"] >= 89.0


def test_embedded_teacher_shape():
    model = load_model("fmnist-vit")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert len(model.blocks) >= 4 and model.blocks[0].attn.num_heads >= 3
    assert model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1] >= 49


def test_embedded_swin_shape():
    from mimiq_deploy.families import family_of
    from mimiq_deploy.zoo import EMBEDDED

    model = load_model("fmnist-swin")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.pretrained_cfg["architecture"] == "fmnist-swin"
    assert family_of(model).name == "swin" and len(model.layers) == 3
    assert any(l.keys is not None for l in family_of(model).layouts(model))  # shifted windows
    assert EMBEDDED["fmnist-swin"].stat().st_size <= 10 * 2 ** 20


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
    straight = train_teacher(recipe, tmp_path / "straight.pt", data_dir=tmp_path).to_json()
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
    resumed = train_teacher(recipe, tmp_path / "resumed.pt", data_dir=tmp_path).to_json()
    assert not (tmp_path / "resumed.pt.resume").exists()
    assert resumed["test_top1"] == straight["test_top1"]
    a = torch.load(tmp_path / "straight.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_tiny_teacher(tmp_path, cli, arch: str):
    """One epoch of `teacher train` on a tiny Fashion-MNIST with the given [arch] table:
    (data dir, checkpoint, the command's stdout)."""
    data = tmp_path / "data"
    data.mkdir()
    _tiny_fmnist(data)
    recipe = tmp_path / "teacher.toml"
    recipe.write_text("epochs = 1\nbatch_size = 32\nval_size = 32\n[arch]\n" + arch)
    ckpt = tmp_path / "my-teacher.pt"
    r = cli("teacher", "train", "--recipe", recipe, "--out", ckpt, "--data-dir", data)
    assert r.returncode == 0, r.stderr
    return data, ckpt, r.stdout


def test_a_trained_teacher_of_another_architecture_runs_through_every_verb(tmp_path, cli):
    """`teacher train` writes a checkpoint that carries its architecture: every verb loads it."""
    data, ckpt, stdout = _train_tiny_teacher(
        tmp_path, cli, "img_size = 28\npatch_size = 7\nin_chans = 1\nnum_classes = 10\nembed_dim = 32\ndepth = 2\n"
                       'num_heads = 2\nmlp_ratio = 2.0\nstem = "patchify"\n')
    assert f"--model fmnist-vit --checkpoint {ckpt}" in stdout

    by_flag = cli("eval", "--model", "fmnist-vit", "--checkpoint", ckpt, "--data-dir", data, "--json")
    by_path = cli("eval", "--model", ckpt, "--data-dir", data, "--json")
    assert by_flag.returncode == 0 and by_path.returncode == 0, by_flag.stderr + by_path.stderr
    assert json.loads(by_flag.stdout)["n"] == 32
    assert json.loads(by_flag.stdout)["top1"] == json.loads(by_path.stdout)["top1"]
    model = load_model("fmnist-vit", ckpt)
    assert model.embed_dim == 32 and len(model.blocks) == 2 and model.patch_embed.grid_size == (4, 4)

    run = tmp_path / "run"
    teacher_args = ("--model", "fmnist-vit", "--checkpoint", ckpt)
    r = cli("synthesize", *teacher_args, "--out", run, "--num-images", 8, "--batch-size", 8, "--steps", 2)
    assert r.returncode == 0, r.stderr
    r = cli("finetune", *teacher_args, "--data", run, "--bits", "w4a8", "--epochs", 1, "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    r = cli("export", run)
    assert r.returncode == 0, r.stderr
    r = cli("eval", "--model", run / "student.pt", "--data-dir", data, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 32

    # the embedded name with a checkpoint that is not a teacher-train checkpoint: one line, no traceback
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    r = cli("eval", "--model", "fmnist-vit", "--checkpoint", tmp_path / "plain.pt", "--data-dir", data)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "teacher train" in r.stderr


def test_a_trained_swin_teacher_runs_through_every_verb(tmp_path, cli):
    """A `teacher train` recipe of the Swin family: its checkpoint names fmnist-swin and every verb loads it."""
    data, ckpt, stdout = _train_tiny_teacher(
        tmp_path, cli, 'family = "swin"\nimg_size = 28\npatch_size = 4\nin_chans = 1\nnum_classes = 10\n'
                       "embed_dim = 16\ndepths = [2, 1]\nnum_heads = [2, 4]\nwindow_size = 4\nmlp_ratio = 2.0\n")
    assert f"--model fmnist-swin --checkpoint {ckpt}" in stdout
    model = load_model("fmnist-swin", ckpt)
    assert model.embed_dim == 16 and [len(l.blocks) for l in model.layers] == [2, 1]
    assert model.layers[0].blocks[1].shift_size == (2, 2)  # a 7x7 grid of 4x4 windows, padded: shifted

    run = tmp_path / "run"
    r = cli("synthesize", "--model", ckpt, "--out", run, "--num-images", 8, "--batch-size", 8, "--steps", 2)
    assert r.returncode == 0, r.stderr
    r = cli("finetune", "--model", ckpt, "--data", run, "--bits", "w8a8", "--epochs", 1, "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    r = cli("export", run)
    assert r.returncode == 0, r.stderr
    student = cli("eval", "--model", run / "student.pt", "--data-dir", data, "--json")
    teacher = cli("eval", "--model", "fmnist-swin", "--checkpoint", ckpt, "--data-dir", data, "--json")
    assert student.returncode == 0 and teacher.returncode == 0, student.stderr + teacher.stderr
    assert json.loads(student.stdout)["n"] == json.loads(teacher.stdout)["n"] == 32
