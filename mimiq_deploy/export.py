"""`mimiq-deploy export`: the student's learned scales folded into ONNX QDQ graphs, and the deployment config.

1. torch -> ONNX (TorchScript exporter, opset 21, dynamic batch): every quantizer leaves a
   `mimiq::FakeQuant` placeholder holding its scale, bits and axis; the float twin is traced too;
2. every back end of the registry lowers the placeholders into the graph variants its engine wants
   (qdq.lower_fake_quant plus its own passes, backends/<name>/);
3. each graph a back end marks checked passes its conformance rules before it is written.
"""
import dataclasses
import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from .backends import BACKENDS, ExportContext
from .config import dataclass_from, read_toml
from .errors import MimiqError
from .onnx_graph import constant_reshape_shapes, save_onnx
from .quant.convert import set_quant_enabled
from .run_dir import FLOAT_ONNX, ExportRecord, Preprocessing, RunDir


@dataclasses.dataclass
class VerifyConfig:
    min_agreement: float = 99.5    # top-1 agreement of each integer artifact with the fake-quant student, percent
    min_cosine: float = 0.999      # mean logit cosine similarity
    LEGACY = {"min_agreement": "min_agreement", "min_cosine": "min_cosine"}  # flat key of earlier configs -> field


@dataclasses.dataclass
class BenchConfig:
    batch_sizes: list = dataclasses.field(default_factory=lambda: [1, 32])
    seconds: float = 2.0           # least measured time per artifact and batch size
    LEGACY = {"batch_sizes": "batch_sizes", "bench_seconds": "seconds"}


def _default_tables() -> dict:
    return {b.name: b.config_class() for b in BACKENDS.values() if b.config_class}


@dataclasses.dataclass
class ExportConfig:
    """The deployment config (export/*.toml): the graphs' shape, each back end's table ([onnxruntime],
    [tensorrt], ...: its config_class), and the [verify] and [bench] tables."""
    opset: int = 21
    int4_block_size: int = 32      # INT4 weights block-wise along the input dimension (TensorRT, MatMulNBits)
    min_batch: int = 1             # dynamic batch range (TensorRT optimization profile, model-repository max_batch)
    opt_batch: int = 32
    max_batch: int = 64
    backends: dict = dataclasses.field(default_factory=_default_tables)  # back-end name -> its table
    verify: VerifyConfig = dataclasses.field(default_factory=VerifyConfig)
    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)

    GRAPH_KEYS = ("opset", "int4_block_size", "min_batch", "opt_batch", "max_batch")

    def backend(self, name: str):
        """A back end's table of this config."""
        return self.backends[name]

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in self.GRAPH_KEYS},
                **{name: dataclasses.asdict(table) for name, table in self.backends.items()},
                "verify": dataclasses.asdict(self.verify), "bench": dataclasses.asdict(self.bench)}


def _tables() -> dict:
    """Table name -> its dataclass: every back end with a config, then verify and bench."""
    return {**{b.name: b.config_class for b in BACKENDS.values() if b.config_class},
            "verify": VerifyConfig, "bench": BenchConfig}


def export_config(values: dict, where: str) -> ExportConfig:
    """An ExportConfig from a TOML file's tables or a stored record, validated. Absent keys take their defaults
    (records of earlier versions); the flat keys of earlier versions (ort_int8, fp16_io, min_agreement,
    bench_seconds, ...) still read, each into its table."""
    values, tables = dict(values), {name: {} for name in _tables()}
    for name, cls in _tables().items():
        for old, field in getattr(cls, "LEGACY", {}).items():
            if old in values and not isinstance(values[old], dict):
                tables[name][field] = values.pop(old)
        table = values.pop(name, {})
        if not isinstance(table, dict):
            raise MimiqError(f"[{name}] in {where} must be a table, got {table!r}")
        tables[name].update(table)
    built = {name: dataclass_from(cls, tables[name], f"{where} [{name}]") for name, cls in _tables().items()}
    unknown = sorted(set(values) - set(ExportConfig.GRAPH_KEYS))
    if unknown:
        raise MimiqError(f"unknown key(s) {unknown} in {where}; known: {list(ExportConfig.GRAPH_KEYS)} and the "
                         f"tables {sorted(_tables())}")
    verify, bench = built.pop("verify"), built.pop("bench")
    return ExportConfig(**values, backends=built, verify=verify, bench=bench)


def load_export_config(path: str | Path | None) -> ExportConfig:
    return export_config(read_toml(path), str(path)) if path else ExportConfig()


def stored_export_config(export: ExportRecord) -> ExportConfig:
    """The config an export recorded (export.json's config; earlier versions' flat form too)."""
    return export_config(export.config, "export.json [config]")


def torch_to_onnx(model: torch.nn.Module, input_size, opset: int) -> onnx.ModelProto:
    """The model as ONNX with `mimiq::FakeQuant` placeholders; batch axis dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_size),), buffer, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return inline_shared_initializers(onnx.load_from_string(buffer.getvalue()))


def inline_shared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter shares equal initializers through Identity nodes; give each its own copy,
    so later passes (FP16 conversion, weight lowering) see plain constants."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def check_exportable(qc) -> None:
    """ONNX has INT8 and INT4 only: refuse other widths before any work is spent on them."""
    if qc.weight_bits not in (4, 8) or qc.act_bits not in (4, 8):
        raise MimiqError(f"{qc.name} has no ONNX integer types: export supports INT8 and INT4 "
                         "(w4a4, w4a8, w8a4, w8a8); for a fake-quant student at any wXaY run `synthesize`, "
                         f"`finetune --bits {qc.name}` and `eval --model RUN/student.pt`")


def export_student(student, run_dir, cfg: ExportConfig, progress=print) -> dict:
    """Trace `student` once, then write every back end's graph variants (and the float twin) to run_dir/export;
    returns export.json's record."""
    qc = student.quant_config
    check_exportable(qc)
    input_size = tuple(Preprocessing.from_timm(student.pretrained_cfg).input_size)
    rd = RunDir.of(run_dir)
    placeholders = torch_to_onnx(student, input_size, cfg.opset)
    set_quant_enabled(student, False)
    try:
        float_model = torch_to_onnx(student, input_size, cfg.opset)
    finally:
        set_quant_enabled(student, True)
    ctx = ExportContext(placeholders, float_model, qc, cfg)
    graphs, checked_by, notes = {FLOAT_ONNX: float_model}, {}, {}
    for backend in BACKENDS.values():
        exported = backend.export_graphs(ctx)
        graphs.update(exported.graphs)
        checked_by.update({name: backend for name in exported.checked})
        if exported.note:
            notes[backend.name] = exported.note
    for name, graph in graphs.items():
        graph, _ = constant_reshape_shapes(graph)  # fewer nodes per run in every runtime, values unchanged
        if name in checked_by:
            violations = checked_by[name].check(graph)
            if violations:
                raise MimiqError(f"{name} fails the {checked_by[name].name} check ({len(violations)} violations), "
                                 f"first: {violations[0]}")
        save_onnx(graph, rd.graph(name))
        progress(f"wrote {rd.graph(name)}")
    record = ExportRecord(qc.name, cfg.to_json(), sorted(graphs), notes, _jsonable(student.pretrained_cfg),
                          getattr(student, "model_name", None), student.num_classes)
    rd.write_export(record)
    return record.to_json()


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
