"""Model families beyond the embedded ViT: distilled DeiT, register-token ViT and Swin (window attention)."""
import json

import numpy as np
import onnx
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from mimiq_deploy.attention import AttentionRecorder, attention_modules
from mimiq_deploy.bench import bench
from mimiq_deploy.check import check_graph
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.backends.tensorrt import TRT_ONNX
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.run_dir import QDQ_ONNX
from mimiq_deploy.families import capture_attention, family_of
from mimiq_deploy.families.swin import ExplicitWindowAttention
from mimiq_deploy.finetune import build_student, had_loss
from mimiq_deploy.quant import calibrate, parse_bits
from mimiq_deploy.quant.convert import QuantLinear, QuantMatMul
from mimiq_deploy.similarity import head_pair_ssim
from mimiq_deploy.synthesize import SynthesisRecipe, ihc_similarity, synthesize_batch
from mimiq_deploy.zoo import build_teacher, data_config

SWIN, DEIT = "swin_tiny_patch4_window7_224", "deit_tiny_distilled_patch16_224"


def _pair(name, **kwargs):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    captured = timm.create_model(name, pretrained=False, **kwargs).eval()
    captured.load_state_dict(reference.state_dict())
    return reference, capture_attention(captured)


def _attn_outputs(model, cls, x):
    """Each attention block's output, by name: what timm's block and the captured one hand to the residual."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out))
               for n, m in model.named_modules() if isinstance(m, cls)]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("name", [SWIN, DEIT])
def test_captured_attention_equals_timms_forward(name):
    reference, captured = _pair(name)
    assert captured.state_dict().keys() == reference.state_dict().keys()
    timm_cls = type(reference.get_submodule("layers.0.blocks.0.attn" if name == SWIN else "blocks.0.attn"))
    x = torch.randn(2, 3, 224, 224)
    ref_logits, ref_blocks = _attn_outputs(reference, timm_cls, x)
    got_logits, got_blocks = _attn_outputs(captured, type(attention_modules(captured)[0]), x)
    assert ref_blocks.keys() == got_blocks.keys() and len(got_blocks) == 12
    for n in ref_blocks:
        assert (ref_blocks[n] - got_blocks[n]).abs().max().item() <= 1e-5, n
    assert (ref_logits - got_logits).abs().max().item() <= 1e-5


def test_swin_logits_are_what_the_softmax_sees():
    """The recorded logits are scaled QK^T plus the relative position bias; softmax of them (shift mask added)
    is the attention that multiplies V."""
    _, model = _pair(SWIN)
    rec = AttentionRecorder(model, logits=True, maps=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    layouts = family_of(model).layouts(model)
    assert [l.windows for l in layouts] == [64, 64, 16, 16] + [4] * 6 + [1, 1]
    assert [l.keys is not None for l in layouts[:4]] == [False, True, False, True]  # every second block shifted
    for logits, maps, layout in zip(rec.logits, rec.maps, layouts):
        bias = 0 if layout.keys is None else torch.where(layout.keys, 0.0, -100.0)
        scores = logits.view(-1, layout.windows, *logits.shape[1:]) + (bias[:, None] if layout.keys is not None else 0)
        assert torch.allclose(scores.softmax(-1).view_as(maps), maps, atol=1e-6)


def test_masked_ihc_ignores_keys_of_other_regions():
    torch.manual_seed(0)
    logits = torch.randn(2 * 4, 3, 49, 49)
    keys = torch.rand(4, 49, 49) > 0.3
    keys |= torch.eye(49, dtype=torch.bool)  # a query always sees itself
    sim = head_pair_ssim(logits, (7, 7), 0, keys=keys)
    assert sim.shape == (8, 3, 49)
    noise = 50 * torch.randn(2, 4, 3, 49, 49) * (~keys)[None, :, None]  # only on masked keys
    changed = (logits.view(2, 4, 3, 49, 49) + noise).view_as(logits)
    assert torch.allclose(head_pair_ssim(changed, (7, 7), 0, keys=keys), sim, atol=1e-6)
    assert not torch.allclose(head_pair_ssim(changed, (7, 7), 0), head_pair_ssim(logits, (7, 7), 0), atol=1e-3)
    all_keys = torch.ones(4, 49, 49, dtype=torch.bool)  # no mask: the plain global SSIM
    assert torch.allclose(head_pair_ssim(logits, (7, 7), 0, keys=all_keys), head_pair_ssim(logits, (7, 7), 0),
                          atol=1e-5)


def _tiny_swin():
    """A two-stage Swin on 28x28 grayscale: a 14x14 grid of four 7x7 windows (the second block shifted),
    then one 7x7 window with more heads."""
    torch.manual_seed(0)
    model = build_teacher(dict(family="swin", img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16,
                               depths=[2, 2], num_heads=[2, 4], window_size=7, mlp_ratio=2.0))
    model.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "num_classes": 10}
    return capture_attention(model).eval()


def test_swin_synthesis_losses_and_refused_options():
    model = _tiny_swin()
    rec = AttentionRecorder(model)
    with torch.no_grad():
        model(torch.randn(3, 1, 28, 28))
    sim = ihc_similarity(rec, model, 0)
    # per image: stage 1 (4 windows x 49 queries x 1 pair, two blocks), stage 2 (49 queries x 6 pairs, two blocks)
    assert sim.shape == (3, 2 * 4 * 49 + 2 * 49 * 6) and sim.abs().max() <= 1 + 1e-5
    recipe = SynthesisRecipe(num_images=2, batch_size=2, steps=2, jitter=1, patch_entropy=0.1)
    out = synthesize_batch(model, recipe, data_config(model), 0, torch.device("cpu"))
    assert {"ihc", "entropy", "ce"} <= set(out["losses"]) and out["images"].shape == (2, 1, 28, 28)
    with pytest.raises(MimiqError, match="mask_align does not apply to swin"):
        synthesize_batch(model, SynthesisRecipe(num_images=2, batch_size=2, steps=1, mask_align=1.0),
                         data_config(model), 0, torch.device("cpu"))
    with pytest.raises(MimiqError, match="ihc_window > 1 does not apply to swin"):
        synthesize_batch(model, SynthesisRecipe(num_images=2, batch_size=2, steps=1, ihc_window=3),
                         data_config(model), 0, torch.device("cpu"))


def test_swin_student_quantizes_every_stage_and_distills_window_heads():
    model = _tiny_swin()
    student = build_student(model, parse_bits("w4a8"))
    calibrate(student, torch.randn(4, 1, 28, 28))
    for name in ("layers.0.blocks.1.attn.qkv", "layers.0.blocks.1.attn.proj", "layers.0.blocks.1.mlp.fc1",
                 "layers.0.blocks.1.mlp.fc2", "layers.1.downsample.reduction", "head.fc"):
        assert type(student.get_submodule(name)) is QuantLinear, name
    for name in ("layers.0.blocks.1.attn.qk", "layers.1.blocks.0.attn.av"):
        assert type(student.get_submodule(name)) is QuantMatMul, name
    t_rec = AttentionRecorder(model, logits=False, outputs=True, maps=True)
    s_rec = AttentionRecorder(student, logits=False, outputs=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model(x)
    student(x)
    assert t_rec.outputs[0].shape == (2 * 4, 2, 49, 8) and t_rec.outputs[-1].shape == (2, 4, 49, 8)
    layouts = family_of(model).layouts(model)
    prefixes, cls = [l.prefix for l in layouts], [l.cls for l in layouts]
    assert had_loss(t_rec.outputs, t_rec.outputs, prefixes, t_rec.maps, cls).abs() < 1e-6
    loss = had_loss(t_rec.outputs, s_rec.outputs, prefixes, t_rec.maps, cls)
    loss.backward()
    assert 0 < loss.item() < 1 and student.layers[0].blocks[1].attn.qkv.weight.grad.abs().sum() > 0


def test_vit_layouts_for_distilled_and_register_token_models():
    _, deit = _pair(DEIT)
    layout = family_of(deit).layouts(deit)[0]
    assert (layout.prefix, layout.cls, layout.grid) == (2, True, (14, 14))  # CLS and distillation token
    torch.manual_seed(0)
    gap = capture_attention(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              num_classes=10, class_token=False, reg_tokens=4, global_pool="avg"))
    layouts = family_of(gap).layouts(gap)
    assert len(layouts) == 2 and (layouts[0].prefix, layouts[0].cls) == (4, False)  # registers, no CLS
    rec = AttentionRecorder(gap)
    with torch.no_grad():
        gap(torch.randn(2, 3, 32, 32))
    assert ihc_similarity(rec, gap, 0).shape == (2, 2, 1, 16)  # register tokens are no queries


def test_a_model_of_no_known_family_is_refused():
    with pytest.raises(MimiqError, match="no attention blocks of a known family"):
        family_of(timm.create_model("resnet18", pretrained=False))


def _imagenet_folder(root):
    """Four random JPEGs in two ImageNet synset folders: enough for verify's plumbing."""
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        (root / synset).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / synset / f"{i}.JPEG")
    return root


@pytest.mark.parametrize("name", [SWIN, DEIT])
def test_tiny_run_of_a_timm_model_passes_verify_and_both_checks(name, tmp_path, cli):
    """synthesize -> finetune (KL + L_HAD) -> export -> build -> verify -> bench through the CLI on a random-init
    timm model, and the exported graphs pass `check` for both targets at W8A8 and W4A8."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():  # a random head's logits are near ties; a larger one makes top-1 well defined
        heads = model.get_classifier()  # distilled DeiT: (head, head_dist)
        for head in heads if isinstance(heads, tuple) else (heads,):
            head.weight.mul_(50)
    ckpt = tmp_path / "random.pt"
    torch.save(model.state_dict(), ckpt)
    val = _imagenet_folder(tmp_path / "val")
    run = tmp_path / "run"
    teacher = ("--model", name, "--checkpoint", ckpt)
    r = cli("synthesize", *teacher, "--out", run, "--num-images", 2, "--batch-size", 2, "--steps", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("finetune", *teacher, "--data", run, "--bits", "w8a8", "--epochs", 1, "--batch-size", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "finetune.json").read_text())["history"][0]["had"] > 0
    for verb in (("export",), ("build", "--backend", "onnxruntime")):  # OpenVINO / PyTorch have their own tests
        r = cli(*verb, run)
        assert r.returncode == 0, (verb, r.stderr[-2000:])
    built = json.loads((run / "build.json").read_text())["artifacts"]["ort-cpu-w8a8"]
    assert built["integer_kernels"].get("QLinearMatMul", 0) + built["integer_kernels"].get("MatMulIntegerToFloat", 0) > 0
    r = cli("verify", run, "--val-dir", val)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    report = json.loads((run / "verify.json").read_text())
    assert report["n"] == 4 and report["failed"] == [] and report["artifacts"]["ort-cpu-w8a8"]["checked"]
    rows = bench(run, [2], warmup=1, iters=2, min_seconds=0, progress=lambda m: None)["rows"]
    assert {r["artifact"] for r in rows} >= {"ort-cpu-w8a8", "ort-cpu-fp32"} and all(r["p50_ms"] > 0 for r in rows)
    for graph, target in ((QDQ_ONNX, "onnxruntime"), (TRT_ONNX, "tensorrt")):
        r = cli("check", run / "export" / graph, "--target", target)
        assert r.returncode == 0, r.stdout + r.stderr
    # W4A8 (INT4 weights): the TensorRT graph of the same teacher
    teacher_model = capture_attention(model).eval()
    student = build_student(teacher_model, parse_bits("w4a8"))
    calibrate(student, torch.randn(2, 3, 224, 224))
    export_student(student, tmp_path / "w4a8", ExportConfig(), progress=lambda m: None)
    assert check_graph(onnx.load(str(tmp_path / "w4a8" / "export" / TRT_ONNX)), "tensorrt") == []


def test_swin_teacher_refuses_a_timm_that_builds_it_differently(monkeypatch):
    """timm 1.0.29 merges fmnist-swin's 7x7 stage into 3x3, not 4x4: the embedded weights do not fit it
    (seen on a GPU host's preinstalled timm). The user gets the version to install, not a shape mismatch."""
    from mimiq_deploy.models import load_model

    monkeypatch.setattr(timm, "__version__", "1.0.29")
    with pytest.raises(MimiqError, match=r"need timm >= 1\.0\.31, this is timm 1\.0\.29"):
        load_model("fmnist-swin")
