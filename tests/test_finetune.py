"""Head-distilled QAT: losses, the student checkpoint, resume, torchrun ranks, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CPU_ONLY_ENV
import mimiq_deploy.finetune as ft
from mimiq_deploy.finetune import FinetuneRecipe, finetune, had_loss
from mimiq_deploy.quant import parse_bits, quant_modules
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.synthesize import SynthesisRecipe, synthesize

TINY_FT = dict(epochs=2, batch_size=8, calib_images=16, milestones=[1])


@pytest.fixture(scope="module")
def synth_dir(teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    synthesize(teacher, "fmnist-vit", run_dir, SynthesisRecipe(num_images=16, batch_size=8, steps=2, jitter=2),
               progress=False)
    return run_dir


def _fresh_run(synth_dir, tmp_path, name):
    run = tmp_path / name
    run.mkdir()
    (run / "synth").symlink_to(synth_dir / "synth", target_is_directory=True)
    return run


def test_had_loss_is_zero_for_identical_heads_and_positive_otherwise():
    heads = [torch.randn(2, 3, 50, 16) for _ in range(2)]
    assert had_loss(heads, heads, prefix=1).abs() < 1e-6
    assert had_loss(heads, [h + torch.randn_like(h) for h in heads], prefix=1) > 0.1


def test_finetune_writes_a_loadable_student(teacher, synth_dir, tmp_path, cli):
    run = _fresh_run(synth_dir, tmp_path, "w4a8")
    meta = finetune(teacher, "fmnist-vit", None, run, parse_bits("w4a8"), FinetuneRecipe(**TINY_FT),
                    progress=False).to_json()
    assert len(meta["history"]) == 2 and meta["history"][0]["had"] > 0
    student = load_student(run / "student.pt")
    quantizers = quant_modules(student)
    assert {q.bits for q in quantizers.values() if q.axis == 0} == {4}
    assert {q.bits for q in quantizers.values() if q.axis is None} == {8}
    # both operands of both attention matmuls are quantized
    assert any(n.endswith("attn.qk.a_quant") for n in quantizers) and any(n.endswith("attn.av.b_quant") for n in quantizers)
    result = cli("eval", "--model", run / "student.pt", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n"] == 10000


def test_ptq_is_calibration_only(teacher, synth_dir, tmp_path):
    run = _fresh_run(synth_dir, tmp_path, "ptq")
    meta = finetune(teacher, "fmnist-vit", None, run, parse_bits("w8a8"), FinetuneRecipe(**{**TINY_FT, "epochs": 0}),
                    progress=False).to_json()
    assert meta["history"] == []
    student = load_student(run / "student.pt")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():  # W8A8 PTQ stays close to the teacher
        assert torch.nn.functional.cosine_similarity(student(x), teacher(x)).min() > 0.95


def test_resume_gives_the_same_student(teacher, synth_dir, tmp_path, monkeypatch, cpu_only):
    recipe = FinetuneRecipe(**TINY_FT)
    straight = _fresh_run(synth_dir, tmp_path, "straight")
    finetune(teacher, "fmnist-vit", None, straight, parse_bits("w4a4"), recipe, progress=False)

    resumed = _fresh_run(synth_dir, tmp_path, "resumed")
    calls = []
    def killed_after_first_epoch():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(ft, "barrier", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune(teacher, "fmnist-vit", None, resumed, parse_bits("w4a4"), recipe, progress=False)
    assert not (resumed / "student.pt").exists()
    monkeypatch.setattr(ft, "barrier", lambda: None)
    finetune(teacher, "fmnist-vit", None, resumed, parse_bits("w4a4"), recipe, progress=False)
    a = torch.load(straight / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks(synth_dir, tmp_path):
    run = _fresh_run(synth_dir, tmp_path, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "mimiq_deploy", "finetune", "--data", str(run), "--bits", "w4a8", "--epochs", "1",
           "--batch-size", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_ONLY_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads((run / "finetune.json").read_text())["history"]) == 1
    load_student(run / "student.pt")


def test_bad_input(cli, synth_dir, tmp_path):
    r = cli("finetune", "--data", synth_dir, "--bits", "w9a9")
    assert r.returncode == 1 and "unsupported bit setting 'w9a9'" in r.stderr and "Traceback" not in r.stderr
    r = cli("finetune", "--data", tmp_path / "empty", "--bits", "w4a8")
    assert r.returncode == 1 and "no synthetic data" in r.stderr
    r = cli("finetune", "--model", "deit_tiny_patch16_224", "--checkpoint", tmp_path / "missing.pth", "--data", synth_dir)
    assert r.returncode == 1 and "checkpoint not found" in r.stderr
    other = tmp_path / "other.pth"
    import timm
    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), other)
    r = cli("finetune", "--model", "deit_tiny_patch16_224", "--checkpoint", other, "--data", synth_dir)
    assert r.returncode == 1 and "holds images of 'fmnist-vit'" in r.stderr


def test_token_weighted_had_loss():
    torch.manual_seed(0)
    heads = [torch.randn(2, 4, 50, 16) for _ in range(3)]
    maps = [torch.softmax(torch.randn(2, 4, 50, 50), -1) for _ in range(3)]
    assert had_loss(heads, heads, prefix=1, teacher_maps=maps).abs() < 1e-6
    # Uniform token weights are the unweighted loss.
    uniform = [torch.full((2, 4, 50, 50), 1 / 50) for _ in range(3)]
    noisy = [h + torch.randn_like(h) for h in heads]
    assert torch.isclose(had_loss(heads, noisy, 1, uniform), had_loss(heads, noisy, 1), atol=1e-5)
    # Damage confined to the tokens the CLS token ignores barely counts once tokens are weighted.
    focus = torch.zeros(2, 4, 50, 50)
    focus[:, :, :, 1:11] = 0.1
    damaged = [h.clone() for h in heads]
    for d in damaged:
        d[:, :, 11:] += torch.randn_like(d[:, :, 11:])
    assert had_loss(heads, damaged, 1, [focus] * 3) < 0.5 * had_loss(heads, damaged, 1)


def test_finetune_options_token_weight_and_frozen_weight_scales(teacher, synth_dir, tmp_path):
    run = _fresh_run(synth_dir, tmp_path, "options")
    recipe = FinetuneRecipe(**{**TINY_FT, "epochs": 1}, had_token_weight=True, learn_weight_scales=False)
    meta = finetune(teacher, "fmnist-vit", None, run, parse_bits("w4a4"), recipe, progress=False).to_json()
    assert meta["history"][0]["had"] > 0
    student = load_student(run / "student.pt")
    calibrated = ft.build_student(teacher, parse_bits("w4a4"))  # weight step sizes before any training
    for name, q in quant_modules(student).items():
        if q.axis == 0:  # weight quantizers kept their MSE calibration
            assert torch.equal(q.scale, quant_modules(calibrated)[name].scale), name


def test_scale_lr_puts_step_sizes_on_their_own_learning_rate(teacher, synth_dir, tmp_path):
    """With scale_lr the step sizes move much further than with the weights' rate, the weights alike."""
    moved = {}
    for name, scale_lr in (("shared", 0.0), ("own", 1.0)):
        run = _fresh_run(synth_dir, tmp_path, name)
        finetune(teacher, "fmnist-vit", None, run, parse_bits("w4a4"),
                 FinetuneRecipe(**{**TINY_FT, "epochs": 1}, augment=False, scale_lr=scale_lr), progress=False)
        student, start = load_student(run / "student.pt"), ft.build_student(teacher, parse_bits("w4a4"))
        q0 = quant_modules(start)["blocks.0.attn.qkv.weight_quant"]
        q1 = quant_modules(student)["blocks.0.attn.qkv.weight_quant"]
        moved[name] = (q1.scale - q0.scale).abs().max().item()
        moved[name + "_w"] = (student.blocks[0].attn.qkv.weight - start.blocks[0].attn.qkv.weight).abs().max().item()
    assert moved["own"] > 10 * moved["shared"] > 0
    assert moved["own_w"] == pytest.approx(moved["shared_w"], rel=0.5)


def test_finetune_trains_the_weights_not_only_the_step_sizes(teacher, synth_dir, tmp_path):
    """The student is a copy of the frozen teacher: every parameter of the copy must train."""
    run = _fresh_run(synth_dir, tmp_path, "weights")
    finetune(teacher, "fmnist-vit", None, run, parse_bits("w4a4"), FinetuneRecipe(**{**TINY_FT, "epochs": 1}),
             progress=False)
    student = load_student(run / "student.pt")
    moved = {n: (p - teacher.state_dict()[n]).abs().max().item() for n, p in student.named_parameters()
             if n in teacher.state_dict()}
    for name in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "blocks.2.norm1.weight", "head.weight"):
        assert moved[name] > 0, name
    assert all(not p.requires_grad for p in teacher.parameters())  # the teacher itself stays frozen


def test_stages_leave_the_callers_model_where_it_was():
    """synthesize / finetune on a GPU host work on a copy of a CPU teacher: before, they moved the caller's
    teacher to CUDA, and its next CPU forward failed with 'Input type ... and weight type ... should be the same'."""
    from mimiq_deploy.distributed import on_device

    model = torch.nn.Linear(3, 2)
    assert on_device(model, torch.device("cpu")) is model
    moved = on_device(model, torch.device("meta"))  # a device that exists everywhere, as CUDA does not
    assert moved is not model and moved.weight.device.type == "meta" and model.weight.device.type == "cpu"


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    from mimiq_deploy.distributed import init_from_env
    from mimiq_deploy.errors import MimiqError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MimiqError, match=r"2 ranks on this node but 1 CUDA device.*nproc_per_node 1"):
        init_from_env()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stages_leave_a_cpu_teacher_on_the_cpu(teacher, tmp_path):
    synthesize(teacher, "fmnist-vit", tmp_path, SynthesisRecipe(num_images=8, batch_size=4, steps=2), progress=False)
    finetune(teacher, "fmnist-vit", None, tmp_path, parse_bits("w4a8"), FinetuneRecipe(epochs=1, batch_size=4,
             milestones=[1], calib_images=8), progress=False)
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}
    assert teacher(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert {t.device.type for t in load_student(tmp_path / "student.pt").state_dict().values()} == {"cpu"}
