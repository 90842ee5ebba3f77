"""Image input: decoding, normalising, resizing to the model's pixel limits, encoding, and a bounded cache.

What is covered:

* Files are read once; the SHA-256 of their bytes identifies them in trajectories (images are stored by path
  plus hash, never embedded).
* Every image becomes 8-bit RGB in its EXIF orientation, so the model and every crop agree on which way is up.
  CMYK, 16-bit and 32-bit grey, float, palette, 1-bit and images with alpha (composited on white, as
  Qwen's own loader does) are converted. Animated files contribute their first frame.
* Pillow's decompression-bomb guard stays on: Pillow refuses images above ``2 × PIL.Image.MAX_IMAGE_PIXELS``
  (178,956,970 pixels by default) before decoding them. Set ``GLIMPSE_MAX_IMAGE_PIXELS`` to raise that limit
  for files you trust.
* ``smart_resize`` is the Qwen-VL resize rule: each side a multiple of the resize factor, the area within
  ``[min_pixels, max_pixels]``, aspect ratio below 200.

* Several originals in one question share one pixel budget (``shared_limits``): each is first sized by the
  per-image limits, then, when their areas add up to more than ``max_pixels``, all are scaled down by the same
  factor so that together they take about what one original would (each keeps at least ``min_pixels``).
  Crops are sized by the per-image limits, whichever original they are cut from.

* Memory: decoded originals are large (an 8K RGB image is about 100 MB). Pillow stores images in blocks of
  64 MiB (``_image_blocks_outside_the_heap``), which the C allocator maps on their own and gives back to the
  system when the image is freed; ``release_freed_memory`` hands back what the heaps keep of other freed
  memory (glibc), for long runs to call between phases. The cache of originals is bounded by bytes.

What is not: colour management (ICC profiles are ignored), video.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import io
import math
import os
import platform
import threading
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glimpse.errors import ConfigError, ImageInputError

# Pixel limits of what the model is shown: the crop limits of the Mini-o3 recipe (40,000 / 2,000,000 pixels).
MIN_PIXELS = 40_000
MAX_PIXELS = 2_000_000
# One Qwen2/2.5-VL image token covers 28×28 pixels (14-pixel patches merged 2×2); Qwen3-VL uses 32.
RESIZE_FACTOR = 28
# Qwen's smart_resize refuses images whose long side is 200 or more times the short side.
MAX_ASPECT_RATIO = 200
# Decoded originals kept in memory by default (an 8K RGB image is about 100 MB).
DEFAULT_CACHE_BYTES = 1 << 30
# Pillow's block size for image memory: above glibc's largest mmap threshold (32 MiB, DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit), so every block of an original is mapped on its own and returned when freed. Pillow's default, 16 MiB,
# comes from the heaps once glibc has raised its threshold, and their freed holes stay resident.
_IMAGE_BLOCK_BYTES = 64 << 20
_BLOCKS_SET = False

_ENV_MAX_IMAGE_PIXELS = "GLIMPSE_MAX_IMAGE_PIXELS"
# EXIF tag of the orientation; values 5 to 8 are transposed (width and height swap).
_EXIF_ORIENTATION = 0x0112
# Base64 characters decoded to read an image's size from a data URL (multiples of 4: 4 KB, then 64 KB).
_HEADER_CHARS = (5_464, 87_384)


@dataclass(frozen=True)
class PixelLimits:
    """How large an image the model is shown.

    Attributes:
        min_pixels: smallest area; smaller crops are scaled up.
        max_pixels: largest area; larger images and crops are scaled down.
        factor: each side is rounded to a multiple of this (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
    """

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    factor: int = RESIZE_FACTOR

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ConfigError(f"resize factor must be a positive integer, got {self.factor}")
        if self.min_pixels < self.factor * self.factor:
            raise ConfigError(
                f"min_pixels={self.min_pixels} is below one {self.factor}×{self.factor} cell; "
                f"use at least {self.factor * self.factor}"
            )
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"max_pixels={self.max_pixels} is below min_pixels={self.min_pixels}")


def smart_resize(width: int, height: int, limits: PixelLimits) -> tuple[int, int]:
    """Size an image of ``width × height`` is shown at: sides multiples of ``limits.factor``, area within limits.

    Returns:
        ``(width, height)`` after resizing.

    Raises:
        ConfigError: the aspect ratio is ``MAX_ASPECT_RATIO`` or more (callers check this first and turn it
            into an input error or a model-facing message).
    """
    if width <= 0 or height <= 0:
        raise ConfigError(f"cannot resize an image of {width}×{height} pixels")
    if max(width, height) / min(width, height) >= MAX_ASPECT_RATIO:
        raise ConfigError(f"aspect ratio of {width}×{height} is {MAX_ASPECT_RATIO}:1 or more")
    f = limits.factor
    w = max(f, round(width / f) * f)
    h = max(f, round(height / f) * f)
    if w * h > limits.max_pixels:
        beta = math.sqrt(width * height / limits.max_pixels)
        w = max(f, math.floor(width / beta / f) * f)
        h = max(f, math.floor(height / beta / f) * f)
    elif w * h < limits.min_pixels:
        beta = math.sqrt(limits.min_pixels / (width * height))
        w = math.ceil(width * beta / f) * f
        h = math.ceil(height * beta / f) * f
    return w, h


def shared_limits(sizes: list[tuple[int, int]], limits: PixelLimits) -> list[PixelLimits]:
    """Pixel limits for each of several originals shown together, so that they share one image's budget.

    The rule: each original is sized as it would be alone (``smart_resize`` with ``limits``, the Qwen-VL
    processors' per-image rule); if those areas add up to more than ``limits.max_pixels``, every image's area
    is scaled by the same factor ``max_pixels / total``, so their relative scale is kept and the first user
    turn costs about the tokens of one original. No image drops below ``limits.min_pixels`` (so with more
    than ``max_pixels / min_pixels`` images the total can exceed the cap). One image keeps ``limits`` as is.

    Args:
        sizes: ``(width, height)`` of each original, in order.
        limits: the run's per-image limits.

    Returns:
        One ``PixelLimits`` per original; ``fit(image, result[i])`` gives original ``i`` as shown.
    """
    fitted = [smart_resize(w, h, limits) for w, h in sizes]
    total = sum(w * h for w, h in fitted)
    if total <= limits.max_pixels:
        return [limits] * len(sizes)
    scale = limits.max_pixels / total
    return [
        PixelLimits(limits.min_pixels, max(limits.min_pixels, math.floor(w * h * scale)), limits.factor)
        for w, h in fitted
    ]


def image_tokens(width: int, height: int, factor: int = RESIZE_FACTOR) -> int:
    """Image tokens a Qwen-family model spends on an image already resized to ``width × height``."""
    return max(1, (width // factor) * (height // factor))


@dataclass(frozen=True)
class Original:
    """A decoded input image.

    Attributes:
        path: the path it was read from, as given.
        sha256: hex digest of the file's bytes.
        image: 8-bit RGB pixels in EXIF orientation; all crop boxes refer to these pixels.
    """

    path: str
    sha256: str
    image: Image.Image

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * 3


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB (alpha composited on white, high bit depths scaled)."""
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    if img.mode in ("I", "F"):
        _, hi = img.getextrema()
        # 16-bit data stored in 32-bit integers scales by 257; other ranges by their maximum.
        if img.mode == "I" and hi <= 255:
            scale = 1.0
        elif img.mode == "I" and hi <= 65535:
            scale = 1 / 257
        elif img.mode == "F" and hi <= 1.0:
            scale = 255.0
        else:
            scale = 255.0 / hi if hi > 0 else 1.0
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def apply_pixel_limit_override() -> None:
    """Pillow's decompression-bomb limit from ``GLIMPSE_MAX_IMAGE_PIXELS``, where it is set."""
    value = os.environ.get(_ENV_MAX_IMAGE_PIXELS)
    if not value:
        return
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{_ENV_MAX_IMAGE_PIXELS}={value!r} is not a positive integer number of pixels")
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; the variable sets the refusal point, and
    # its warning (which names half the limit set) would only confuse: the user asked for these images.
    Image.MAX_IMAGE_PIXELS = max(1, limit // 2)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _image_blocks_outside_the_heap() -> None:
    """Make Pillow allocate image memory in ``_IMAGE_BLOCK_BYTES`` blocks (once per process).

    With its default 16 MiB blocks glibc serves originals from its heaps once it has raised its mmap threshold to
    the size of the last large block freed, and freed holes stay resident: after a 40-probe evaluation of 8K
    originals the process held 4.2 GB, of which ``malloc_trim`` gave 3.3 GB back. Blocks above 32 MiB are always
    mapped on their own. An image smaller than a block takes only the memory it needs.
    """
    global _BLOCKS_SET
    if not _BLOCKS_SET:
        _BLOCKS_SET = True
        Image.core.set_block_size(max(Image.core.get_block_size(), _IMAGE_BLOCK_BYTES))


def release_freed_memory() -> None:
    """Give the memory glibc's heaps keep after frees back to the system (``malloc_trim``); nothing elsewhere.

    Freed holes between live objects stay resident otherwise: a long run calls this between phases (an RL step,
    a training run before its evaluation). Takes milliseconds.
    """
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)


# The formats read from users, files and requests: the raster formats images come in. Pillow's others stay
# closed (EPS, for one, is handed to Ghostscript).
# (JPEG covers phones' MPO files; a format this Pillow lacks, such as AVIF in older ones, is left out.)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF", "PPM", "JPEG2000")


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def decode_image(data: bytes, path: str) -> Image.Image:
    """Decode image bytes into EXIF-oriented 8-bit RGB.

    Raises:
        ImageInputError: empty, truncated, not an image, or above the decompression-bomb limit.
    """
    if not data:
        raise ImageInputError(path, "the file is empty (0 bytes)")
    apply_pixel_limit_override()
    _image_blocks_outside_the_heap()
    try:
        with Image.open(io.BytesIO(data), formats=_formats()) as img:
            img.load()
            # in place: without an orientation tag the default returns a copy, a second 8K image for nothing
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except Image.DecompressionBombError as exc:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageInputError(
            path,
            f"{exc} Pillow refuses images above {limit:,} pixels to guard against decompression bombs. "
            f"If you trust this file, set {_ENV_MAX_IMAGE_PIXELS} to a larger number of pixels.",
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            path, f"not an image in a format read here ({', '.join(_formats())}), or not an image at all"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(path, f"cannot decode the image, it may be truncated or corrupt ({exc})") from None


def read_image(path: str | os.PathLike[str]) -> Original:
    """Read, hash and decode an image file.

    Raises:
        ImageInputError: the file is missing, unreadable or not a decodable image, or its aspect ratio is
            beyond what the resize rule accepts.
    """
    p = str(path)
    try:
        data = Path(p).read_bytes()
    except FileNotFoundError:
        raise ImageInputError(p, "no such file") from None
    except IsADirectoryError:
        raise ImageInputError(p, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageInputError(p, f"cannot read the file ({exc.strerror or exc})") from None
    except ValueError:  # the OS cannot name such a file
        raise ImageInputError(p.replace("\0", "\\0"), "the path holds a NUL byte") from None
    return image_from_bytes(data, p)


def image_from_bytes(data: bytes, name: str) -> Original:
    """Hash and decode an image held in memory (``name`` stands for its path in messages and records).

    Raises:
        ImageInputError: not a decodable image, or an aspect ratio beyond what the resize rule accepts.
    """
    image = decode_image(data, name)
    ratio = max(image.size) / min(image.size)
    if ratio >= MAX_ASPECT_RATIO:
        raise ImageInputError(
            name,
            f"aspect ratio {image.width}×{image.height} ({ratio:.0f}:1) is at or above the {MAX_ASPECT_RATIO}:1 "
            "limit of the Qwen-VL resize rule; split the panorama into tiles",
        )
    return Original(path=name, sha256=hashlib.sha256(data).hexdigest(), image=image)


def oriented_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of an image file as viewed (after EXIF rotation), from its header only.

    Raises:
        ImageInputError: the file is missing or not an image.
    """
    try:
        with Image.open(path, formats=_formats()) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise ImageInputError(str(path), "no such file") from None
    except (OSError, ValueError) as exc:
        raise ImageInputError(str(path), f"cannot read the image header ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def fit(image: Image.Image, limits: PixelLimits, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Cut ``box`` (pixels of ``image``) and resize it to the size ``smart_resize`` gives, in one pass."""
    box = box or (0, 0, image.width, image.height)
    size = smart_resize(box[2] - box[0], box[3] - box[1], limits)
    if box == (0, 0, image.width, image.height) and size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, box=box)


COUNTERFACTUALS = ("black", "noise")


def counterfactual_view(image: Image.Image, kind: str, key: str) -> Image.Image:
    """What a counterfactual evaluation shows instead of a crop: an image of the same size without its content.

    ``black`` is all black (VisualNeedle's crop-black check); ``noise`` is uniform random pixels, the same for the
    same ``key`` (a trajectory and observation), so a recorded trajectory can be rendered again exactly.

    Raises:
        ConfigError: an unknown ``kind``.
    """
    if kind == "black":
        return Image.new("RGB", image.size, (0, 0, 0))
    if kind == "noise":
        import hashlib

        import numpy as np

        seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (image.height, image.width, 3), dtype=np.uint8)
        return Image.fromarray(pixels, "RGB")
    raise ConfigError(f"unknown counterfactual {kind!r}; choose one of {', '.join(COUNTERFACTUALS)}")


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an RGB image as JPEG (default, quality 95) or PNG."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise ConfigError(f"image format must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()


def data_url(image: Image.Image, fmt: str = "jpeg", quality: int = 95) -> str:
    """A ``data:image/...;base64,`` URL of the image, as OpenAI-compatible servers accept."""
    payload = base64.b64encode(encode_image(image, fmt, quality)).decode("ascii")
    return f"data:image/{fmt};base64,{payload}"


def _data_url_bytes(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise ImageInputError(url[:40] + "…", "only base64 data URLs are accepted for images")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ImageInputError(url[:40] + "…", "the base64 payload is invalid") from None


def data_url_size(url: str) -> tuple[int, int]:
    """``(width, height)`` of the image in a data URL, read from its header only.

    Only a prefix of the payload is decoded (4 KB, then 64 KB) when it holds the header, as it does for PNG
    and for JPEGs without large metadata blocks; otherwise the whole payload is.

    Raises:
        ImageInputError: not a base64 data URL of an image.
    """
    head, sep, payload = url.partition(",")
    if sep and head.startswith("data:") and ";base64" in head:
        for chars in _HEADER_CHARS:
            if len(payload) <= chars:
                break
            try:
                with Image.open(io.BytesIO(base64.b64decode(payload[:chars])), formats=_formats()) as img:
                    return img.size
            except (OSError, ValueError):
                continue
    try:
        with Image.open(io.BytesIO(_data_url_bytes(url)), formats=_formats()) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ImageInputError("data URL", "not a decodable image") from None


def decode_data_url(url: str) -> Image.Image:
    """Decode a ``data:image/...;base64,...`` URL into RGB pixels.

    Raises:
        ImageInputError: the URL is not a base64 data URL or does not hold a decodable image.
    """
    return decode_image(_data_url_bytes(url), "data URL")


class ImageCache:
    """A thread-safe LRU cache of decoded originals, bounded by decoded bytes.

    Decoding an 8K JPEG takes far longer than cropping it, so a trajectory (and the ``k`` samples of one
    question) decode each original once. Concurrent requests for the same file wait for one decode.

    Args:
        max_bytes: budget for decoded RGB pixels; the least recently used images are dropped beyond it.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, int], Original] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, int, int], threading.Lock] = {}
        self._held: dict[str, Original] = {}
        self.hits = 0
        self.misses = 0

    def hold(self, original: Original) -> None:
        """Serve ``original`` under its path for the cache's lifetime: an image that is not a file (bytes from a
        training dataset) goes through the loop like one. Held images are not counted in the budget."""
        with self._lock:
            self._held[original.path] = original

    @staticmethod
    def _key(path: str) -> tuple[str, int, int]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageInputError(path, "no such file") from None
        except OSError as exc:
            raise ImageInputError(path, f"cannot read the file ({exc.strerror or exc})") from None
        return (os.path.realpath(path), st.st_mtime_ns, st.st_size)

    def peek(self, path: str | os.PathLike[str]) -> Original | None:
        """The cached image at ``path`` if the file is unchanged since it was cached, else ``None`` (no decoding)."""
        p = str(path)
        held = self._held.get(p)
        if held is not None:
            return held
        try:
            key = self._key(p)
        except ImageInputError:
            return None
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found if found.path == p else Original(p, found.sha256, found.image)

    def get(self, path: str | os.PathLike[str]) -> Original:
        """The decoded image at ``path``, from the cache when the file is unchanged."""
        p = str(path)
        held = self._held.get(p)
        if held is not None:
            return held
        key = self._key(p)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found if found.path == p else Original(p, found.sha256, found.image)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found = self._items.get(key)
                if found is not None:
                    self.hits += 1
                    return found
            original = read_image(p)
            with self._lock:
                self.misses += 1
                self._key_locks.pop(key, None)
                if original.nbytes <= self.max_bytes:
                    self._items[key] = original
                    self._bytes += original.nbytes
                    while self._bytes > self.max_bytes:
                        _, dropped = self._items.popitem(last=False)
                        self._bytes -= dropped.nbytes
            return original

    def discard(self, path: str | os.PathLike[str]) -> None:
        """Forget the image at ``path`` (any version of the file, held or cached): for originals that will not
        be asked for again, such as a streamed probe deleted after its training step."""
        p = str(path)
        real = os.path.realpath(p)
        with self._lock:
            self._held.pop(p, None)
            for key in [k for k in self._items if k[0] == real]:
                self._bytes -= self._items.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def components(mask: np.ndarray, min_size: int = 1) -> list[tuple[int, int, int, int, int]]:
    """Connected regions (4-neighbour) of a boolean mask of at least ``min_size`` pixels: (x0, y0, x1, y1, pixel
    count), x1/y1 exclusive. Used by the expert's reader and the built-in model's ink blobs."""
    todo = set(map(tuple, np.argwhere(mask)))
    out = []
    while todo:
        start = todo.pop()
        queue, ys, xs = deque([start]), [start[0]], [start[1]]
        while queue:
            y, x = queue.popleft()
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if n in todo:
                    todo.remove(n)
                    queue.append(n)
                    ys.append(n[0])
                    xs.append(n[1])
        if len(ys) >= min_size:
            out.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1, len(ys)))
    return out
