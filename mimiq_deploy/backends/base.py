"""The back-end interface."""
import dataclasses
import time
from pathlib import Path

import numpy as np

from ..run_dir import Artifact, ExportRecord, RunDir


@dataclasses.dataclass
class BuildContext:
    """What `build` hands every back end."""
    run_dir: RunDir
    export: ExportRecord
    config: object               # the ExportConfig the graphs were exported with
    progress: object = print
    encoding: str | None = None  # ONNX Runtime: forced 8-bit encoding ("int8" / "uint8"), None / "auto": host's


@dataclasses.dataclass
class RepositoryEntry:
    """One model of the Inference-Server repository: <name>/config.pbtxt from `template`, <name>/1/<filename>."""
    suffix: str                  # appended to the model's base name
    template: str                # export/templates/<template>
    source: Path
    filename: str
    values: dict                 # template values besides name, max_batch, dims, num_classes, label_filename


class Backend:
    name = ""
    title = ""                   # in messages
    conformance = ""             # check.check_graph target its graphs must meet
    graphs: tuple = ()           # exported graphs (run_dir.py names) it builds from; absent: nothing to build

    def available(self) -> tuple[bool, str]:
        return True, ""

    def wants(self, run_dir: RunDir) -> bool:
        """Whether export wrote the graph this back end builds from."""
        return bool(self.graphs) and run_dir.graph(self.graphs[0]).exists()

    def build_artifacts(self, ctx: BuildContext) -> tuple[dict, dict, dict]:
        """(artifacts by name, skipped name -> why, extra build.json fields)."""
        raise NotImplementedError

    def load(self, path: Path, **options):
        raise NotImplementedError

    def load_artifact(self, art: Artifact):
        return self.load(Path(art.path), provider=art.provider, optimization=art.optimization or "all")

    def sampler(self, run, x: np.ndarray):
        """A function timing one run on `x`, in ms (a wall clock around the call by default)."""
        def sample():
            t0 = time.perf_counter()
            run(x)
            return (time.perf_counter() - t0) * 1000
        return sample

    def repository_entry(self, artifacts: dict, bits: str, config) -> RepositoryEntry | None:
        return None
