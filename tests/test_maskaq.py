"""MaskAQ options: informative patches, masked attention alignment with the student in the
synthesis loop, periodic refresh of the set during fine-tuning (resumable), and `quantize`."""
import json

import pytest
import torch

import mimiq_deploy.finetune as ft
import mimiq_deploy.synthesize as sy
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.finetune import FinetuneRecipe, finetune, ptq_student, refreshed_images
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.synthesize import (AttentionRecorder, SynthesisRecipe, informative_patches, load_synthetic,
                                     masked_attention_alignment, synthesize)

SET = dict(num_images=16, batch_size=8, steps=2, jitter=0)
ALIGNED = dict(SET, mask_align=1.0, patch_entropy=0.1)


@pytest.fixture(scope="module")
def prior(teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prior")
    synthesize(teacher, "fmnist-vit", run_dir, SynthesisRecipe(**SET), progress=False)
    return run_dir


@pytest.fixture(scope="module")
def student(teacher, prior):
    return ptq_student(teacher, parse_bits("w4a4"), load_synthetic(prior)[0])


def test_informative_patches_keep_the_top_share_less_a_random_drop():
    importance = torch.rand(64, 49)
    gen = torch.Generator().manual_seed(0)
    kept = informative_patches(importance, keep=0.5, drop=0.0, gen=gen)
    k = round(0.5 * 49)
    assert (kept.sum(1) == k).all()
    threshold = importance.sort(1, descending=True).values[:, k - 1:k]
    assert torch.equal(kept, importance >= threshold)
    dropped = informative_patches(importance, keep=0.5, drop=0.3, gen=gen)
    assert not (dropped & ~kept).any()                              # only ever a subset of the selection
    assert 0.6 < dropped.sum() / kept.sum() < 0.8                   # about 30 % dropped
    assert dropped.gather(1, importance.argmax(1, keepdim=True)).all()  # the top patch always stays
    assert (informative_patches(importance, 0.01, 0.99, gen).sum(1) == 1).all()


def test_masked_alignment_counts_only_the_informative_rows():
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 50, 50) for _ in range(2)]
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :5] = True
    assert masked_attention_alignment(t, t, mask, prefix=1) == 0
    elsewhere = [x.clone() for x in t]
    for x in elsewhere:
        x[:, :, 10:] += torch.randn_like(x[:, :, 10:])                # rows of patches 9.. (not selected)
    assert masked_attention_alignment(t, elsewhere, mask, prefix=1) == 0
    inside = [x.clone() for x in t]
    for x in inside:
        x[:, :, 1:6] += torch.randn_like(x[:, :, 1:6])
    assert 0 < masked_attention_alignment(t, inside, mask, prefix=1) <= 2


def _row_distance(teacher, student, images):
    """Mean L1 distance of all patch rows' attention, teacher vs student."""
    t_rec, s_rec = AttentionRecorder(teacher), AttentionRecorder(student)
    with torch.no_grad():
        teacher(images), student(images)
    t_rec.remove(), s_rec.remove()
    return masked_attention_alignment(t_rec.logits, s_rec.logits, torch.ones(len(images), 49, dtype=torch.bool), 1)


def test_alignment_with_the_student_in_the_loop(teacher, student, tmp_path):
    with pytest.raises(MimiqError, match="needs the quantized student"):
        synthesize(teacher, "fmnist-vit", tmp_path / "none", SynthesisRecipe(**ALIGNED), progress=False)
    student.train()
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    recipe = dict(num_images=8, batch_size=8, steps=15, jitter=0)
    plain = synthesize(teacher, "fmnist-vit", tmp_path / "plain", SynthesisRecipe(**recipe), progress=False).to_json()
    aligned = synthesize(teacher, "fmnist-vit", tmp_path / "aligned", SynthesisRecipe(**recipe, mask_align=5.0),
                         progress=False, student=student, student_tag="w4a4 PTQ").to_json()
    assert plain["kind"] == "mimiq" and plain["student"] is None
    assert aligned["kind"] == "mimiq+maskaq" and aligned["student"] == "w4a4 PTQ"
    assert {"align", "student_top1"} <= set(aligned["final_losses"])
    # The student is handed back as it came: same mode, same trainable parameters, no gradients.
    assert student.training and trainable == [n for n, p in student.named_parameters() if p.requires_grad]
    assert all(p.grad is None for p in student.parameters())
    # Images made with the term put the student's attention closer to the teacher's than without.
    student.eval()
    near = _row_distance(teacher, student, load_synthetic(tmp_path / "aligned")[0])
    far = _row_distance(teacher, student, load_synthetic(tmp_path / "plain")[0])
    assert near < far
    with pytest.raises(MimiqError, match="aligned with another student"):
        synthesize(teacher, "fmnist-vit", tmp_path / "aligned", SynthesisRecipe(**recipe, mask_align=5.0),
                   progress=False, student=student, student_tag="w4a8 PTQ")


def test_refreshed_images_rotate_through_the_set(tmp_path):
    data_cfg = {"input_size": (1, 2, 2), "mean": (0.0,), "std": (1.0,), "num_classes": 2}
    for epoch, value in ((1, 1.0), (2, 2.0), (3, 3.0)):
        sy.save_image_set(ft.refresh_dir(tmp_path, epoch), "m", torch.full((3, 1, 2, 2), value),
                          torch.zeros(3, dtype=torch.long), "refresh", data_cfg)
    out = refreshed_images(torch.zeros(4, 1, 2, 2), tmp_path, [1, 2, 3])
    # refresh 1 writes images 0-2, refresh 2 images 3, 0, 1 (wrapping), refresh 3 images 2, 3, 0
    assert out[:, 0, 0, 0].tolist() == [3.0, 2.0, 3.0, 3.0]


def _run(prior, tmp_path, name):
    run = tmp_path / name
    run.mkdir()
    (run / "synth").symlink_to(prior / "synth", target_is_directory=True)
    return run


def test_refresh_during_finetuning_resumes_to_the_same_student(teacher, prior, tmp_path, monkeypatch, cpu_only):
    recipe = FinetuneRecipe(epochs=3, batch_size=8, calib_images=16, milestones=[2], refresh_every=1,
                            refresh_fraction=0.5)
    synth_recipe = SynthesisRecipe(**{**ALIGNED, "batch_size": 4})
    straight = _run(prior, tmp_path, "straight")
    meta = finetune(teacher, "fmnist-vit", None, straight, parse_bits("w4a4"), recipe, progress=False,
                    synth_recipe=synth_recipe).to_json()
    assert meta["refresh_minutes"] > 0 and [h["epoch"] for h in meta["history"] if "refresh_s" in h] == [2, 3]
    for epoch in (1, 2):
        manifest = json.loads(sy.manifest_path(ft.refresh_dir(straight, epoch)).read_text())
        assert manifest["num_images_done"] == 8 and manifest["student"] == f"w4a4 student after epoch {epoch}"
        assert manifest["recipe"]["seed"] == 10_000 * epoch  # new images, not the first set's again

    # Killed in the middle of the first refresh (after its first shard), then run again.
    resumed = _run(prior, tmp_path, "resumed")
    real_batch, calls = sy.synthesize_batch, []

    def killed_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)
    monkeypatch.setattr(sy, "synthesize_batch", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        finetune(teacher, "fmnist-vit", None, resumed, parse_bits("w4a4"), recipe, progress=False,
                 synth_recipe=synth_recipe)
    assert sy.shard_path(ft.refresh_dir(resumed, 1), 0).exists() and not (resumed / "student.pt").exists()
    monkeypatch.setattr(sy, "synthesize_batch", real_batch)
    finetune(teacher, "fmnist-vit", None, resumed, parse_bits("w4a4"), recipe, progress=False, synth_recipe=synth_recipe)
    a = torch.load(straight / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    load_student(resumed / "student.pt")


def test_cli_errors(cli, tmp_path):
    r = cli("synthesize", "--out", tmp_path / "a", "--num-images", "4", "--steps", "1", "--mask-align", "1")
    assert r.returncode == 1 and "needs the quantized student" in r.stderr and "Traceback" not in r.stderr
    r = cli("synthesize", "--out", tmp_path / "a", "--mask-align", "1", "--align-student", tmp_path / "missing.pt")
    assert r.returncode == 1 and "missing.pt" in r.stderr and "Traceback" not in r.stderr
    r = cli("finetune", "--data", tmp_path / "a", "--refresh-fraction", "1.5")
    assert r.returncode == 1 and "refresh_fraction" in r.stderr


def test_quantize_with_maskaq_recipe(cli, tmp_path):
    recipe = tmp_path / "maskaq.toml"
    recipe.write_text("[synthesize]\nnum_images = 16\nbatch_size = 8\nsteps = 2\njitter = 0\nmask_align = 1.0\n"
                      "patch_entropy = 0.1\n[finetune]\nepochs = 2\nbatch_size = 8\nmilestones = [1]\n"
                      "calib_images = 16\nrefresh_every = 1\nrefresh_fraction = 0.5\nhad_token_weight = true\n")
    export_cfg = tmp_path / "export.toml"
    export_cfg.write_text("batch_sizes = [1]\nbench_seconds = 0.1\n")  # the default verify thresholds apply
    run = tmp_path / "run"
    r = cli("quantize", "--bits", "w4a8", "--out", run, "--recipe", recipe, "--export-config", export_cfg,
            "--verify-limit", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[synthesize prior]" in r.stdout and "[synthesize]" in r.stdout
    assert json.loads(sy.manifest_path(run).read_text())["student"] == "w4a8 PTQ on prior"
    assert json.loads(sy.manifest_path(run / "prior").read_text())["kind"] == "mimiq"
    assert sy.manifest_path(ft.refresh_dir(run, 1)).exists()
