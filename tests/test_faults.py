"""Concurrent runs and damaged files: one line naming the problem, exit status 1, no traceback."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from mimiq_deploy.cli import main
from mimiq_deploy.io import run_dir_lock
from mimiq_deploy.synthesize import save_image_set, shard_path

ROOT = Path(__file__).resolve().parent.parent
FMNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "num_classes": 10}
HOLD_LOCK = "import sys, time; from mimiq_deploy.io import run_dir_lock\n" \
            "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n"


def _refused(args, *needles):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_second_quantize_on_a_run_directory_refuses(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        _refused(["quantize", "--bits", "w8a8", "--out", run], "in use by another quantize run",
                 f"pid {holder.pid}")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(run):  # the killed run left its lock file, not its lock
        pass


def _synthetic_set(run_dir):
    torch.manual_seed(0)
    save_image_set(run_dir, "fmnist-vit", torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)), "noise",
                   FMNIST_CFG, shard_size=8)


def test_damaged_run_directory_files_name_the_file(tmp_path):
    _synthetic_set(tmp_path)
    good = shard_path(tmp_path, 0).read_bytes()
    _truncate(shard_path(tmp_path, 0))
    _refused(["inspect-attention", "--data", tmp_path, "--no-real"], "shard_00000.pt", "corrupt")
    torch.save({"not": "a shard"}, shard_path(tmp_path, 0))
    _refused(["inspect-attention", "--data", tmp_path, "--no-real"], "shard_00000.pt", "not a synthetic shard")
    shard_path(tmp_path, 0).write_bytes(good)

    manifest = tmp_path / "synth" / "manifest.json"
    text = manifest.read_text()
    _truncate(manifest)
    _refused(["inspect-attention", "--data", tmp_path, "--no-real"], "manifest.json", "corrupt")
    manifest.write_text(text)

    torch.save({"signature": {}, "epoch": 1}, tmp_path / "finetune_state.pt")
    _truncate(tmp_path / "finetune_state.pt")
    _refused(["finetune", "--data", tmp_path, "--bits", "w8a8", "--epochs", "1", "--batch-size", "8"],
             "finetune_state.pt", "corrupt")
    (tmp_path / "finetune_state.pt").unlink()

    torch.save({"format": "mimiq-student-v1", "state_dict": {"w": torch.zeros(1000)}}, tmp_path / "student.pt")
    _truncate(tmp_path / "student.pt")
    _refused(["export", tmp_path], "student.pt", "corrupt")


def test_teacher_resume_state_damaged(tmp_path):
    out = tmp_path / "teacher.pt"
    Path(str(out) + ".resume").write_bytes(b"\x80\x02garbage")
    _refused(["teacher", "train", "--out", out, "--epochs", "1", "--train-subset", "64"], "teacher.pt.resume")


def test_damaged_onnx_files_name_the_file(tmp_path):
    exp = tmp_path / "export"
    exp.mkdir()
    (exp / "model_qdq.onnx").write_bytes(b"\x08\x07\x12\x05torch\x3a\xff\xff")  # a cut-off protobuf
    (exp / "export.json").write_text(json.dumps({"bits": "w8a8", "config": {}, "notes": {}, "model_name": "fmnist-vit",
                                                 "pretrained_cfg": {**FMNIST_CFG, "input_size": [1, 28, 28]}}))
    _refused(["build", tmp_path], "model_qdq.onnx", "corrupt")

    (tmp_path / "build.json").write_text(json.dumps({"artifacts": {"ort-cpu-w8a8": {
        "backend": "onnxruntime", "provider": "CPUExecutionProvider", "path": str(exp / "model_qdq.onnx"),
        "precision": "w8a8"}}}))
    _refused(["bench", tmp_path, "--batch", "1"], "model_qdq.onnx")

    (tmp_path / "build.json").write_text('{"artifacts": {')
    _refused(["bench", tmp_path, "--batch", "1"], "build.json", "corrupt")


def test_a_full_disk_is_one_line_leaves_no_partial_file_and_the_run_resumes(tmp_path, monkeypatch):
    """The disk fills while the second of two shards is written: one line, no partial file, and the
    rerun (space back) keeps the first shard and makes only the second."""
    import errno

    import mimiq_deploy.io as io

    run = tmp_path / "run"
    args = ["synthesize", "--out", run, "--num-images", 16, "--batch-size", 8, "--steps", 1]
    real_save, saved = torch.save, []

    def save_until_full(obj, f, *a, **k):
        if len(saved) == 1:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(io.torch, "save", save_until_full)
    _refused(args, "no space left", "shard_00001.pt", "rerun")
    assert sorted(p.name for p in (run / "synth").iterdir() if "shard" in p.name) == ["shard_00000.pt"]
    first = shard_path(run, 0).stat().st_mtime_ns
    monkeypatch.setattr(io.torch, "save", real_save)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert shard_path(run, 1).exists() and shard_path(run, 0).stat().st_mtime_ns == first
