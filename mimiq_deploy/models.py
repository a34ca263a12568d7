"""Model loading, one function for every verb: the embedded default, timm + checkpoint, timm weights
already in the local cache, or a fine-tuned student. Never downloads. Teachers live in zoo.py,
students in quant/student.py; this module sits above both."""
from pathlib import Path

from torch import nn

from .errors import MimiqError
from .quant.student import load_student
from .zoo import DEFAULT_MODEL, EMBEDDED, data_config, is_path, is_teacher_checkpoint, load_teacher, read_checkpoint

__all__ = ["load_model", "data_config", "DEFAULT_MODEL", "EMBEDDED"]


def load_model(name: str, checkpoint: str | Path | None = None, capture: bool = True, trust: bool = False) -> nn.Module:
    """Load a teacher in eval mode, its attention captured (see attention.py).

    name: the embedded default ('fmnist-vit'), or a timm model name. With `checkpoint`, the
    weights come from that file (a plain state dict or a checkpoint with a 'model' entry);
    without it, from timm's pretrained weights in the local Hugging Face / torch hub cache.
    The model's preprocessing is `model.pretrained_cfg` (input_size, mean, std).
    With 'fmnist-vit', `checkpoint` may be any checkpoint `mimiq-deploy teacher train` wrote (it
    carries its architecture). A path as `name` loads that teacher checkpoint, or that fine-tuned
    `student.pt` as its fake-quant student.
    trust: unpickle the checkpoint fully (`--trust-checkpoint`); by default a checkpoint that
    needs more than tensors and plain values is refused, since unpickling it could run code.
    """
    if is_path(name):  # a path: a student, or a teacher from `teacher train`
        if not Path(name).is_file():
            raise MimiqError(f"checkpoint not found: {name}")
        # both kinds hold only plain values: read without trust, whatever --trust-checkpoint says
        ckpt = read_checkpoint(Path(name))
        if not is_teacher_checkpoint(ckpt):
            return load_student(Path(name), trust=trust)
        return load_teacher(name, capture=capture, ckpt=ckpt)
    return load_teacher(name, checkpoint, capture, trust)
