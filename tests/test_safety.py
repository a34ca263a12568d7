"""Loading never runs code from a file: checkpoints, student.pt, shards and resume states are
unpickled with weights_only=True; anything else is refused with one line."""
import argparse

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mimiq_deploy.cli import main
from mimiq_deploy.models import load_model
from mimiq_deploy.synthesize import save_image_set, shard_path

FMNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "num_classes": 10}


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if the payload runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refused(args, *needles):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _synthetic_set(run_dir):
    torch.manual_seed(0)
    save_image_set(run_dir, "fmnist-vit", torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)), "noise",
                   FMNIST_CFG, shard_size=8)


def test_checkpoint_payload_is_refused(tmp_path):
    marker, ckpt = tmp_path / "MARKER", tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload(marker)}, ckpt)
    for verb in ("eval", "synthesize --out RUN", "finetune --data RUN", "quantize --out RUN",
                 "inspect-attention --no-real"):
        args = [a.replace("RUN", str(tmp_path / "run")) for a in verb.split()]
        _refused([*args, "--model", "deit_tiny_patch16_224", "--checkpoint", ckpt],
                 str(ckpt), "io.open", "--trust-checkpoint")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_student_payload_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"format": "mimiq-student-v1", "model_name": "fmnist-vit", "meta": Payload(marker)},
               tmp_path / "student.pt")
    _refused(["export", tmp_path], "student.pt", "io.open", "not written by mimiq-deploy")
    _refused(["eval", "--model", tmp_path / "student.pt"], "student.pt", "io.open")
    assert not marker.exists()


def test_shard_and_resume_state_payloads_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    _synthetic_set(tmp_path)
    good = torch.load(shard_path(tmp_path, 1), weights_only=True)
    torch.save({**good, "losses": {"ce": Payload(marker)}}, shard_path(tmp_path, 1))
    _refused(["inspect-attention", "--data", tmp_path, "--no-real"], "shard_00001.pt", "io.open")
    _refused(["finetune", "--data", tmp_path, "--bits", "w8a8"], "shard_00001.pt", "io.open")

    torch.save(good, shard_path(tmp_path, 1))  # a clean set again, and a planted resume state
    torch.save({"signature": Payload(marker)}, tmp_path / "finetune_state.pt")
    _refused(["finetune", "--data", tmp_path, "--bits", "w8a8", "--epochs", "1", "--batch-size", "8"],
             "finetune_state.pt", "io.open")
    assert not marker.exists()


def test_deit_style_checkpoint_with_args_loads_safely(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    ckpt = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=5e-4, model="deit_tiny"), "epoch": 299}, ckpt)
    assert torch.equal(load_model("deit_tiny_patch16_224", ckpt).head.weight, src.head.weight)

    st = tmp_path / "deit.safetensors"
    save_file(src.state_dict(), str(st))
    assert torch.equal(load_model("deit_tiny_patch16_224", st).head.weight, src.head.weight)


def test_trust_checkpoint_loads_the_old_way(tmp_path):
    """The opt-in really unpickles fully (here the payload runs, by the user's choice)."""
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    marker, ckpt = tmp_path / "MARKER", tmp_path / "trusted.pth"
    torch.save({"model": src.state_dict(), "extra": Payload(marker)}, ckpt)
    with pytest.raises(Exception, match="--trust-checkpoint"):
        load_model("deit_tiny_patch16_224", ckpt)
    assert not marker.exists()
    model = load_model("deit_tiny_patch16_224", ckpt, trust=True)
    assert marker.exists() and torch.equal(model.head.weight, src.head.weight)


def test_corrupt_safetensors_and_student_give_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _refused(["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", bad], str(bad))
    student = tmp_path / "student.pt"
    student.write_bytes(b"PK\x03\x04 truncated")
    _refused(["export", tmp_path], str(student), "corrupt")
