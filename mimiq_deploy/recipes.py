"""Where the shipped configs live: calib/ (calibration recipes) and export/ (deployment configs, templates).

The repository's top-level calib/ and export/ are the one editable copy. A built wheel or sdist
carries them as package data under mimiq_deploy/configs/ (setup.py copies them at build time), found
through importlib.resources; a source checkout or editable install reads the repository's folders.
"""
from importlib.resources import files
from pathlib import Path

from .errors import MimiqError


def config_dir(name: str) -> Path:
    """The shipped folder `name` ("calib" or "export"), as installed or in the source tree."""
    packaged = files("mimiq_deploy") / "configs" / name
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    # never fall back to built-in values silently: the same command must do the same thing everywhere
    raise MimiqError(f"the package's {name}/ folder is missing (looked in {packaged} and {source}): "
                     "reinstall mimiq-deploy")


def resolve_recipe_path(recipe: Path | None, model_name: str) -> Path | None:
    """The given recipe, else calib/<model>.toml when it exists, else None (built-in defaults)."""
    if recipe is not None:
        return recipe
    candidate = config_dir("calib") / f"{Path(model_name).name}.toml"
    return candidate if candidate.exists() else None
