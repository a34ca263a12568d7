"""export-calib: the synthetic set as a calibration file (npz / npy) for other quantizers, and the ONNX Runtime
reader over it; ModelOpt takes the npz as is where nvidia-modelopt is installed."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnxruntime.quantization import QuantFormat, quantize_static

from conftest import TINY_FMNIST_RECIPE
from mimiq_deploy.build import INPUT_NAME
from mimiq_deploy.calib import CalibReader, read_calib
from mimiq_deploy.cli import main
from mimiq_deploy.data import fmnist_eval_dataset
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.quant import calibrate, parse_bits
from mimiq_deploy.quant.student import build_student
from mimiq_deploy.run_dir import FLOAT_ONNX, CalibRecord, Preprocessing, RunDir
from mimiq_deploy.synthesize import load_synthesis_recipe, synthesize


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, teacher) -> RunDir:
    """A tiny run: the test-size synthetic set (2 shards of 16, one step each), a W8A8 student, exported
    (min-max calibrated on 4 of the images: only its float twin and its preprocessing matter here)."""
    root = tmp_path_factory.mktemp("calib")
    (root / "recipe.toml").write_text(TINY_FMNIST_RECIPE)
    rd = RunDir(root / "run")
    synthesize(teacher, "fmnist-vit", rd, load_synthesis_recipe(root / "recipe.toml", {"steps": 1}), progress=False)
    student = build_student(teacher, parse_bits("w8a8"))
    calibrate(student, torch.from_numpy(shard_images(rd)[0][:4]), method="minmax")
    export_student(student, rd, ExportConfig(), progress=lambda m: None)
    return rd


def shard_images(rd: RunDir):
    """The shards' images and labels as synthesize stored them, concatenated in shard order."""
    shards = [torch.load(rd.shard(i), weights_only=True) for i in range(rd.read_manifest().num_shards)]
    return (torch.cat([s["images"] for s in shards]).float().numpy(), torch.cat([s["labels"] for s in shards]).numpy())


def graph_input(path) -> str:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(args, *needles, run=None):
    """The CLI refuses with one `error:` line holding `needles`, exit 1, and leaves no calibration file."""
    result = invoke(*args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if run is not None:
        assert not (run / "calib").exists() or not list((run / "calib").iterdir())
    return lines[0]


@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_export_calib_writes_the_shards_images_keyed_by_the_graphs_input(run_dir, fmt):
    result = invoke("export-calib", run_dir.root, "--format", fmt)
    assert result.exit_code == 0, result.output
    path = run_dir.root / "calib" / f"calib.{fmt}"
    assert f"wrote {path}: 32 images float32" in result.output
    images, labels = shard_images(run_dir)
    name = graph_input(run_dir.graph(FLOAT_ONNX))
    data = np.load(path)
    if fmt == "npz":
        assert data.files == [name]  # nothing else: ModelOpt feeds every key to the input of that name
        data = data[name]
    assert data.dtype == np.float32 and data.shape == (32, 1, 28, 28)
    np.testing.assert_array_equal(data, images)
    record = CalibRecord.from_json(json.loads((path.parent / f"calib.{fmt}.json").read_text()))
    assert record.input_name == name and record.shape == [32, 1, 28, 28] and record.dtype == "float32"
    assert record.targets == labels.tolist() and record.kind == "mimiq" and record.model == "fmnist-vit"
    pre = Preprocessing.from_timm(run_dir.read_export().pretrained_cfg)
    assert record.preprocessing == pre and pre.interpolation  # the export's, with what the manifest lacks
    manifest = run_dir.read_manifest()
    assert record.preprocessing.mean == manifest.mean and record.preprocessing.std == manifest.std
    assert read_calib(path)[0] == name
    np.testing.assert_array_equal(read_calib(path)[1], images)


def test_limit_and_out(run_dir, tmp_path):
    out = tmp_path / "some" / "where.npy"
    assert invoke("export-calib", run_dir.root, "--format", "npy", "--out", out, "--limit", 20).exit_code == 0
    images, labels = shard_images(run_dir)
    np.testing.assert_array_equal(np.load(out), images[:20])  # the first 20: shard 0 and 4 of shard 1
    name, _, record = read_calib(out)
    assert name == record.input_name and record.targets == labels[:20].tolist()
    assert sorted(p.name for p in out.parent.iterdir()) == ["where.npy", "where.npy.json"]  # no temporary left


def test_before_export_the_name_export_gives(run_dir, tmp_path):
    """A run directory with only the synthetic set: the input name export will give, the set's normalization."""
    run = tmp_path / "synth-only"
    RunDir(run).link_synthetic(run_dir)
    assert invoke("export-calib", run).exit_code == 0
    name, images, record = read_calib(run / "calib" / "calib.npz")
    assert name == INPUT_NAME == graph_input(run_dir.graph(FLOAT_ONNX))
    manifest = run_dir.read_manifest()
    assert record.preprocessing.mean == manifest.mean and record.preprocessing.input_size == [1, 28, 28]
    np.testing.assert_array_equal(images, shard_images(run_dir)[0])


def test_refusals_are_one_line_and_write_nothing(run_dir, tmp_path):
    refused(["export-calib", tmp_path / "nowhere"], "run directory", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["export-calib", empty], "no synthetic set", "mimiq-deploy synthesize --out", run=empty)
    partial = tmp_path / "partial"
    shutil.copytree(run_dir.synth, partial / "synth")
    RunDir(partial).shard(1).unlink()
    refused(["export-calib", partial], "misses 1 of 2 shards", "synthesize", run=partial)
    refused(["export-calib", run_dir.root, "--format", "csv", "--out", tmp_path / "x.csv"],
            "unknown calibration file format 'csv'")
    refused(["export-calib", run_dir.root, "--out", tmp_path / "x.npy"], "must end in .npz")
    refused(["export-calib", run_dir.root, "--limit", 0], "--limit")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.npy").exists()


def test_reader_over_the_file_and_the_run_directory(run_dir):
    invoke("export-calib", run_dir.root)
    images = shard_images(run_dir)[0]
    for source in (run_dir.root / "calib" / "calib.npz", run_dir.root):
        reader = CalibReader(source, batch_size=10)
        batches = list(iter(reader.get_next, None))
        assert len(reader) == 4 and [b[INPUT_NAME].shape[0] for b in batches] == [10, 10, 10, 2]
        np.testing.assert_array_equal(np.concatenate([b[INPUT_NAME] for b in batches]), images)
        assert reader.get_next() is None
        assert len(list(reader)) == 4 and len(list(reader)) == 4  # a pass over it starts from the first batch
        reader.rewind()
        assert reader.get_next()[INPUT_NAME].shape == (10, 1, 28, 28)
        assert [b[INPUT_NAME].shape[0] for b in CalibReader(source, batch_size=10, limit=15)] == [10, 5]


def _cosine(a, b):
    return ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min()


def test_quantize_static_takes_the_synthetic_set(run_dir, tmp_path):
    float_graph = run_dir.graph(FLOAT_ONNX)
    out = tmp_path / "ort_int8.onnx"
    quantize_static(str(float_graph), str(out), CalibReader(run_dir.root, batch_size=16), quant_format=QuantFormat.QDQ)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    x = shard_images(run_dir)[0]
    ref = ort.InferenceSession(str(float_graph), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    assert got.shape == ref.shape and _cosine(got, ref) > 0.95


def _modelopt_on_the_npz(run_dir: RunDir, out):
    """ModelOpt's own CLI, INT8 max-calibrated on export-calib's npz of the run (FP32 outside its Q/DQ)."""
    invoke("export-calib", run_dir.root)
    proc = subprocess.run([sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", run_dir.graph(FLOAT_ONNX),
                           "--quantize_mode", "int8", "--calibration_method", "max",
                           "--calibration_data_path", run_dir.root / "calib" / "calib.npz",
                           "--calibration_eps", "cpu", "--high_precision_dtype", "fp32", "--output_path", out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_modelopt_takes_the_npz_as_is(run_dir, tmp_path):
    """ModelOpt's own CLI with the npz as its calibration data (runs where nvidia-modelopt is installed)."""
    pytest.importorskip("modelopt.onnx.quantization")
    out = _modelopt_on_the_npz(run_dir, tmp_path / "modelopt_int8.onnx")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    x = shard_images(run_dir)[0]
    ref = ort.InferenceSession(str(run_dir.graph(FLOAT_ONNX)), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    assert _cosine(got, ref) > 0.95


def _fmnist_top1(graph, rd: RunDir, n: int = 2000) -> float:
    ds = fmnist_eval_dataset(rd.read_export().pretrained_cfg)
    x, y = ds.tensors[0][:n].numpy(), ds.tensors[1][:n].numpy()
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return 100.0 * float((sess.run(None, {INPUT_NAME: x})[0].argmax(1) == y).mean())


def test_modelopt_on_the_npz_scores_as_on_the_images_themselves(run_dir, tmp_path):
    """The calibrated model ModelOpt makes from export-calib's npz (its CLI) is the one it makes from the synthetic
    images handed over in memory (its Python API): Fashion-MNIST top-1 within 0.2 on 2,000 test images. The
    benchmark (benchmarks/accuracy.py rows 14-16) reproduces the preset's table the same way."""
    quantization = pytest.importorskip("modelopt.onnx.quantization")
    by_file = _modelopt_on_the_npz(run_dir, tmp_path / "by_file.onnx")
    in_memory = tmp_path / "in_memory.onnx"  # the same settings through the Python API
    quantization.quantize(str(run_dir.graph(FLOAT_ONNX)), quantize_mode="int8", calibration_method="max",
                          calibration_data={INPUT_NAME: shard_images(run_dir)[0]}, calibration_eps=["cpu"],
                          high_precision_dtype="fp32", output_path=str(in_memory))
    float_top1, file_top1, memory_top1 = (_fmnist_top1(g, run_dir) for g in (run_dir.graph(FLOAT_ONNX), by_file, in_memory))
    assert abs(file_top1 - memory_top1) <= 0.2, (file_top1, memory_top1)
    assert file_top1 > float_top1 - 5.0, (file_top1, float_top1)  # a working INT8 model, not a broken calibration
