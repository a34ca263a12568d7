"""The run directory, the contract between the stages: every path in it, and its records.

Each stage reads the files earlier stages wrote and writes its own, atomically (io.py); a stage
whose record exists is complete. Layout (names fixed: runs made by earlier versions still resume):

    synth/manifest.json, synth/shard_00000.pt ...   synthesize (a set of shards)
    prior/, refresh-0004/ ...                       further sets, each laid out as a run directory
    finetune_state.pt, student.pt, finetune.json    finetune (resume state, student, record)
    export/export.json, export/*.onnx               export (graphs and their record)
    export/*.opt.onnx, export/*.plan                build (optimized graphs, engines)
    build.json, verify.json, bench.json             build, verify, bench records
    model_repository/                               build (Inference-Server layout)
    timings.json, report.json, report.md, *.png     quantize, report
"""
import dataclasses
from pathlib import Path

from .errors import MimiqError
from .io import atomic_write_json, read_json

SYNTH_DIR = "synth"
EXPORT_DIR = "export"
QDQ_ONNX = "model_qdq.onnx"           # FP32 QDQ graph for ONNX Runtime
FLOAT_ONNX = "model_fp32.onnx"        # its float twin (same weights, no quantization)
TRT_ONNX = "model_qdq_fp16.onnx"      # FP16 QDQ graph for TensorRT (strongly typed)
TRT_FLOAT_ONNX = "model_fp16.onnx"    # its float twin
W4A16_ONNX = "model_w4a16.onnx"       # INT4 students: weight-only FP32 graph (ORT fuses it into MatMulNBits)


@dataclasses.dataclass
class Artifact:
    """One runnable thing `build` made: which back end runs it, from which file, at what precision.
    float_twin: the artifact of the same back end computing the same model unquantized (bench's baseline)."""
    backend: str
    path: str
    precision: str
    quantized: bool
    provider: str | None = None
    weight_only: bool = False
    optimization: str | None = None   # "disabled": ONNX Runtime's fusions off (the unfused reference)
    reference: bool = False           # for correctness only, not a deployment candidate (bench skips it)
    float_twin: str | None = None
    info: dict = dataclasses.field(default_factory=dict)  # what the back end's build reported

    FIELDS = ("backend", "provider", "path", "precision", "quantized", "weight_only", "optimization", "reference",
              "float_twin")

    def to_json(self) -> dict:
        """build.json's form: the fields that are set, then the back end's build info at the same level."""
        out = {k: getattr(self, k) for k in self.FIELDS
               if getattr(self, k) is not None and not (k == "reference" and not self.reference)}
        return {**out, **self.info}

    @classmethod
    def from_json(cls, d: dict) -> "Artifact":
        known = {k: d[k] for k in cls.FIELDS if k in d}
        return cls(**{"quantized": False, **known}, info={k: v for k, v in d.items() if k not in cls.FIELDS})


@dataclasses.dataclass
class BuildRecord:
    bits: str
    artifacts: dict            # name -> Artifact
    skipped: dict              # what was not built -> why
    ort_encoding: dict

    def to_json(self) -> dict:
        return {"bits": self.bits, "artifacts": {n: a.to_json() for n, a in self.artifacts.items()},
                "skipped": self.skipped, "ort_encoding": self.ort_encoding}

    @classmethod
    def from_json(cls, d: dict) -> "BuildRecord":
        arts = {n: Artifact.from_json(a) for n, a in d["artifacts"].items()}
        for a in arts.values():  # build.json of earlier versions names no twin: same back end and provider, float
            if a.float_twin is None and a.quantized:
                a.float_twin = next((n for n, b in arts.items() if not b.quantized and b.backend == a.backend
                                     and b.provider == a.provider), None)
        return cls(d.get("bits"), arts, d.get("skipped", {}), d.get("ort_encoding", {}))


@dataclasses.dataclass
class ExportRecord:
    bits: str
    config: dict               # the ExportConfig used, as a dict
    graphs: list
    notes: dict
    pretrained_cfg: dict
    model_name: str | None = None
    num_classes: int | None = None  # the head's, which a checkpoint may change from pretrained_cfg

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ExportRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"graphs": [], "notes": {}, **{k: v for k, v in d.items() if k in names}})


class RunDir:
    """Paths and records of one run directory."""

    def __init__(self, root):
        self.root = Path(root)

    def __fspath__(self):
        return str(self.root)

    def __truediv__(self, name):
        return self.root / name

    # synthesize
    @property
    def synth(self) -> Path:
        return self.root / SYNTH_DIR

    @property
    def synth_manifest(self) -> Path:
        return self.synth / "manifest.json"

    def shard(self, index: int) -> Path:
        return self.synth / f"shard_{index:05d}.pt"

    @property
    def prior(self) -> "RunDir":
        """MaskAQ: the MimiQ set the PTQ student that the calibration set aligns with is calibrated on."""
        return RunDir(self.root / "prior")

    def refresh(self, epoch: int) -> "RunDir":
        """The set synthesized against the student after `epoch` fine-tuning epochs."""
        return RunDir(self.root / f"refresh-{epoch:04d}")

    def link_synthetic(self, src) -> None:
        """Let this run directory use another's synthetic set without copying it (a symlink to its synth/)."""
        src = RunDir(src)
        if not src.synth_manifest.exists():
            raise MimiqError(f"no synthetic data in {src.root}: run `mimiq-deploy synthesize --out {src.root}` first")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.synth.exists():
            self.synth.symlink_to(src.synth.resolve(), target_is_directory=True)

    # finetune
    @property
    def student(self) -> Path:
        return self.root / "student.pt"

    def require_student(self) -> Path:
        if not self.student.exists():
            raise MimiqError(f"no student.pt in {self.root}: run `mimiq-deploy finetune` first")
        return self.student

    @property
    def finetune_state(self) -> Path:
        return self.root / "finetune_state.pt"

    @property
    def finetune_record(self) -> Path:
        return self.root / "finetune.json"

    # export
    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_DIR

    def graph(self, name: str) -> Path:
        return self.export_dir / name

    @property
    def export_record(self) -> Path:
        return self.export_dir / "export.json"

    def read_export(self) -> ExportRecord:
        if not self.export_record.exists():
            raise MimiqError(f"no exported graphs in {self.root} ({self.export_record} missing): "
                             f"run `mimiq-deploy export {self.root}` first")
        return ExportRecord.from_json(read_json(self.export_record))

    def write_export(self, record: ExportRecord) -> None:
        atomic_write_json(self.export_record, record.to_json())

    # build, verify, bench
    @property
    def build_record(self) -> Path:
        return self.root / "build.json"

    def read_build(self) -> BuildRecord:
        if not self.build_record.exists():
            raise MimiqError(f"no built artifacts in {self.root}: run `mimiq-deploy build {self.root}` first")
        return BuildRecord.from_json(read_json(self.build_record))

    def write_build(self, record: BuildRecord) -> None:
        atomic_write_json(self.build_record, record.to_json())

    @property
    def model_repository(self) -> Path:
        return self.root / "model_repository"

    @property
    def verify_record(self) -> Path:
        return self.root / "verify.json"

    @property
    def bench_record(self) -> Path:
        return self.root / "bench.json"

    # quantize, report
    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    def plot(self, name: str) -> Path:
        return self.root / name

    def read(self, path: Path) -> dict | None:
        """A JSON record of this run directory, or None when the stage has not written it."""
        return read_json(path) if Path(path).exists() else None

    def write(self, path: Path, record: dict) -> None:
        atomic_write_json(path, record)
