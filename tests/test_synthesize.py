"""MimiQ synthesis: losses, sharded resumable output, torchrun ranks, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CPU_ONLY_ENV
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.similarity import global_ssim, head_pair_ssim
from mimiq_deploy.synthesize import (SynthesisRecipe, load_synthesis_recipe, load_synthetic, manifest_path,
                                     shard_path, synthesize)

TINY = dict(num_images=10, batch_size=4, steps=3, jitter=2)


def _shards(run_dir):
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run_dir / "synth").glob("shard_*.pt"))}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k]["images"], b[k]["images"]) and torch.equal(a[k]["labels"], b[k]["labels"])


def test_global_ssim_properties():
    x = torch.rand(5, 49)
    assert torch.allclose(global_ssim(x, x), torch.ones(5), atol=1e-6)
    assert (global_ssim(x, 1 - x) < 0).all()  # an inverted map is anti-correlated; IHC squares it
    logits = torch.randn(2, 4, 50, 50)
    sim = head_pair_ssim(logits, (7, 7), prefix=1)
    assert sim.shape == (2, 6, 49)
    windowed = head_pair_ssim(logits, (7, 7), prefix=1, window=3)
    assert windowed.shape == (2, 6, 49)


def test_synthesis_resumes_to_the_same_shards(teacher, tmp_path, cpu_only):
    recipe = SynthesisRecipe(**TINY)
    full = synthesize(teacher, "fmnist-vit", tmp_path / "a", recipe, progress=False).to_json()
    assert full["complete"] and full["num_images_done"] == 10 and full["kind"] == "mimiq"
    assert {"ihc", "ce", "tv", "teacher_top1"} <= set(full["final_losses"])
    images, labels, _ = load_synthetic(tmp_path / "a")
    assert images.shape == (10, 1, 28, 28) and labels.shape == (10,)

    # A run killed after its first shard: the manifest exists, shards 1 and 2 do not.
    synthesize(teacher, "fmnist-vit", tmp_path / "b", SynthesisRecipe(**TINY), progress=False)
    for s in (1, 2):
        shard_path(tmp_path / "b", s).unlink()
    kept = shard_path(tmp_path / "b", 0).stat().st_mtime_ns
    synthesize(teacher, "fmnist-vit", tmp_path / "b", recipe, progress=False)
    assert shard_path(tmp_path / "b", 0).stat().st_mtime_ns == kept  # not redone
    _same(_shards(tmp_path / "a"), _shards(tmp_path / "b"))


def test_ablation_switches(teacher, tmp_path):
    base = synthesize(teacher, "fmnist-vit", tmp_path / "base", SynthesisRecipe(**TINY, ihc=False),
                      progress=False).to_json()
    assert base["kind"] == "base" and "ihc" not in base["final_losses"]
    noise = synthesize(teacher, "fmnist-vit", tmp_path / "noise", SynthesisRecipe(**TINY, noise_only=True),
                       progress=False).to_json()
    assert noise["kind"] == "noise"
    images, _, _ = load_synthetic(tmp_path / "noise")
    assert 0.5 < images.std() < 1.5  # clamped Gaussian noise, untouched


def test_torchrun_two_ranks_match_one_process(teacher, tmp_path, cpu_only):
    recipe = SynthesisRecipe(**TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: float sums then agree to the bit
    try:
        synthesize(teacher, "fmnist-vit", tmp_path / "one", recipe, progress=False)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "mimiq_deploy", "synthesize", "--out", str(tmp_path / "two"), "--num-images", "10",
           "--batch-size", "4", "--steps", "3", "--recipe", str(tmp_path / "r.toml")]
    (tmp_path / "r.toml").write_text("[synthesize]\njitter = 2\n")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_ONLY_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    _same(_shards(tmp_path / "one"), _shards(tmp_path / "two"))
    assert json.loads(manifest_path(tmp_path / "two").read_text())["complete"]


def test_bad_input(cli, tmp_path, teacher):
    bad = tmp_path / "bad.toml"
    bad.write_text("[synthesize]\nstepz = 3\n")
    with pytest.raises(MimiqError, match="unknown key"):
        load_synthesis_recipe(bad, {})
    r = cli("synthesize", "--out", tmp_path / "x", "--num-images", "0")
    assert r.returncode == 1 and "must be positive" in r.stderr and "Traceback" not in r.stderr
    synthesize(teacher, "fmnist-vit", tmp_path / "other", SynthesisRecipe(**TINY), progress=False)
    manifest = json.loads(manifest_path(tmp_path / "other").read_text())
    manifest["model"] = "deit_tiny_patch16_224"
    manifest_path(tmp_path / "other").write_text(json.dumps(manifest))
    r = cli("synthesize", "--out", tmp_path / "other", "--num-images", "10", "--batch-size", "4", "--steps", "3")
    assert r.returncode == 1 and "holds shards of model 'deit_tiny_patch16_224'" in r.stderr


def test_patch_entropy_term(teacher, tmp_path):
    from mimiq_deploy.synthesize import patch_similarity_entropy
    tokens = torch.randn(3, 50, 16)
    same = tokens.clone()
    same[:, 1:] = tokens[:, 1:2]  # all patches alike: similarities all 1, no spread
    assert (patch_similarity_entropy(tokens, 1) > patch_similarity_entropy(same, 1) + 5).all()
    manifest = synthesize(teacher, "fmnist-vit", tmp_path, SynthesisRecipe(**TINY, patch_entropy=0.1),
                          progress=False).to_json()
    assert "entropy" in manifest["final_losses"] and manifest["recipe"]["patch_entropy"] == 0.1


def test_runs_from_before_an_option_existed_still_resume(teacher, tmp_path):
    synthesize(teacher, "fmnist-vit", tmp_path, SynthesisRecipe(**TINY), progress=False)
    manifest = json.loads(manifest_path(tmp_path).read_text())
    for key in ("patch_entropy", "mask_align", "keep_start", "keep_end", "keep_drop"):
        del manifest["recipe"][key]  # as written before the MaskAQ options were added
    del manifest["student"]
    manifest_path(tmp_path).write_text(json.dumps(manifest))
    shard_path(tmp_path, 2).unlink()
    assert synthesize(teacher, "fmnist-vit", tmp_path, SynthesisRecipe(**TINY), progress=False).to_json()["complete"]


def test_low_frequency_start_is_smooth_and_noise_sets_stay_white(teacher, tmp_path):
    def roughness(run):  # mean |neighbour difference| over the image's std: ~1.1 for white noise
        x, _, _ = load_synthetic(run)
        return ((x[..., 1:] - x[..., :-1]).abs().mean() / x.std()).item()

    kw = dict(TINY, steps=0, jitter=0)
    synthesize(teacher, "fmnist-vit", tmp_path / "white", SynthesisRecipe(**kw), progress=False)
    synthesize(teacher, "fmnist-vit", tmp_path / "blobs", SynthesisRecipe(**kw, init_grid=7), progress=False)
    synthesize(teacher, "fmnist-vit", tmp_path / "noise", SynthesisRecipe(**kw, init_grid=7, noise_only=True),
               progress=False)
    assert roughness(tmp_path / "white") > 0.9 and roughness(tmp_path / "noise") > 0.9
    assert roughness(tmp_path / "blobs") < 0.4
    blobs, _, _ = load_synthetic(tmp_path / "blobs")
    assert 0.5 < blobs.std() < 1.5  # the recipe's init_std, before clamping to the pixel range
    with pytest.raises(MimiqError, match="init_grid"):
        load_synthesis_recipe(None, {"init_grid": -1})
