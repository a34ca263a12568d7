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
from .export import export_student, load_export_config
from .finetune import FinetuneRecipe, finetune, load_finetune_recipe
from .io import atomic_write_json, read_json, run_dir_lock
from .models import load_model
from .quant import parse_bits
from .quant.student import load_student, ptq_student
from .recipes import config_dir, resolve_recipe_path
from .report import write_report
from .synthesize import is_complete, load_synthesis_recipe, load_synthetic, synthesize
from .verify import verify

PRESETS = {"fast": "fmnist-vit-fast.toml"}


def preset_recipe(preset: str | None, model_name: str, recipe: Path | None) -> Path | None:
    if preset is None:
        return resolve_recipe_path(recipe, model_name)
    if recipe is not None:
        raise MimiqError("--preset and --recipe exclude each other: a preset is a recipe")
    if preset not in PRESETS:
        raise MimiqError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    if model_name != "fmnist-vit":
        raise MimiqError(f"--preset {preset} is sized for the embedded fmnist-vit; pass --recipe for {model_name}")
    return config_dir("calib") / PRESETS[preset]


def describe_plan(recipe_path: Path | None, export_config: Path | None) -> str:
    """What `quantize` would run with: the recipe and export config it resolved, and their values."""
    return "\n".join([f"recipe: {recipe_path or 'built-in defaults'}",
                      f"synthesize: {json.dumps(dataclasses.asdict(load_synthesis_recipe(recipe_path, {})))}",
                      f"finetune: {json.dumps(dataclasses.asdict(load_finetune_recipe(recipe_path, {})))}",
                      f"export config: {export_config or 'built-in defaults'}",
                      f"export: {json.dumps(dataclasses.asdict(load_export_config(export_config)))}"])


def _json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def quantize(model_name: str, checkpoint: Path | None, bits: str, run_dir: Path, recipe_path: Path | None,
             export_config: Path | None, val_dir: Path | None = None, data_dir: Path | None = None,
             verify_limit: int | None = None, echo=print, trust: bool = False) -> dict:
    """Run (or resume) every stage; returns the report (also written as report.json / report.md).

    trust: unpickle the teacher checkpoint fully (`--trust-checkpoint`), see models.load_model."""
    cfg = parse_bits(bits)
    run_dir = Path(run_dir)
    synth_recipe = load_synthesis_recipe(recipe_path, {})
    ft_recipe = load_finetune_recipe(recipe_path, {})
    export_cfg = load_export_config(export_config)
    teacher = load_model(model_name, checkpoint, trust=trust)
    with run_dir_lock(run_dir):  # a second quantize on this run directory refuses here, before any write
        timings = _json(run_dir / "timings.json") or {}

        def stage(name, done, fn):
            if done:
                echo(f"[{name}] complete, skipped")
                return
            echo(f"[{name}]")
            t0 = time.time()
            fn()
            timings[name] = time.time() - t0
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "timings.json", timings)

        if synth_recipe.mask_align:
            prior = run_dir / "prior"
            stage("synthesize prior", is_complete(prior),
                  lambda: synthesize(teacher, model_name, prior, dataclasses.replace(synth_recipe, mask_align=0.0)))

            def aligned():
                student = ptq_student(teacher, cfg, load_synthetic(prior)[0][:ft_recipe.calib_images])
                synthesize(teacher, model_name, run_dir, synth_recipe, student=student,
                           student_tag=f"{cfg.name} PTQ on prior")
            stage("synthesize", is_complete(run_dir), aligned)
        else:
            stage("synthesize", is_complete(run_dir), lambda: synthesize(teacher, model_name, run_dir, synth_recipe))
        ft = _json(run_dir / "finetune.json")
        ft_done = (run_dir / "student.pt").exists() and ft is not None and ft.get("bits") == cfg.name \
            and with_defaults(FinetuneRecipe, ft.get("recipe", {})) == dataclasses.asdict(ft_recipe)
        stage("finetune", ft_done, lambda: finetune(teacher, model_name, checkpoint, run_dir, cfg, ft_recipe,
                                                    synth_recipe=synth_recipe))
        exp = _json(run_dir / "export" / "export.json")
        exp_done = exp is not None and exp.get("bits") == cfg.name and \
            exp.get("config") == dataclasses.asdict(export_cfg)
        stage("export", exp_done, lambda: export_student(load_student(run_dir / "student.pt", trust=trust), run_dir,
                                                         export_cfg, progress=echo))
        for later in ("build.json", "verify.json", "bench.json"):  # a new export invalidates what follows
            if "export" in timings and (run_dir / later).exists() and \
                    (run_dir / later).stat().st_mtime < (run_dir / "export" / "export.json").stat().st_mtime:
                (run_dir / later).unlink()
        stage("build", (run_dir / "build.json").exists(), lambda: build(run_dir, progress=echo))
        stage("verify", (run_dir / "verify.json").exists(),
              lambda: verify(run_dir, val_dir, data_dir, verify_limit, trust=trust))
        stage("bench", (run_dir / "bench.json").exists(),
              lambda: bench(run_dir, export_cfg.batch_sizes, min_seconds=export_cfg.bench_seconds, progress=echo))
        return write_report(run_dir, teacher, model_name, recipe_path, timings, val_dir, data_dir)
