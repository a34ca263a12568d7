"""`mimiq-deploy export-calib`: the synthetic set as a calibration file that other quantizers take.

calib/calib.npz holds one array, float32 (N, C, H, W), keyed by the exported graph's input name and in that graph's
input space (the normalized images it takes). Nothing else goes into the npz: ModelOpt's ONNX CLI
(`python -m modelopt.onnx.quantization --calibration_data_path`) turns an npz into {key: array}, feeds each key
to the graph input of that name and refuses a file whose keys are not exactly the inputs. So the preprocessing
and the classes the images were synthesized for go to a JSON record beside it (calib.npz.json, CalibRecord).
calib.npy: the bare array (what ModelOpt takes for a one-input graph), with its own calib.npy.json.

CalibReader feeds such a file, or a run directory's synthetic set directly, to ONNX Runtime's quantize_static.
"""
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from .build import INPUT_NAME
from .errors import MimiqError
from .io import atomic_write, atomic_write_json, read_json
from .run_dir import FLOAT_ONNX, CalibRecord, Preprocessing, RunDir, SynthManifest
from .synthesize import load_synthetic

FORMATS = ("npz", "npy")


def graph_input_name(run_dir) -> str:
    """The input name of the graphs export wrote (read from the float graph); before export, the one it gives."""
    rd = RunDir.of(run_dir)
    if not rd.export_record.exists():
        return INPUT_NAME
    graph = rd.graph(FLOAT_ONNX)
    if not graph.exists():
        raise MimiqError(f"{graph} missing though {rd.export_record} exists: rerun `mimiq-deploy export {rd.root}`")
    model = onnx.load(str(graph), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in weights]
    if len(names) != 1:
        raise MimiqError(f"{graph} has {len(names)} inputs ({', '.join(names)}); export-calib feeds one image input")
    return names[0]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise MimiqError(f"--limit takes a positive number of images, got {limit}")


def synthetic_set(run_dir, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, SynthManifest]:
    """The first `limit` images of run_dir's synthetic set (all by default) in shard order, float32, with the
    labels they were synthesized for and the set's manifest; one-line errors for what is missing."""
    rd = RunDir.of(run_dir)
    if not rd.root.is_dir():
        raise MimiqError(f"run directory {rd.root} not found")
    _check_limit(limit)
    if rd.read_manifest() is None:
        raise MimiqError(f"no synthetic set in {rd.root} ({rd.synth_manifest} missing): make one with "
                         f"`mimiq-deploy synthesize --out {rd.root}` (or `mimiq-deploy quantize --out {rd.root}`)")
    images, labels, manifest = load_synthetic(rd)  # refuses a set with shards missing, saying how many
    return images[:limit].numpy().astype(np.float32), labels[:limit].numpy(), manifest


def run_preprocessing(rd: RunDir, manifest: SynthManifest) -> Preprocessing:
    """The preprocessing of the exported graph (export's record: interpolation, crop too), else the set's own
    normalization (the manifest's); refused when the set was made for another input space than the graph takes."""
    own = Preprocessing(input_size=list(manifest.input_size), mean=list(manifest.mean), std=list(manifest.std),
                        num_classes=manifest.num_classes)
    if not rd.export_record.exists():
        return own
    pre = Preprocessing.from_timm(rd.read_export().pretrained_cfg)
    for what in ("input_size", "mean", "std"):
        ours, graphs = getattr(own, what), getattr(pre, what)
        if graphs is not None and (len(ours) != len(graphs) or not np.allclose(ours, graphs)):
            raise MimiqError(f"the synthetic set in {rd.synth} was made for {what} {ours}, the exported graph "
                             f"takes {graphs}: synthesize for the exported model")
    return pre


def _save_array(path: Path, fmt: str, name: str, images: np.ndarray) -> None:
    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.save / np.savez would append a suffix to the temporary name
            if fmt == "npz":
                np.savez(f, **{name: images})
            else:
                np.save(f, images)
    atomic_write(path, write)


def export_calib(run_dir, fmt: str = "npz", out=None, limit: int | None = None) -> tuple[Path, CalibRecord]:
    """Write run_dir's synthetic set as `out` (default run_dir/calib/calib.<fmt>) plus its JSON record beside it;
    returns the array file's path and the record."""
    rd = RunDir.of(run_dir)
    if fmt not in FORMATS:
        raise MimiqError(f"unknown calibration file format {fmt!r}: npz or npy")
    out = Path(out) if out is not None else rd.calib_file(fmt)
    if out.suffix != f".{fmt}":  # ModelOpt's CLI tells npz from npy by the suffix
        raise MimiqError(f"--out {out} must end in .{fmt} for --format {fmt}")
    images, labels, manifest = synthetic_set(rd, limit)
    record = CalibRecord(input_name=graph_input_name(rd), shape=list(images.shape), dtype=str(images.dtype),
                         preprocessing=run_preprocessing(rd, manifest), targets=[int(v) for v in labels],
                         kind=manifest.kind, model=manifest.model)
    _save_array(out, fmt, record.input_name, images)
    atomic_write_json(rd.calib_sidecar(out), record.to_json())
    return out, record


def read_calib(path) -> tuple[str, np.ndarray, CalibRecord | None]:
    """An export-calib file as (input name, float32 images, its record or None when absent)."""
    path = Path(path)
    if not path.is_file():
        raise MimiqError(f"calibration file {path} not found (write one with `mimiq-deploy export-calib RUN`)")
    sidecar = RunDir.calib_sidecar(path)
    record = CalibRecord.from_json(read_json(sidecar)) if sidecar.exists() else None
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MimiqError(f"cannot read calibration file {path} (not .npz / .npy, or truncated): {e}") from None
    if isinstance(data, np.ndarray):
        return (record.input_name if record else INPUT_NAME), data.astype(np.float32, copy=False), record
    with data:
        if len(data.files) != 1:
            raise MimiqError(f"{path} holds {len(data.files)} arrays ({', '.join(data.files)}): "
                             "expected one, keyed by the graph's input name")
        name = data.files[0]
        return name, data[name].astype(np.float32, copy=False), record


class CalibReader(CalibrationDataReader):
    """ONNX Runtime's calibration data reader over an export-calib file (.npz / .npy) or a run directory's
    synthetic set: get_next() gives {input name: a batch of images}, then None.

        quantize_static("RUN/export/model_fp32.onnx", "int8.onnx", CalibReader("RUN/calib/calib.npz"))

    Iterating it (for batch in reader) always starts from the first batch, so data sources that are read more
    than once (NNCF's Dataset) can take it too."""

    def __init__(self, source, batch_size: int = 32, limit: int | None = None):
        source = Path(source)
        if source.is_dir():
            self.input_name, images = graph_input_name(source), synthetic_set(source, limit)[0]
        else:
            _check_limit(limit)
            self.input_name, images, _ = read_calib(source)
            images = images[:limit]
        if batch_size < 1:
            raise MimiqError(f"batch_size must be positive, got {batch_size}")
        self.batches = [{self.input_name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)]
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """ORT's strided calibration (CalibStridedMinMax) reads the batches a range at a time."""
        self._next = iter(self.batches[start_index:end_index])

    def __iter__(self):
        return iter(self.batches)
