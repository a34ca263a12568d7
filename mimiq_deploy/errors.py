"""One exception type for every user-facing mistake; the CLI prints it as one line."""
import json
import os
import tempfile
from pathlib import Path

import torch


class MimiqError(Exception):
    """Bad input or missing resources: the message says what to pass instead."""


def atomic_torch_save(obj, path) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    """Text written under a temporary name, then renamed: a file that exists is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
    """JSON written atomically: stages trust a record that exists."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
