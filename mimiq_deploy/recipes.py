"""Where a model's default calibration recipe lives: calib/<model>.toml beside the package."""
from pathlib import Path

CALIB_DIR = Path(__file__).resolve().parent.parent / "calib"


def resolve_recipe_path(recipe: Path | None, model_name: str) -> Path | None:
    """The given recipe, else calib/<model>.toml when it exists, else None (built-in defaults)."""
    if recipe is not None:
        return recipe
    candidate = CALIB_DIR / f"{Path(model_name).name}.toml"
    return candidate if candidate.exists() else None
