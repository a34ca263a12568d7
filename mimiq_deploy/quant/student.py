"""The fake-quant student: built from a teacher, calibrated, saved as student.pt and loaded back."""
import copy
from pathlib import Path

from ..errors import MimiqError
from ..families import family_of
from ..run_dir import STUDENT_FORMAT, StudentCheckpoint
from ..zoo import load_teacher
from .config import QuantConfig
from .convert import QUANT_MODULES, calibrate, quantize_model


def build_student(teacher, cfg: QuantConfig):
    """A deep copy of the teacher with fake quantizers (weights' step sizes initialized), all of it trainable.

    The copy must not inherit the frozen teacher's requires_grad=False: that trained only the step sizes."""
    student = copy.deepcopy(teacher)
    student = quantize_model(student, cfg, family_of(student).quantized(student, QUANT_MODULES))
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def ptq_student(teacher, cfg: QuantConfig, images):
    """The student calibrated on `images`, not fine-tuned (what MaskAQ's first synthesis aligns with)."""
    student = build_student(teacher, cfg)
    calibrate(student, images.to(next(teacher.parameters()).device))
    return student


def save_student(path: Path, student, model_name: str, checkpoint: str | None, cfg: QuantConfig, meta: dict) -> None:
    """student.pt: the student's weights, the teacher it was built from, its bit setting; meta: the fine-tuning record."""
    StudentCheckpoint(format=STUDENT_FORMAT, model_name=model_name,
                      teacher_checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None, **cfg.to_json(),
                      state_dict=student.state_dict(), pretrained_cfg=dict(getattr(student, "pretrained_cfg", {}) or {}),
                      meta=meta).save(path)


def load_student(path: Path, trust: bool = False):
    """The fake-quant student of a `student.pt`, in eval mode.

    student.pt is always loaded without running code (mimiq-deploy writes only plain values);
    trust applies to the teacher checkpoint it names (`--trust-checkpoint`)."""
    ckpt = StudentCheckpoint.load(path)
    teacher = load_teacher(ckpt.model_name, ckpt.teacher_checkpoint, trust=trust)
    student = build_student(teacher, ckpt.quant)  # students of earlier versions: see StudentCheckpoint
    state = dict(ckpt.state_dict)
    for name, value in student.state_dict().items():
        if name.endswith("scale_floor"):  # only used in training; absent from older checkpoints
            state.setdefault(name, value)
    try:
        student.load_state_dict(state)
    except RuntimeError:
        raise MimiqError(f"{path} does not match the {ckpt.model_name} teacher it names "
                         "(was the teacher checkpoint replaced?)") from None
    student.model_name = ckpt.model_name
    return student.eval()
