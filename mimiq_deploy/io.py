"""Files of the run directory: atomic writes, safe torch loading, JSON records, the run lock.

The bottom layer: it imports nothing of mimiq_deploy but the error type."""
import argparse
import contextlib
import errno
import fcntl
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import MimiqError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed onto it:
    a file that exists is complete, and two writers never share a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain write gives
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        if _disk_full(e):  # the partial file goes (finally); what was complete stays, so a rerun resumes
            raise MimiqError(f"no space left on the device writing {path}: free some space and rerun, "
                             "the run resumes where it stopped") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wraps it (torch.save raises RuntimeError around the write)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _torch_save(obj, tmp: Path) -> None:
    with open(tmp, "wb") as f:  # through a Python file, so a full disk surfaces as OSError(ENOSPC)
        torch.save(obj, f)


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path, obj) -> None:
    """JSON written atomically: stages trust a record that exists."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path) -> dict:
    """A JSON record of the run directory; a corrupt or truncated one is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MimiqError(f"{path} is corrupt or truncated ({e.__class__.__name__}): remove it and rerun the stage "
                         "that wrote it") from None


# Globals that real checkpoints carry besides tensors and containers, and that cannot run code
# when unpickled: DeiT / timm training checkpoints store their `args` as an argparse.Namespace.
SAFE_GLOBALS = [argparse.Namespace]
TRUST_HINT = "pass --trust-checkpoint to load it anyway, only if you trust where it came from"


def load_torch_file(path, what: str = "checkpoint", trust: bool = False, own: bool = False):
    """torch.load that never runs code from the file: weights_only=True, plus SAFE_GLOBALS.

    trust: load the old way (full unpickling), the user's explicit opt-in (`--trust-checkpoint`).
    own: a file mimiq-deploy writes itself (student.pt, shards, resume states); those hold only
    tensors and plain values, so one needing anything else did not come from mimiq-deploy."""
    path = Path(path)
    if not path.is_file():
        raise MimiqError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the user gets one line
            warnings.simplefilter("ignore")
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False)
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None and "Weights only load failed" not in str(e):
            raise MimiqError(f"cannot read {what} {path} (corrupt or truncated): {e}") from None
        needs = f"the global {found.group(1)}" if found else "pickle features beyond tensors and plain values"
        where = "it was not written by mimiq-deploy" if own else TRUST_HINT
        raise MimiqError(f"refused to load {what} {path}: it needs {needs}, "
                         f"and unpickling that could run code ({where})") from None
    except Exception as e:  # torch raises many types for a corrupt or truncated file
        raise MimiqError(f"cannot read {what} {path} (corrupt, truncated or not a torch file): "
                         f"{type(e).__name__}") from None


def save_resume_state(path, objects: dict, **values) -> None:
    """A stage's state after an epoch: the state_dict() of each of `objects` (model, optimizer,
    scheduler) under its key, plain `values`, and torch's RNGs (the GPUs' too: drop-path draws there);
    written atomically."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    atomic_torch_save({**{k: o.state_dict() for k, o in objects.items()}, **values,
                       "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng}, path)


def restore_resume_state(state: dict, objects: dict) -> None:
    """Load what save_resume_state stored back into `objects`, and torch's RNGs."""
    for k, o in objects.items():
        o.load_state_dict(state[k])
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir, verb: str = "quantize"):
    """Hold run_dir/.lock for a whole run, so a second run on the same directory refuses with one line.
    An flock belongs to its process: a killed run leaves the file but not the lock."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise MimiqError(f"{run_dir} is in use by another {verb} run ({holder}): wait for it to finish, "
                         "or pass another --out") from None
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
