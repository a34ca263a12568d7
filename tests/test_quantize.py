"""`quantize` end to end on a tiny recipe: every stage, the report, and a rerun that skips them all."""
import json

from conftest import TINY_FMNIST_RECIPE as TINY


def test_quantize_end_to_end_and_rerun(cli, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    export_cfg = tmp_path / "export.toml"
    export_cfg.write_text("batch_sizes = [1, 8]\nbench_seconds = 0.2\n")  # the default verify thresholds apply
    run = tmp_path / "run"
    args = ("quantize", "--bits", "w8a8", "--out", run, "--recipe", recipe, "--export-config", export_cfg,
            "--verify-limit", 500)
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ort-cpu-w8a8" in first.stdout and "teacher (PyTorch fp32)" in first.stdout
    report = json.loads((run / "report.json").read_text())
    for key in ("teacher", "synthesize", "finetune", "export", "build", "verify", "bench", "versions", "device",
                "inter_head_similarity", "stage_seconds", "pretrained_cfg"):
        assert report.get(key) is not None, key
    assert report["verify"]["n"] == 500 and report["teacher"]["top1"] >= 89.0
    checked = {k: r for k, r in report["verify"]["artifacts"].items() if r["checked"]}  # integer QDQ artifacts
    assert "ort-cpu-w8a8" in checked and report["verify"]["failed"] == []
    assert all(r["agreement"] >= 99.5 and r["cosine"] >= 0.999 for r in checked.values()), checked
    assert {r["batch"] for r in report["bench"]["rows"]} == {1, 8}
    md = (run / "report.md").read_text()
    assert "| ort-cpu-w8a8 |" in md and "accuracy.png" in md and (run / "latency.png").exists()
    for plot in ("synthetic_vs_real.png", "activation_ranges.png", "loss_curves.png"):  # judging the set by eye
        assert plot in md and (run / plot).stat().st_size > 1000, plot
    ranges = report["activation_ranges"]
    assert len(ranges["names"]) == len(ranges["synthetic"]) == len(ranges["real"]) > 40
    assert len(report["synthesize"]["loss_curve"]["ihc"]) == len(report["synthesize"]["loss_curve"]["step"]) > 1

    second = cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("synthesize", "finetune", "export", "build", "verify", "bench"):
        assert f"[{stage}] complete, skipped" in second.stdout


def test_quantize_refuses_bad_input_before_work(cli, tmp_path):
    r = cli("quantize", "--bits", "w12a8", "--out", tmp_path / "x")
    assert r.returncode == 1 and "unsupported bit setting" in r.stderr and not (tmp_path / "x").exists()
    r = cli("quantize", "--model", "deit_tiny_patch16_224", "--preset", "fast", "--out", tmp_path / "y")
    assert r.returncode == 1 and "sized for the embedded fmnist-vit" in r.stderr
    # a width ONNX has no integer type for: refused before an hour of synthesis, not at export
    r = cli("quantize", "--bits", "w3a3", "--preset", "fast", "--out", tmp_path / "z")
    assert r.returncode == 1 and "no ONNX integer types" in r.stderr and "finetune --bits w3a3" in r.stderr
    assert not (tmp_path / "z").exists()
