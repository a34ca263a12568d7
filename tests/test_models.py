"""Model loading: the three ways to name a model, and a clear one-line error for each mistake."""
import timm
import torch

from mimiq_deploy.models import load_model


def _one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_model_name(cli):
    _one_line_error(cli("eval", "--model", "no_such_vit_xyz"), "unknown model 'no_such_vit_xyz'", "--checkpoint")


def test_checkpoint_of_another_architecture(cli, tmp_path):
    ckpt = tmp_path / "small.pth"
    torch.save({"model": timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()}, ckpt)
    _one_line_error(cli("eval", "--model", "deit_tiny_patch16_224", "--checkpoint", ckpt), "does not match architecture")


def test_missing_pretrained_weights(cli, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    _one_line_error(cli("eval", "--model", "deit_tiny_patch16_224", env=env), "no local pretrained weights", "--checkpoint")


def test_corrupt_and_missing_checkpoint(cli, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(cli("eval", "--model", "deit_tiny_patch16_224", "--checkpoint", bad), "corrupt")
    _one_line_error(cli("eval", "--model", "deit_tiny_patch16_224", "--checkpoint", tmp_path / "nope.pth"), "not found")


def test_timm_checkpoint_with_model_key_loads(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5)
    ckpt = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, ckpt)
    model = load_model("deit_tiny_patch16_224", ckpt)
    assert model.num_classes == 5
    assert torch.equal(model.head.weight, src.head.weight)
