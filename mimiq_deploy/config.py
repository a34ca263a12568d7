"""Recipes are TOML files (calib/, export/); every value also has a built-in default."""
import dataclasses
import tomllib
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
