"""The back-end interface: what a back end (one folder under backends/) gives export, check, build, verify, bench,
the model repository and the report. Every method but `build_artifacts` and `runner` has a default, so a back end
declares only what it does."""
import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx

from ..config import config_dir
from ..qdq_rules import common_violations
from ..run_dir import Artifact, ExportRecord, RunDir


@dataclasses.dataclass
class ExportContext:
    """What export hands every back end: the traced student, its float twin, the bit setting and the config."""
    placeholders: onnx.ModelProto   # the student with `mimiq::FakeQuant` placeholders (lower with qdq.lower_fake_quant)
    float_model: onnx.ModelProto    # the same model with quantization off
    quant: object                   # QuantConfig
    config: object                  # ExportConfig; the back end's own table is config.backend(name)


@dataclasses.dataclass
class ExportedGraphs:
    """A back end's graph variants: file name (in run_dir/export) -> graph, which of them must pass its `check`,
    and a note for the user (what it did not export, or at what precision it runs)."""
    graphs: dict = dataclasses.field(default_factory=dict)
    checked: tuple = ()
    note: str | None = None


@dataclasses.dataclass
class BuildContext:
    """What `build` hands every back end."""
    run_dir: RunDir
    export: ExportRecord
    config: object               # the ExportConfig the graphs were exported with; config.backend(name): its table
    progress: object = print
    options: dict = dataclasses.field(default_factory=dict)  # `build`'s keyword options (a back end's build_options)


@dataclasses.dataclass
class BuildResult:
    artifacts: dict = dataclasses.field(default_factory=dict)  # name -> Artifact
    skipped: dict = dataclasses.field(default_factory=dict)    # name -> why it was not built
    info: dict = dataclasses.field(default_factory=dict)       # build.json's backends[name]: what the build chose


@dataclasses.dataclass
class RepositoryEntry:
    """One model of the Inference-Server repository: <name>/config.pbtxt from `template`, <name>/1/<filename>."""
    suffix: str                  # appended to the model's base name
    template: str                # config.pbtxt as a string.Template (the back end's, e.g. from export/templates/)
    source: Path
    filename: str
    values: dict                 # template values besides name, max_batch, dims, num_classes, label_filename
    io_type: str = "TYPE_FP32"   # the input / output type the served model takes


def template(name: str) -> str:
    """A model-repository template shipped in export/templates/."""
    return (config_dir("export") / "templates" / name).read_text()


class Runner:
    """A loaded artifact: numpy batch (float32, NCHW) -> numpy logits (float32)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sampler(self, x: np.ndarray):
        """A function timing one run on `x`, in ms: a wall clock around the call (device back ends time their own
        stream instead)."""
        def sample():
            t0 = time.perf_counter()
            self(x)
            return (time.perf_counter() - t0) * 1000
        return sample


class Backend:
    name = ""
    title = ""                   # in messages
    config_class = None          # its table in the export config ([name] in export/*.toml), a dataclass, or None
    build_options: tuple = ()    # keyword options of `build` it reads from BuildContext.options
    graphs: tuple = ()           # exported graphs (run_dir/export names) it builds from; the first must exist
    uint8_zero_point_128 = False  # its engine takes uint8 / zero point 128 as the symmetric int8 scheme
    packages: tuple = ()         # the Python distributions it runs on (their versions go into the report)

    def available(self) -> tuple[bool, str]:
        """Whether it can build and run here, and why not."""
        return True, ""

    def export_graphs(self, ctx: ExportContext) -> ExportedGraphs:
        """The graph variants it wants written at export (none: it builds from graphs export writes anyway)."""
        return ExportedGraphs()

    def check(self, model: onnx.ModelProto) -> list[str]:
        """Conformance of a QDQ graph with what its engine runs: the common rules, then its own."""
        return common_violations(model, self.uint8_zero_point_128) + self.own_violations(model)

    def own_violations(self, model: onnx.ModelProto) -> list[str]:
        return []

    def analysis(self, model: onnx.ModelProto) -> dict:
        """A performance verdict on a graph as JSON (e.g. which attention blocks its engine fuses), never a
        conformance violation; {} where it has none."""
        return {}

    def analysis_lines(self, analysis: dict) -> list[str]:
        """`analysis` for people (`check` prints them)."""
        return []

    def static_info(self, ctx: BuildContext) -> dict:
        """What build records about the exported graphs without building (build.json's backends[name]): stored on a
        host where it cannot build too."""
        return {}

    def wants(self, run_dir: RunDir) -> bool:
        """Whether export wrote the graph this back end builds from."""
        return bool(self.graphs) and run_dir.graph(self.graphs[0]).exists()

    def build_artifacts(self, ctx: BuildContext) -> BuildResult:
        raise NotImplementedError

    def build(self, source: Path, out: Path, **options) -> dict:
        """One graph into one runnable file; returns what the build reported (Artifact.info)."""
        raise NotImplementedError

    def runner(self, artifact: Artifact) -> Runner:
        raise NotImplementedError

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int = 10) -> dict | None:
        """Kernel time per run by op type (ms), where the engine has a profiler; None where it has none."""
        return None

    def repository_entry(self, artifacts: dict, export: ExportRecord, config) -> RepositoryEntry | None:
        return None

    def report_lines(self, info: dict) -> list[str]:
        """Lines for the report about what its build chose (build.json's backends[name])."""
        return []
