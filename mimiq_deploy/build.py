"""`mimiq-deploy build`: runnable artifacts from the exported graphs, with every back end of the registry that
can run here (the others are named with what is missing), and the model repository."""
import dataclasses
import json
import re
import shutil
from pathlib import Path
from string import Template

from timm.data import ImageNetInfo

from .backends import BACKENDS, BuildContext
from .errors import MimiqError
from .export import stored_export_config
from .run_dir import BuildRecord, ExportRecord, Preprocessing, RunDir


def build(run_dir, progress=print, backends=None, **options) -> dict:
    """Build every artifact the exported graphs allow; returns and writes run_dir/build.json.

    backends: names of the back ends to build (default: all); build.json then holds theirs only, and verify,
    bench, serve and the model repository see those.
    options: a back end's build options (its `build_options`), e.g. encoding="int8" / "uint8" forces the 8-bit
    encoding of the ONNX Runtime graph (None or "auto": the export config, then this host's CPU decide)."""
    known = {o for b in BACKENDS.values() for o in b.build_options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MimiqError(f"unknown build option(s) {unknown}; known: {sorted(known)}")
    chosen = list(BACKENDS) if not backends else list(dict.fromkeys(backends))
    missing = [b for b in chosen if b not in BACKENDS]
    if missing:
        raise MimiqError(f"unknown back end(s) {', '.join(missing)}; known: {', '.join(BACKENDS)}")
    rd = RunDir.of(run_dir)
    export = rd.read_export()
    cfg = stored_export_config(export)
    ctx = BuildContext(rd, export, cfg, progress, options)
    record = BuildRecord(export.bits, {}, dict(export.notes), {})
    for backend in (BACKENDS[b] for b in chosen):
        if not backend.wants(rd):  # export wrote no graph for it (its reason is in the export notes)
            continue
        info = backend.static_info(ctx)  # read off the graphs: kept where no engine can be built here too
        ok, why = backend.available()
        if not ok:
            record.skipped[backend.name] = f"{backend.title} engines not built: {why}"
            if info:
                record.backends[backend.name] = info
            continue
        result = backend.build_artifacts(ctx)
        record.artifacts.update(result.artifacts)
        record.skipped.update(result.skipped)
        if info or result.info:
            record.backends[backend.name] = {**info, **result.info}
    for reason in record.skipped.values():
        progress(reason)
    write_model_repository(rd, export, record.artifacts, cfg)
    rd.write_build(record)
    return record.to_json()


PREPROCESSING_FILE = "preprocessing.json"
LABELS_FILE = "labels.txt"
INPUT_NAME = "input"      # the preprocessed image batch, float NCHW
OUTPUT_NAME = "logits"    # one row of class scores per image


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """The served model's name, tensors and classes: the one source of the model repository (config.pbtxt,
    preprocessing.json, labels.txt) and of `mimiq-deploy serve`."""
    name: str                  # <model>_<bits>; a repository entry appends its back end's suffix (_onnx, _trt ...)
    dims: tuple                # (C, H, W) of one image
    num_classes: int
    labels: tuple | None       # class names, None when unknown
    max_batch: int
    pre: Preprocessing
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    @classmethod
    def of(cls, export: ExportRecord, cfg) -> "ModelSignature":
        """From the export record (model, bits, pretrained_cfg, head size) and its export config (max_batch)."""
        pre = Preprocessing.from_timm(export.pretrained_cfg)
        num_classes = export.num_classes or pre.num_classes or 1000
        labels = class_labels(pre, num_classes)
        name = re.sub(r"[^A-Za-z0-9_.]", "_", export.model_name or "model") + "_" + export.bits
        return cls(name, tuple(pre.input_size), num_classes, tuple(labels) if labels else None, cfg.max_batch, pre)

    @classmethod
    def of_run(cls, run_dir) -> "ModelSignature":
        rd = RunDir.of(run_dir)
        export = rd.read_export()
        return cls.of(export, stored_export_config(export))

    def preprocessing(self, io_type: str = "float32") -> dict:
        """preprocessing.json of this model (see `preprocessing`)."""
        return preprocessing(self, io_type)

    def template_values(self) -> dict:
        """The values every config.pbtxt template takes besides the back end's own."""
        return {"max_batch": self.max_batch, "dims": ", ".join(str(d) for d in self.dims),
                "num_classes": self.num_classes, "input_name": self.input_name, "output_name": self.output_name,
                "label_filename": f'\n    label_filename: "{LABELS_FILE}"' if self.labels else ""}


def class_labels(pre: Preprocessing, num_classes: int) -> list[str] | None:
    """Class names for Triton's classification extension: the model's own, else timm's ImageNet names
    for an unchanged ImageNet head; None when unknown."""
    if pre.label_names and len(pre.label_names) == num_classes:
        return list(pre.label_names)
    if num_classes == pre.num_classes == 1000:
        return ImageNetInfo().label_descriptions()
    return None


def preprocessing(sig: ModelSignature, io_type: str = "float32") -> dict:
    """What a client must do to an image before sending it, in machine-readable form (preprocessing.json;
    mimiq_deploy.preprocess applies it)."""
    pre = sig.pre
    return {"input_name": sig.input_name, "input_dtype": io_type, "layout": "NCHW", "input_size": list(sig.dims),
            "pixel_scale": 1 / 255, "mean": list(pre.mean), "std": list(pre.std),
            "normalize": "(pixel / 255 - mean) / std, per channel, in float32",
            "interpolation": pre.interpolation, "crop_pct": pre.crop_pct, "crop_mode": pre.crop_mode,
            "output_name": sig.output_name, "num_classes": sig.num_classes,
            "label_file": LABELS_FILE if sig.labels else None}


def write_model_repository(run_dir: RunDir, export: ExportRecord, artifacts: dict, cfg) -> Path:
    """An Inference-Server style repository: <model>/config.pbtxt and <model>/1/model.{onnx,plan}, with
    <model>/preprocessing.json (mean, std, input size, layout) and <model>/labels.txt where the classes are known.
    One model per back end that offers an entry for what it built; names, tensors and classes from ModelSignature."""
    sig = ModelSignature.of(export, cfg)
    repo = run_dir.model_repository
    tmp = repo.with_name(repo.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # an empty repository where no back end offers an entry
    entries = [e for e in (b.repository_entry(artifacts, export, cfg) for b in BACKENDS.values()) if e]
    for entry in entries:
        name = f"{sig.name}_{entry.suffix}"
        (tmp / name / "1").mkdir(parents=True)
        shutil.copy2(entry.source, tmp / name / "1" / entry.filename)
        text = Template(entry.template).substitute(name=name, **sig.template_values(), **entry.values)
        for tensor in (sig.input_name, sig.output_name):
            if f'name: "{tensor}"' not in text:
                raise MimiqError(f"the {entry.suffix} config.pbtxt template does not name the tensor {tensor!r} "
                                 "of the model signature (use $input_name / $output_name)")
        (tmp / name / "config.pbtxt").write_text(text)
        io_type = "float16" if entry.io_type == "TYPE_FP16" else "float32"
        (tmp / name / PREPROCESSING_FILE).write_text(json.dumps(preprocessing(sig, io_type), indent=2) + "\n")
        if sig.labels:
            (tmp / name / LABELS_FILE).write_text("\n".join(sig.labels) + "\n")
    shutil.rmtree(repo, ignore_errors=True)  # a directory cannot be replaced atomically: the last step is a rename
    tmp.rename(repo)
    return repo
