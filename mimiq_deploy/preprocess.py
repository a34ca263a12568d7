"""The image preprocessing of a deployed model, the one implementation: what preprocessing.json describes, applied.

A raw image (uint8 HW, HWC or CHW array, or PNG / JPEG bytes) becomes the model's input, float32 (C, H, W):
1. geometry, only where the image is not already the model's size: timm's eval transform (resize the shorter
   side to size / crop_pct with the model's interpolation, center crop; or `squash` / `border`), as `verify`
   reads an ImageNet-style folder;
2. channels: converted to the model's (grayscale "L" for 1, "RGB" for 3; RGBA drops alpha);
3. normalize: (pixel / 255 - mean) / std per channel in float32, the same operations as the eval data of
   `verify` (data.normalize_uint8), so an image served raw gives the logits of the same image sent
   preprocessed, to the bit.

`serve` applies it inside the server to each raw-image request; clients that send the float tensor themselves
(examples/, benchmarks/) call the same functions. Every refusal is an ImageError whose message is meant for the
client that sent the image.
"""
import dataclasses
import functools
import io

import numpy as np

from .run_dir import Preprocessing

MAX_IMAGE_SIDE = 8192              # pixels per side of a raw or decoded image
MAX_IMAGE_PIXELS = 16 * 1024 ** 2  # pixels of one image (a decompression bomb is refused from its header)
MAX_ENCODED_BYTES = 16 * 1024 ** 2  # bytes of one encoded image
FORMATS = ("PNG", "JPEG")
CHANNEL_MODES = {1: "L", 3: "RGB"}
LAYOUTS = ("HWC", "CHW")


class ImageError(ValueError):
    """An image the model cannot take; the message says why, for the client that sent it."""


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """preprocessing.json (build.preprocessing) as a function: raw image -> the model's float input."""
    input_size: tuple                  # (C, H, W)
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    crop_mode: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "Preprocessor":
        """From preprocessing.json's keys (other keys ignored)."""
        pre = Preprocessing.from_json(d)
        size = tuple(int(v) for v in pre.input_size or ())
        if len(size) != 3 or size[0] not in CHANNEL_MODES:
            raise ValueError(f"input_size {size}: expected (C, H, W) with C = 1 or 3")
        return cls(size, tuple(float(v) for v in pre.mean), tuple(float(v) for v in pre.std),
                   pre.interpolation or "bilinear", pre.crop_pct, pre.crop_mode)

    @classmethod
    def of(cls, signature) -> "Preprocessor":
        """From a build.ModelSignature (what the model repository's preprocessing.json is written from)."""
        return cls.from_json(signature.preprocessing())

    @property
    def channels(self) -> int:
        return self.input_size[0]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) or (C, H, W) at the model's size -> float32, (pixel / 255 - mean) / std."""
        shape = (-1, 1, 1) if pixels.ndim == 3 else (1, -1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return (pixels.astype(np.float32) / np.float32(255.0) - mean) / std

    def from_array(self, image: np.ndarray, layout: str | None = None) -> np.ndarray:
        """One uint8 image, HW, HWC or CHW (layout: "HWC" / "CHW", else told from where a 1-, 3- or 4-sized
        axis is) -> float32 (C, H, W)."""
        if image.dtype != np.uint8:
            raise ImageError(f"a raw image is uint8, got {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        elif image.ndim != 3:
            raise ImageError(f"a raw image is HW, HWC or CHW, got {image.ndim} dimensions {list(image.shape)}")
        layout = (layout or self._layout(image.shape)).upper()
        if layout not in LAYOUTS:
            raise ImageError(f"layout {layout!r}: choose HWC or CHW")
        hwc = image if layout == "HWC" else np.moveaxis(image, 0, -1)
        if hwc.shape[2] not in (1, 3, 4):
            raise ImageError(f"a {layout} image of shape {list(image.shape)} has {hwc.shape[2]} channels; "
                             "1 (gray), 3 (RGB) or 4 (RGBA) are taken")
        self._check_size(hwc.shape[1], hwc.shape[0])
        c, h, w = self.input_size
        if hwc.shape[:2] == (h, w) and hwc.shape[2] == c:  # the model's size and channels: nothing to resample
            return self.normalize(np.ascontiguousarray(np.moveaxis(hwc, -1, 0)))
        from PIL import Image
        pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else np.ascontiguousarray(hwc))
        return self.from_pil(pil)

    def from_bytes(self, data: bytes) -> np.ndarray:
        """One encoded PNG or JPEG image -> float32 (C, H, W)."""
        from PIL import Image, UnidentifiedImageError
        if len(data) == 0:
            raise ImageError("the encoded image is empty")
        if len(data) > MAX_ENCODED_BYTES:
            raise ImageError(f"the encoded image has {len(data)} bytes, more than the {MAX_ENCODED_BYTES} taken")
        try:
            pil = Image.open(io.BytesIO(data), formats=FORMATS)
            self._check_size(*pil.size)  # from the header, before decoding a single pixel
            pil.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"cannot decode the image: not a {' or '.join(FORMATS)} file, or truncated "
                             f"({len(data)} bytes, starting {data[:8]!r})") from None
        except Image.DecompressionBombError as e:  # Pillow's own limit, checked as it opens
            raise ImageError(f"the image is too large to decode: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot decode the image ({type(e).__name__}: {e})") from None
        return self.from_pil(pil)

    def from_pil(self, pil) -> np.ndarray:
        """A PIL image -> float32 (C, H, W): channels, timm's eval geometry, normalize."""
        mode = CHANNEL_MODES[self.channels]
        if pil.mode != mode:
            pil = pil.convert(mode)
        if pil.size != (self.input_size[2], self.input_size[1]):
            pil = self.geometry(pil)
        pixels = np.asarray(pil, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        return self.normalize(np.ascontiguousarray(pixels))

    @functools.cached_property
    def geometry(self):
        """timm's eval transform without its tensor conversion and normalization (use_prefetcher: PIL in, the
        resized and cropped PIL image out)."""
        from timm.data import create_transform
        transform = create_transform(input_size=self.input_size, interpolation=self.interpolation,
                                     crop_pct=self.crop_pct, crop_mode=self.crop_mode, is_training=False,
                                     use_prefetcher=True)
        geometric = transform.transforms[:-1]  # the last one, MaybePILToTensor, is left to from_pil

        def apply(pil):
            for t in geometric:
                pil = t(pil)
            return pil
        return apply

    def _layout(self, shape: tuple) -> str:
        if shape[2] in (1, 3, 4):
            return "HWC"
        if shape[0] in (1, 3, 4):
            return "CHW"
        raise ImageError(f"cannot tell the layout of an image of shape {list(shape)}: neither its last (HWC) nor "
                         "its first (CHW) axis has 1, 3 or 4 channels")

    @staticmethod
    def _check_size(width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ImageError(f"the image is empty ({width}x{height} pixels)")
        if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
            raise ImageError(f"the image is {width}x{height} pixels: at most {MAX_IMAGE_SIDE} per side and "
                             f"{MAX_IMAGE_PIXELS} in all are taken")
