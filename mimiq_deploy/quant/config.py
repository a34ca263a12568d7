"""Bit settings: `wXaY` (X-bit weights, Y-bit activations), 2 <= X, Y <= 8."""
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

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


def parse_bits(bits: str) -> QuantConfig:
    m = re.fullmatch(r"w(\d)a(\d)", bits.strip().lower())
    if not m or not all(2 <= int(b) <= 8 for b in m.groups()):
        raise MimiqError(f"unsupported bit setting {bits!r}: use wXaY with 2 <= X, Y <= 8 (e.g. w4a4, w4a8, w8a8)")
    return QuantConfig(int(m.group(1)), int(m.group(2)))
