"""`mimiq-deploy quantize`: synthesize -> finetune -> export -> build -> verify -> bench -> report.

Each stage is skipped when its outputs in the run directory are complete, so an interrupted
run picks up where it stopped (synthesis and fine-tuning also resume inside the stage).
With MaskAQ's masked attention alignment in the recipe, a MimiQ set (run_dir/prior) comes
first: the PTQ student calibrated on it is the one the calibration set is aligned with.
"""
import dataclasses
import json
import time
from pathlib import Path

from .bench import bench
from .build import build
from .config import with_defaults
from .errors import MimiqError
from .export import ExportConfig, check_exportable, export_student, load_export_config, stored_export_config
from .finetune import FinetuneRecipe, finetune, load_finetune_recipe
from .io import run_dir_lock
from .models import load_model
from .quant import QuantConfig, parse_bits
from .quant.student import load_student, ptq_student
from .config import config_dir, resolve_recipe_path
from .report import write_report
from .run_dir import ReportRecord, RunDir
from .synthesize import SynthesisRecipe, is_complete, load_synthesis_recipe, load_synthetic, synthesize
from .verify import verify

PRESETS = {"fast": {"fmnist-vit": "fmnist-vit-fast.toml", "fmnist-swin": "fmnist-swin-fast.toml"}}


def preset_recipe(preset: str | None, model_name: str, recipe: Path | None) -> Path | None:
    if preset is None:
        return resolve_recipe_path(recipe, model_name)
    if recipe is not None:
        raise MimiqError("--preset and --recipe exclude each other: a preset is a recipe")
    if preset not in PRESETS:
        raise MimiqError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    if model_name not in PRESETS[preset]:
        raise MimiqError(f"--preset {preset} is sized for the embedded {' and '.join(PRESETS[preset])}; "
                         f"pass --recipe for {model_name}")
    return config_dir("calib") / PRESETS[preset][model_name]


def describe_plan(recipe_path: Path | None, export_config: Path | None) -> str:
    """What `quantize` would run with: the recipe and export config it resolved, and their values."""
    return "\n".join([f"recipe: {recipe_path or 'built-in defaults'}",
                      f"synthesize: {json.dumps(dataclasses.asdict(load_synthesis_recipe(recipe_path, {})))}",
                      f"finetune: {json.dumps(dataclasses.asdict(load_finetune_recipe(recipe_path, {})))}",
                      f"export config: {export_config or 'built-in defaults'}",
                      f"export: {json.dumps(load_export_config(export_config).to_json())}"])


@dataclasses.dataclass
class Plan:
    """What one quantize run does: the resolved settings of every stage."""
    model_name: str
    checkpoint: Path | None
    quant: QuantConfig
    synth: SynthesisRecipe
    finetune: FinetuneRecipe
    export: ExportConfig
    recipe_path: Path | None = None
    val_dir: Path | None = None
    data_dir: Path | None = None
    verify_limit: int | None = None
    trust: bool = False


class Stages:
    """Runs a stage unless its outputs are complete, and records its wall time in timings.json."""

    def __init__(self, rd: RunDir, echo):
        self.rd, self.echo = rd, echo
        self.timings = rd.read_timings()

    def run(self, name: str, done: bool, fn) -> None:
        if done:
            self.echo(f"[{name}] complete, skipped")
            return
        self.echo(f"[{name}]")
        t0 = time.time()
        fn()
        self.timings[name] = time.time() - t0
        self.rd.root.mkdir(parents=True, exist_ok=True)
        self.rd.write_timings(self.timings)


def _synthesize(plan: Plan, teacher, rd: RunDir, stages: Stages) -> None:
    """The calibration set; with masked attention alignment, a MimiQ prior set and its PTQ student first."""
    if not plan.synth.mask_align:
        stages.run("synthesize", is_complete(rd), lambda: synthesize(teacher, plan.model_name, rd, plan.synth))
        return
    prior = rd.prior
    stages.run("synthesize prior", is_complete(prior),
               lambda: synthesize(teacher, plan.model_name, prior, dataclasses.replace(plan.synth, mask_align=0.0)))

    def aligned():
        student = ptq_student(teacher, plan.quant, load_synthetic(prior)[0][:plan.finetune.calib_images])
        synthesize(teacher, plan.model_name, rd, plan.synth, student=student,
                   student_tag=f"{plan.quant.name} PTQ on prior")
    stages.run("synthesize", is_complete(rd), aligned)


def _finetune_done(plan: Plan, rd: RunDir) -> bool:
    """student.pt and a finetune.json of the plan's setting and recipe (records of earlier versions hold only
    the setting's name: compared by name, as they always were)."""
    ft = rd.read_finetune()
    return rd.student.exists() and ft is not None and ft.bits == plan.quant.name \
        and with_defaults(FinetuneRecipe, ft.recipe) == dataclasses.asdict(plan.finetune)


def _export_done(plan: Plan, rd: RunDir) -> bool:
    exp = rd.read_export() if rd.export_record.exists() else None
    return exp is not None and exp.bits == plan.quant.name and stored_export_config(exp) == plan.export


def _drop_stale_records(rd: RunDir, timings: dict) -> None:
    """A new export invalidates what build, verify and bench recorded before it."""
    for later in (rd.build_record, rd.verify_record, rd.bench_record):
        if "export" in timings and later.exists() and later.stat().st_mtime < rd.export_record.stat().st_mtime:
            later.unlink()


def run_plan(plan: Plan, run_dir: Path | RunDir, echo=print) -> ReportRecord:
    """Run (or resume) every stage of `plan` in `run_dir`; returns the report."""
    check_exportable(plan.quant)  # quantize ends in deployed graphs: refuse a width they lack before synthesis
    rd = RunDir.of(run_dir)
    teacher = load_model(plan.model_name, plan.checkpoint, trust=plan.trust)
    with run_dir_lock(rd.root):  # a second quantize on this run directory refuses here, before any write
        stages = Stages(rd, echo)
        _synthesize(plan, teacher, rd, stages)
        stages.run("finetune", _finetune_done(plan, rd),
                   lambda: finetune(teacher, plan.model_name, plan.checkpoint, rd, plan.quant, plan.finetune,
                                    synth_recipe=plan.synth))
        stages.run("export", _export_done(plan, rd),
                   lambda: export_student(load_student(rd.student, trust=plan.trust), rd, plan.export,
                                          progress=echo))
        _drop_stale_records(rd, stages.timings)
        stages.run("build", rd.build_record.exists(), lambda: build(rd, progress=echo))
        stages.run("verify", rd.verify_record.exists(),
                   lambda: verify(rd, plan.val_dir, plan.data_dir, plan.verify_limit, trust=plan.trust))
        stages.run("bench", rd.bench_record.exists(),
                   lambda: bench(rd, plan.export.bench.batch_sizes, min_seconds=plan.export.bench.seconds,
                                 progress=echo))
        return write_report(rd, teacher, plan.model_name, plan.recipe_path, stages.timings, plan.val_dir,
                            plan.data_dir)


def quantize(model_name: str, checkpoint: Path | None, bits: str, run_dir: Path | RunDir, recipe_path: Path | None,
             export_config: Path | None, val_dir: Path | None = None, data_dir: Path | None = None,
             verify_limit: int | None = None, echo=print, trust: bool = False) -> ReportRecord:
    """Run (or resume) every stage; returns the report (also written as report.json / report.md).

    trust: unpickle the teacher checkpoint fully (`--trust-checkpoint`), see models.load_model."""
    plan = Plan(model_name, checkpoint, parse_bits(bits), load_synthesis_recipe(recipe_path, {}),
                load_finetune_recipe(recipe_path, {}), load_export_config(export_config), recipe_path,
                val_dir, data_dir, verify_limit, trust)
    return run_plan(plan, run_dir, echo)
