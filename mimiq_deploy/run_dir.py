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
    calib/calib.npz, calib/calib.npz.json           export-calib (the synthetic set for other quantizers)
"""
import dataclasses
from pathlib import Path

from .errors import MimiqError
from .io import atomic_torch_save, atomic_write_json, load_torch_file, read_json
from .quant.config import QuantConfig

SYNTH_DIR = "synth"
EXPORT_DIR = "export"
CALIB_DIR = "calib"
QDQ_ONNX = "model_qdq.onnx"           # the portable FP32 QDQ graph (standard ONNX; ONNX Runtime, OpenVINO, ...)
FLOAT_ONNX = "model_fp32.onnx"        # its float twin (same weights, no quantization)
# Each back end names its own graph variants (backends/<name>/), written to export/ beside these.


class Record:
    """A typed JSON record of the run directory. to_json writes every field (nested records as their JSON);
    from_json reads one back: keys it does not know are ignored and absent ones take their defaults, so records
    written by earlier versions still read. NESTED names the fields that hold records: field -> class, or
    (list, class) / (dict, class) for a list / a name -> record mapping of them."""
    NESTED: dict = {}

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = self.NESTED.get(f.name)
            if kind is None or value is None:
                out[f.name] = value
            elif isinstance(kind, tuple) and kind[0] is list:
                out[f.name] = [v.to_json() for v in value]
            elif isinstance(kind, tuple):
                out[f.name] = {k: v.to_json() for k, v in value.items()}
            else:
                out[f.name] = value.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict):
        if not isinstance(d, dict):
            raise MimiqError(f"malformed {cls.__name__}: expected a JSON object, got {type(d).__name__}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, kind = d[f.name], cls.NESTED.get(f.name)
            if kind is None or value is None:
                values[f.name] = value
            elif isinstance(kind, tuple) and kind[0] is list:
                values[f.name] = [kind[1].from_json(v) for v in value]
            elif isinstance(kind, tuple):
                values[f.name] = {k: kind[1].from_json(v) for k, v in value.items()}
            else:
                values[f.name] = kind.from_json(value)
        return cls(**values)


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
    backends: dict = dataclasses.field(default_factory=dict)  # back-end name -> what its build chose

    def to_json(self) -> dict:
        return {"bits": self.bits, "artifacts": {n: a.to_json() for n, a in self.artifacts.items()},
                "skipped": self.skipped, "backends": self.backends}

    @classmethod
    def from_json(cls, d: dict) -> "BuildRecord":
        arts = {n: Artifact.from_json(a) for n, a in d["artifacts"].items()}
        for a in arts.values():  # build.json of earlier versions names no twin: same back end and provider, float
            if a.float_twin is None and a.quantized:
                a.float_twin = next((n for n, b in arts.items() if not b.quantized and b.backend == a.backend
                                     and b.provider == a.provider), None)
        return cls(d.get("bits"), arts, d.get("skipped", {}), d.get("backends", {}))


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

    def note(self, backend: str) -> str | None:
        """What export said about a back end (what it did not export, or at what precision it runs)."""
        return self.notes.get(backend)


@dataclasses.dataclass
class VerifyRow(Record):
    """One artifact against the fake-quant student. checked: the thresholds bind it (integer and weight-only
    artifacts; not float twins)."""
    precision: str = ""
    agreement: float = 0.0          # top-1 agreement with the reference, percent
    cosine: float = 0.0             # mean logit cosine similarity
    max_abs_error: float = 0.0
    top1: float = 0.0               # on the labelled eval set, percent
    checked: bool = False
    reference: str = "student"      # "student", or "weight-only student" (its activation quantizers off)


@dataclasses.dataclass
class VerifyRecord(Record):
    dataset: str = ""
    n: int = 0
    student_top1: float = 0.0
    artifacts: dict = dataclasses.field(default_factory=dict)   # name -> VerifyRow
    thresholds: dict = dataclasses.field(default_factory=dict)  # min_agreement, min_cosine
    failed: list = dataclasses.field(default_factory=list)      # artifacts below the thresholds
    NESTED = {"artifacts": (dict, VerifyRow)}


@dataclasses.dataclass
class BenchRow(Record):
    artifact: str = ""
    precision: str = ""
    batch: int = 1
    iters: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    throughput_ips: float = 0.0


@dataclasses.dataclass
class Speedup(Record):
    quantized: str = ""
    float: str = ""
    batch: int = 1
    float_over_quantized_p50: float = 0.0   # > 1: the quantized artifact is faster


@dataclasses.dataclass
class Profile(Record):
    """Where one artifact's time goes at one batch size (a back end's profiler), as shares in percent."""
    artifact: str = ""
    batch: int = 1
    total_ms: float = 0.0
    by_op: dict = dataclasses.field(default_factory=dict)
    by_group: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BenchRecord(Record):
    rows: list = dataclasses.field(default_factory=list)       # BenchRow
    speedups: list = dataclasses.field(default_factory=list)   # Speedup
    profiles: list = dataclasses.field(default_factory=list)   # Profile
    skipped: dict = dataclasses.field(default_factory=dict)    # what was not built -> why
    interleaved: bool = True
    NESTED = {"rows": (list, BenchRow), "speedups": (list, Speedup), "profiles": (list, Profile)}

    def p50(self, artifact: str, batch: int) -> float | None:
        return next((r.p50_ms for r in self.rows if r.artifact == artifact and r.batch == batch), None)

    @property
    def batches(self) -> list[int]:
        return sorted({r.batch for r in self.rows})


# --- the records of the stages before deployment (synthesize, finetune, report) and of the files they read ---

STUDENT_FORMAT = "mimiq-student-v1"

def _without_none(out: dict, *names: str) -> dict:
    """`out` without the keys `names` whose value is None: fields earlier versions wrote only when set."""
    return {k: v for k, v in out.items() if not (k in names and v is None)}


@dataclasses.dataclass
class Preprocessing(Record):
    """What a model expects of its input, from a timm pretrained_cfg or data config (Preprocessing.from_timm)."""
    input_size: list | None = None     # (C, H, W)
    mean: list | None = None
    std: list | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    num_classes: int | None = None
    label_names: list | None = None    # the classes' names, where the model has its own

    @classmethod
    def from_timm(cls, cfg) -> "Preprocessing":
        """From a timm pretrained_cfg or data config dict (its other keys ignored; tuples become lists)."""
        if isinstance(cfg, Preprocessing):
            return cfg
        return cls.from_json({k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()})


class HoldsQuantConfig:
    """A record holding a bit setting as fields bits, input_bits, unsigned_probs (QuantConfig.to_json's keys)."""

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig.from_json(vars(self))


@dataclasses.dataclass
class SynthManifest(Record):
    """synth/manifest.json: the header synthesize writes first, completed when every shard exists."""
    model: str = ""
    recipe: dict = dataclasses.field(default_factory=dict)   # the SynthesisRecipe, as a dict
    num_shards: int = 0
    input_size: list = dataclasses.field(default_factory=list)
    mean: list = dataclasses.field(default_factory=list)
    std: list = dataclasses.field(default_factory=list)
    num_classes: int | None = None
    kind: str = ""                     # mimiq, base, noise, mimiq+maskaq, real ...
    student: str | None = None         # the student the images were aligned with (MaskAQ)
    loss_curve: dict | None = None     # step -> losses at ~50 steps, the mean over shards
    complete: bool = False
    num_images_done: int = 0
    final_losses: dict = dataclasses.field(default_factory=dict)  # loss name -> mean over the images
    images_steps_per_s: float | None = None

    def to_json(self) -> dict:
        return _without_none(super().to_json(), "loss_curve", "images_steps_per_s")


@dataclasses.dataclass
class CalibRecord(Record):
    """calib/<file>.json, beside the array file export-calib wrote: what its images are and what they were made for."""
    input_name: str = ""               # the exported graph's input the array feeds
    shape: list = dataclasses.field(default_factory=list)  # (N, C, H, W)
    dtype: str = "float32"
    preprocessing: Preprocessing | None = None  # what turns a raw image into the graph's input space
    targets: list = dataclasses.field(default_factory=list)  # the class each image was synthesized for, in order
    kind: str = ""                     # the set's kind (SynthManifest.kind): mimiq, real ...
    model: str = ""
    NESTED = {"preprocessing": Preprocessing}


@dataclasses.dataclass
class EpochStats(Record):
    """One fine-tuning epoch: mean losses over its batches, the learning rate it ran at."""
    epoch: int = 0
    loss: float = 0.0
    kl: float = 0.0
    had: float = 0.0
    lr: float = 0.0
    refresh_s: float | None = None     # seconds spent refreshing the synthetic set before it (MaskAQ)

    def to_json(self) -> dict:
        return _without_none(super().to_json(), "refresh_s")


@dataclasses.dataclass
class FinetuneRecord(HoldsQuantConfig, Record):
    """finetune.json (also student.pt's meta). Records of earlier versions hold only bits of the setting."""
    bits: str = ""
    input_bits: int | None = None
    unsigned_probs: bool | None = None
    recipe: dict = dataclasses.field(default_factory=dict)    # the FinetuneRecipe, as a dict
    history: list = dataclasses.field(default_factory=list)   # EpochStats
    train_minutes: float = 0.0
    refresh_minutes: float = 0.0
    synthetic: dict = dataclasses.field(default_factory=dict)  # the set trained on: kind, num_images
    NESTED = {"history": (list, EpochStats)}

    def to_json(self) -> dict:
        return _without_none(super().to_json(), "input_bits", "unsigned_probs")  # a record of an earlier version stays one


@dataclasses.dataclass
class FinetuneSignature(HoldsQuantConfig, Record):
    """What a fine-tuning resume state was made with; only a run of the same one continues it."""
    bits: str = ""
    input_bits: int | None = None      # absent in states from before the 8-bit image input
    unsigned_probs: bool | None = None  # absent in states from before the unsigned probability grid
    recipe: dict = dataclasses.field(default_factory=dict)
    model: str = ""


@dataclasses.dataclass
class FinetuneProgress(Record):
    """finetune_state.pt's plain values (it also holds the student's, optimizer's and scheduler's state)."""
    signature: FinetuneSignature = dataclasses.field(default_factory=FinetuneSignature)
    epoch: int = 0                     # epochs done
    history: list = dataclasses.field(default_factory=list)  # EpochStats
    seconds: float = 0.0
    NESTED = {"signature": FinetuneSignature, "history": (list, EpochStats)}


@dataclasses.dataclass
class StudentCheckpoint(HoldsQuantConfig, Record):
    """student.pt, a torch file of plain values: the fake-quant student's weights and what rebuilds it."""
    format: str = ""
    model_name: str = ""
    teacher_checkpoint: str | None = None
    bits: str = ""
    input_bits: int | None = None      # absent before the 8-bit image input: the image was quantized at act_bits
    unsigned_probs: bool | None = None  # absent before the unsigned probability grid: signed
    state_dict: dict = dataclasses.field(default_factory=dict)
    pretrained_cfg: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)  # the fine-tuning record (FinetuneRecord's JSON)

    def to_checkpoint(self) -> dict:
        return self.to_json()

    @classmethod
    def from_checkpoint(cls, ckpt) -> "StudentCheckpoint":
        return cls.from_json(ckpt)

    def save(self, path) -> None:
        atomic_torch_save(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path) -> "StudentCheckpoint":
        """Loaded without running code; a file that is not a student checkpoint is one line."""
        ckpt = load_torch_file(Path(path), "student checkpoint", own=True)
        record = cls.from_checkpoint(ckpt) if isinstance(ckpt, dict) else None
        if record is None or record.format != STUDENT_FORMAT:
            raise MimiqError(f"{path} is not a mimiq-deploy student checkpoint (write one with `mimiq-deploy finetune`)")
        return record


@dataclasses.dataclass
class Accuracy(Record):
    """Top-1 (percent) of a model over n images of a dataset."""
    dataset: str = ""
    n: int = 0
    top1: float = 0.0


@dataclasses.dataclass
class HeadSimilarity(Record):
    """Mean inter-head |SSIM| of the teacher's attention on n synthetic and n real images."""
    synthetic: float = 0.0
    real: float = 0.0
    synthetic_kind: str = ""
    n: int = 0


@dataclasses.dataclass
class ActivationRanges(Record):
    """The percentile of |x| at each activation quantizer's input (names), on synthetic and on real images."""
    percentile: float = 99.9
    names: list = dataclasses.field(default_factory=list)
    synthetic: list = dataclasses.field(default_factory=list)
    real: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ReportRecord(Record):
    """report.json: every stage's record, the teacher's accuracy, the synthetic set's diagnostics, the environment."""
    teacher: Accuracy | None = None
    inter_head_similarity: HeadSimilarity | None = None
    activation_ranges: ActivationRanges | None = None
    model: str = ""
    recipe: str | None = None          # the recipe file's path
    pretrained_cfg: dict = dataclasses.field(default_factory=dict)
    synthesize: SynthManifest | None = None
    finetune: FinetuneRecord | None = None
    export: ExportRecord | None = None
    build: BuildRecord | None = None
    verify: VerifyRecord | None = None
    bench: BenchRecord | None = None
    stage_seconds: dict = dataclasses.field(default_factory=dict)  # stage -> wall seconds (timings.json)
    versions: dict = dataclasses.field(default_factory=dict)
    device: dict = dataclasses.field(default_factory=dict)
    NESTED = {"teacher": Accuracy, "inter_head_similarity": HeadSimilarity, "activation_ranges": ActivationRanges,
              "synthesize": SynthManifest, "finetune": FinetuneRecord, "export": ExportRecord, "build": BuildRecord,
              "verify": VerifyRecord, "bench": BenchRecord}


@dataclasses.dataclass
class TeacherEpoch(Record):
    epoch: int = 0
    val_top1: float = 0.0
    loss: float = 0.0


@dataclasses.dataclass
class TeacherMetrics(Record):
    """What `teacher train` measured (returned, and stored in the checkpoint)."""
    val_top1: float | None = None
    test_top1: float = 0.0
    train_minutes: float = 0.0
    params: int = 0
    history: list = dataclasses.field(default_factory=list)  # TeacherEpoch
    NESTED = {"history": (list, TeacherEpoch)}


@dataclasses.dataclass
class TeacherProgress(Record):
    """The plain values of a teacher training's resume state (it also holds the model's and optimizer's state)."""
    recipe: dict | None = None
    gen: object = None                 # the data order generator's state
    history: list = dataclasses.field(default_factory=list)  # TeacherEpoch
    epoch: int = 0
    seconds: float = 0.0
    NESTED = {"history": (list, TeacherEpoch)}


@dataclasses.dataclass
class TeacherCheckpoint(Record):
    """A checkpoint `teacher train` wrote: the architecture and preprocessing travel with the weights.
    from_checkpoint of any other checkpoint (a plain state dict) gives the defaults: is_teacher() is False."""
    arch: dict | None = None
    pretrained_cfg: dict | None = None
    model: dict | None = None          # the state dict
    recipe: dict | None = None
    metrics: dict | None = None        # TeacherMetrics' JSON (left a dict: other checkpoints may hold anything here)

    def is_teacher(self) -> bool:
        return isinstance(self.arch, dict) and isinstance(self.pretrained_cfg, dict) and self.model is not None

    def to_checkpoint(self) -> dict:
        return self.to_json()

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TeacherCheckpoint":
        return cls.from_json(ckpt)


class RunDir:
    """Paths and records of one run directory."""

    def __init__(self, root):
        self.root = Path(root)

    @classmethod
    def of(cls, run_dir) -> "RunDir":
        """A path or a RunDir as a RunDir (the public functions take either)."""
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    @classmethod
    def of(cls, where) -> "RunDir":
        """The Python API's entry: a RunDir as it is, or a path made one."""
        return where if isinstance(where, RunDir) else cls(where)

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

    def read_manifest(self) -> SynthManifest | None:
        return self._read_record(self.synth_manifest, SynthManifest)

    def write_manifest(self, manifest: SynthManifest) -> None:
        atomic_write_json(self.synth_manifest, manifest.to_json())

    @property
    def prior(self) -> "RunDir":
        """MaskAQ: the MimiQ set the PTQ student that the calibration set aligns with is calibrated on."""
        return RunDir(self.root / "prior")

    def refresh(self, epoch: int) -> "RunDir":
        """The set synthesized against the student after `epoch` fine-tuning epochs."""
        return RunDir(self.root / f"refresh-{epoch:04d}")

    def link_synthetic(self, src) -> None:
        """Let this run directory use another's synthetic set without copying it (a symlink to its synth/)."""
        src = RunDir.of(src)
        if not src.synth_manifest.exists():
            raise MimiqError(f"no synthetic data in {src.root}: run `mimiq-deploy synthesize --out {src.root}` first")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.synth.exists():
            self.synth.symlink_to(src.synth.resolve(), target_is_directory=True)

    # export-calib
    def calib_file(self, fmt: str) -> Path:
        """The default array file of export-calib in format `fmt` (npz, npy)."""
        return self.root / CALIB_DIR / f"calib.{fmt}"

    @staticmethod
    def calib_sidecar(array_file) -> Path:
        """The JSON record beside an export-calib array file (calib.npz -> calib.npz.json: one per file)."""
        return Path(array_file).with_name(Path(array_file).name + ".json")

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

    def read_student(self) -> StudentCheckpoint:
        return StudentCheckpoint.load(self.require_student())

    def write_student(self, record: StudentCheckpoint) -> None:
        record.save(self.student)

    @property
    def finetune_record(self) -> Path:
        return self.root / "finetune.json"

    def read_finetune(self) -> FinetuneRecord | None:
        return self._read_record(self.finetune_record, FinetuneRecord)

    def write_finetune(self, record: FinetuneRecord) -> None:
        atomic_write_json(self.finetune_record, record.to_json())

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

    def read_verify(self) -> VerifyRecord | None:
        return self._read_record(self.verify_record, VerifyRecord)

    def write_verify(self, record: VerifyRecord) -> None:
        atomic_write_json(self.verify_record, record.to_json())

    @property
    def bench_record(self) -> Path:
        return self.root / "bench.json"

    def read_bench(self) -> BenchRecord | None:
        return self._read_record(self.bench_record, BenchRecord)

    def write_bench(self, record: BenchRecord) -> None:
        atomic_write_json(self.bench_record, record.to_json())

    # quantize, report
    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def read_timings(self) -> dict:
        """Stage name -> wall seconds of its last run ({} before the first)."""
        return read_json(self.timings) if self.timings.exists() else {}

    def write_timings(self, timings: dict) -> None:
        atomic_write_json(self.timings, timings)

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    def read_report(self) -> ReportRecord | None:
        return self._read_record(self.report_json, ReportRecord)

    def write_report(self, report: ReportRecord) -> None:
        atomic_write_json(self.report_json, report.to_json())

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    def plot(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def _read_record(path: Path, cls):
        """A typed record, or None when its stage has not written it."""
        return cls.from_json(read_json(path)) if Path(path).exists() else None

    def read(self, path: Path) -> dict | None:
        """A JSON record of this run directory, or None when the stage has not written it."""
        return read_json(path) if Path(path).exists() else None

    def write(self, path: Path, record: dict) -> None:
        atomic_write_json(path, record)
