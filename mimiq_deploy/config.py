"""Configuration: TOML recipes (calib/) and deployment configs (export/), every value with a built-in default,
and where the shipped folders live.

The repository's top-level calib/ and export/ are the one editable copy. A built wheel or sdist
carries them as package data under mimiq_deploy/configs/ (setup.py copies them at build time), found
through importlib.resources; a source checkout or editable install reads the repository's folders.
"""
import dataclasses
import tomllib
from importlib.resources import files
from pathlib import Path

from .errors import MimiqError


def read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MimiqError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise MimiqError(f"recipe {path} is not valid TOML: {e}") from None


def dataclass_from(cls, values: dict, where: str):
    """Build dataclass `cls` from `values`, refusing keys it does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MimiqError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    return cls(**values)


def with_defaults(cls, stored: dict) -> dict:
    """A recipe dict written by an older version, completed with the defaults of fields added since
    (they are off by default), so that runs made before an option existed still resume."""
    return {**dataclasses.asdict(cls()), **stored}


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
