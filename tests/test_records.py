"""Records written by earlier versions still read: the flat export config, build.json without back-end sections."""
from mimiq_deploy.export import ExportConfig, export_config
from mimiq_deploy.run_dir import BenchRecord, BuildRecord, VerifyRecord

# export.json's config as versions before the per-back-end tables wrote it
FLAT_CONFIG = {"opset": 21, "int4_block_size": 32, "min_batch": 1, "opt_batch": 32, "max_batch": 64, "fp16_io": True,
               "workspace_mib": 2048, "ort_int8": "auto", "min_agreement": 99.5, "min_cosine": 0.999,
               "batch_sizes": [1, 32], "bench_seconds": 2.0}


def test_flat_export_config_of_earlier_versions_reads_into_its_tables():
    assert export_config(FLAT_CONFIG, "old export.json") == ExportConfig()
    old = export_config({**FLAT_CONFIG, "ort_int8": "int8", "bench_seconds": 0.5, "fp16_io": False}, "old")
    new = export_config({"onnxruntime": {"int8": "int8"}, "bench": {"seconds": 0.5},
                         "tensorrt": {"fp16_io": False}}, "new")
    assert old == new and old != ExportConfig()
    assert export_config(ExportConfig().to_json(), "round trip") == ExportConfig()


def test_build_verify_bench_records_of_earlier_versions_read():
    old_build = {"bits": "w8a8", "skipped": {}, "ort_encoding": {"encoding": "uint8"}, "artifacts": {
        "ort-cpu-w8a8": {"backend": "onnxruntime", "path": "m.onnx", "precision": "w8a8 QDQ", "quantized": True,
                         "integer_kernels": {"MatMulIntegerToFloat": 3}},
        "ort-cpu-fp32": {"backend": "onnxruntime", "path": "f.onnx", "precision": "fp32"}}}
    built = BuildRecord.from_json(old_build)
    assert built.artifacts["ort-cpu-w8a8"].float_twin == "ort-cpu-fp32"  # earlier versions named no twin
    assert built.artifacts["ort-cpu-w8a8"].info == {"integer_kernels": {"MatMulIntegerToFloat": 3}}
    assert built.backends == {}
    verify = VerifyRecord.from_json({"dataset": "x", "n": 2, "student_top1": 50.0, "failed": ["a"],
                                     "artifacts": {"a": {"precision": "w8a8", "agreement": 50.0, "cosine": 0.9,
                                                         "max_abs_error": 1.0, "top1": 50.0, "checked": True}}})
    assert verify.artifacts["a"].agreement == 50.0 and verify.failed == ["a"]
    assert VerifyRecord.from_json(verify.to_json()) == verify
    bench = BenchRecord.from_json({"rows": [{"artifact": "a", "precision": "w8a8", "batch": 1, "iters": 3,
                                             "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "throughput_ips": 9.0}],
                                   "speedups": [], "skipped": {}})  # no profiles, no interleaved flag
    assert bench.p50("a", 1) == 1.0 and bench.batches == [1] and bench.profiles == []
