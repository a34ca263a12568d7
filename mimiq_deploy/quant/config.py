"""Bit settings: `wXaY` (X-bit weights, Y-bit activations), 2 <= X, Y <= 8, and `fp8` (FP8 E4M3 weights and
activations: what TensorRT and ModelOpt recommend for ViTs on Hopper and Ada GPUs)."""
import dataclasses
import re

from ..errors import MimiqError


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    # The model's input image is 8-bit data: its quantizer (the first layer's input) keeps
    # max(act_bits, input_bits). At A3 a 3-bit image alone cost the teacher 4.9 points of
    # validation top-1, and which grey level the background landed on decided the calibration
    # set's ranking (benchmarks/RESULTS.md, "Low bits").
    input_bits: int = 8
    # Attention probabilities (softmax output, in [0, 1]) below 8 bits take an unsigned grid, codes
    # [0, 2^A - 1] with zero point 0 (UINT4 in ONNX at A4): a signed grid spends half its codes on
    # negative values they never take, leaving 4 levels at A3. At W3A3 the unsigned grid lifted
    # MimiQ + KL + HAD from 82.1 to 86 % validation top-1 and made L_HAD help instead of hurt
    # (benchmarks/RESULTS.md, "Low bits"). 8-bit activations stay signed: TensorRT takes int8 only,
    # and 128 levels are plenty.
    unsigned_probs: bool = True
    # FP8 E4M3FN codes instead of integers (weight_bits = act_bits = 8): per-channel weight scales, per-tensor
    # activation scales, zero point 0, as the integer scheme.
    fp8: bool = False

    @property
    def probs_unsigned(self) -> bool:
        return self.unsigned_probs and self.act_bits < 8 and not self.fp8

    @property
    def name(self) -> str:
        return "fp8" if self.fp8 else f"w{self.weight_bits}a{self.act_bits}"

    @property
    def effective(self) -> "QuantConfig":
        """The setting as the quantizers apply it: the image at max(act_bits, input_bits), the unsigned
        probability grid only below 8 bits. Two settings with the same effective one build the same student."""
        return dataclasses.replace(self, input_bits=max(self.act_bits, self.input_bits), unsigned_probs=self.probs_unsigned)

    def to_json(self) -> dict:
        """The one serialized form of the setting; records holding it spread these keys at their top level."""
        return {"bits": self.name, "input_bits": self.input_bits, "unsigned_probs": self.unsigned_probs}

    @classmethod
    def from_json(cls, record: dict) -> "QuantConfig":
        """The setting of a record holding to_json's keys (its other keys are ignored). Records written before
        a key existed: no input_bits, the image was quantized at act_bits; no unsigned_probs, a signed grid."""
        return cls._from_keys(**record)

    @classmethod
    def _from_keys(cls, bits: str | None = None, input_bits: int | None = None, unsigned_probs: bool | None = None,
                   **_other_keys) -> "QuantConfig":
        if not isinstance(bits, str):
            raise MimiqError(f"a record holds no bit setting (bits: {bits!r})")
        cfg = parse_bits(bits)
        return dataclasses.replace(cfg, input_bits=cfg.act_bits if input_bits is None else input_bits,
                                   unsigned_probs=bool(unsigned_probs))


def parse_bits(bits: str) -> QuantConfig:
    if bits.strip().lower() == "fp8":
        return QuantConfig(8, 8, fp8=True)
    m = re.fullmatch(r"w(\d)a(\d)", bits.strip().lower())
    if not m or not all(2 <= int(b) <= 8 for b in m.groups()):
        raise MimiqError(f"unsupported bit setting {bits!r}: use wXaY with 2 <= X, Y <= 8 (e.g. w4a4, w4a8, w8a8), "
                         "or fp8")
    return QuantConfig(int(m.group(1)), int(m.group(2)))
