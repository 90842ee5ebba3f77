"""Image input: modes, orientation, broken files, size limits and the decoded-image cache."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import gradient_image
from glimpse.errors import ImageInputError
from glimpse.images import ImageCache, PixelLimits, data_url, decode_data_url, fit, read_image, to_rgb


def test_reads_and_hashes(make_image):
    path = make_image(300, 200)
    img = read_image(path)
    assert img.image.mode == "RGB" and img.image.size == (300, 200)
    assert len(img.sha256) == 64
    assert img.sha256 == read_image(path).sha256


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("truncated", "truncated or corrupt"),
        ("not_image", "not an image in a format read here"),
        ("eps", "not an image in a format read here"),  # a PostScript file is never handed to Ghostscript
        ("directory", "directory"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, setup, message):
    path = tmp_path / "bad.png"
    if setup == "empty":
        path.write_bytes(b"")
    elif setup == "truncated":
        buf = io.BytesIO()
        gradient_image(400, 300).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif setup == "not_image":
        path.write_text("this is not an image")
    elif setup == "eps":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    elif setup == "directory":
        path.mkdir()
    with pytest.raises(ImageInputError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    gradient_image(640, 480).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:-2000])
    with pytest.raises(ImageInputError, match="truncated"):
        read_image(path)


def test_decompression_bomb_keeps_pillows_limit_and_explains_it(make_image, monkeypatch):
    path = make_image(400, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 120,000 pixels is then above 2 × the limit
    with pytest.raises(ImageInputError) as info:
        read_image(path)
    text = str(info.value)
    assert "decompression bomb" in text and "100,000" in text and "GLIMPSE_MAX_IMAGE_PIXELS" in text


def test_pixel_limit_can_be_raised_for_trusted_files(make_image, monkeypatch):
    path = make_image(400, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    monkeypatch.setenv("GLIMPSE_MAX_IMAGE_PIXELS", "1_000_000")
    assert read_image(path).image.size == (400, 300)


def test_extreme_panorama_is_refused_with_the_limit(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("RGB", (20_000, 90), (10, 20, 30)).save(path)
    with pytest.raises(ImageInputError, match="200:1"):
        read_image(path)


def test_wide_panorama_within_limit_is_resized(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("RGB", (12_000, 400), (10, 20, 30)).save(path)
    img = read_image(path)
    shown = fit(img.image, PixelLimits())
    assert shown.width % 28 == 0 and shown.height % 28 == 0 and shown.width * shown.height <= 2_000_000


def _roundtrip(img: Image.Image, tmp_path, fmt: str, name: str, **save) -> Image.Image:
    path = tmp_path / name
    img.save(path, format=fmt, **save)
    return read_image(path).image


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    out = _roundtrip(cmyk, tmp_path, "JPEG", "c.jpg", quality=100)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((32, 32), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    out = _roundtrip(Image.fromarray(arr), tmp_path, "PNG", "g16.png")
    assert out.mode == "RGB"
    assert abs(out.getpixel((0, 0))[0] - 127) <= 1


def test_palette_with_transparency_and_alpha_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    out = _roundtrip(rgba, tmp_path, "PNG", "a.png")
    assert out.getpixel((5, 5)) == (255, 255, 255)
    half = Image.new("LA", (20, 20), (0, 128))
    out = _roundtrip(half, tmp_path, "PNG", "la.png")
    assert abs(out.getpixel((5, 5))[0] - 127) <= 1
    pal = Image.new("P", (20, 20), 3)
    pal.putpalette([0, 0, 0] * 3 + [0, 200, 0] + [0, 0, 0] * 252)
    pal.info["transparency"] = 0
    assert _roundtrip(pal, tmp_path, "PNG", "p.png").getpixel((5, 5)) == (0, 200, 0)


@pytest.mark.parametrize("mode", ["1", "L", "I", "F", "RGBX", "YCbCr"])
def test_other_modes_become_rgb(mode):
    img = Image.new(mode, (8, 8))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_exif_rotation_is_applied_so_crops_agree_with_the_view(tmp_path):
    # Stored 400×200 with orientation 6 (rotate 90° clockwise to view): the viewer sees 200×400.
    stored = gradient_image(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    stored.save(path, format="JPEG", quality=100, exif=exif.tobytes())
    img = read_image(path).image
    assert img.size == (200, 400)
    expected = stored.transpose(Image.Transpose.ROTATE_270)
    # The top-left of what the viewer sees was the bottom-left of the stored pixels.
    a = np.asarray(img.crop((0, 0, 50, 50)), dtype=int)
    b = np.asarray(expected.crop((0, 0, 50, 50)), dtype=int)
    assert np.abs(a - b).mean() < 3


def test_data_url_roundtrip():
    img = gradient_image(64, 32)
    for fmt in ("png", "jpeg"):
        back = decode_data_url(data_url(img, fmt))
        assert back.size == (64, 32)
    assert np.array_equal(np.asarray(decode_data_url(data_url(img, "png"))), np.asarray(img))
    with pytest.raises(ImageInputError):
        decode_data_url("http://example.com/x.png")


def test_cache_decodes_once_and_notices_changes(make_image):
    path = make_image(200, 100)
    cache = ImageCache()
    a = cache.get(path)
    b = cache.get(path)
    assert a.image is b.image and cache.misses == 1 and cache.hits == 1
    gradient_image(120, 60).save(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.get(path).image.size == (120, 60)


def test_cache_is_bounded_by_bytes(make_image):
    cache = ImageCache(max_bytes=200 * 100 * 3 * 2)
    paths = [make_image(200, 100, name=f"i{i}.png") for i in range(4)]
    for p in paths:
        cache.get(p)
    assert len(cache._items) == 2
    assert cache._bytes <= cache.max_bytes


def test_discard_forgets_an_original_and_its_bytes(make_image):
    cache = ImageCache()
    kept, gone = make_image(200, 100, name="kept.png"), make_image(120, 60, name="gone.png")
    cache.get(kept)
    cache.get(gone)
    cache.discard(gone)
    assert [k[0] for k in cache._items] == [os.path.realpath(kept)]
    assert cache._bytes == 200 * 100 * 3
    os.unlink(kept)  # a streamed probe's file is deleted with it: forgotten by name, no stat needed
    cache.discard(kept)
    assert not cache._items and cache._bytes == 0


def test_decoding_makes_no_second_copy_of_the_pixels(make_image, monkeypatch):
    """A decoded 8K original is about 100 MB: EXIF handling must not copy it when there is nothing to rotate."""
    path = make_image(300, 200, name="plain.jpg")
    copies = []
    original_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(self.size) or original_copy(self))
    assert read_image(path).image.size == (300, 200)
    assert copies == []


_FREE_CHECK = """
import ctypes, sys
from PIL import Image
import glimpse.images as images
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return next(int(x.split()[1]) << 10 for x in open("/proc/self/status") if x.startswith("VmRSS"))
big = libc.malloc(24 << 20)  # glibc's default lifts its mmap threshold to the size of a large block once freed
ctypes.memset(big, 1, 24 << 20)
libc.free(big)
if sys.argv[1] == "release":
    block = libc.malloc(8 << 20)
    ctypes.memset(block, 1, 8 << 20)
    pin = libc.malloc(1000)  # lies after the block: a heap cannot give the block back by shrinking from its top
    libc.free(block)
    before = rss()
    images.release_freed_memory()
else:
    image = images.decode_image(open(sys.argv[2], "rb").read(), sys.argv[2]) if sys.argv[1] == "decode" else None
    pixels = Image.new("RGB", (4000, 3000), (1, 2, 3))  # 36 MB, in blocks as images are decoded into
    pin = libc.malloc(1000)
    before = rss()
    del pixels
print((before - rss()) >> 20)
"""


def _given_back(mode: str, path: Path) -> int:
    run = subprocess.run([sys.executable, "-c", _FREE_CHECK, mode, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heaps' behaviour is glibc's")
def test_after_a_decode_a_freed_image_goes_back_to_the_system(make_image):
    path = make_image(64, 48, name="small.png")
    assert _given_back("plain", path) < 20  # Pillow's default blocks stay in glibc's heaps (the check is real)
    assert _given_back("decode", path) >= 30


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_gives_back_a_freed_block_inside_the_heap(make_image):
    assert _given_back("release", make_image(64, 48, name="small.png")) >= 7


def test_a_path_with_a_nul_byte_is_an_input_error_not_a_crash():
    from glimpse.errors import ImageInputError
    from glimpse.images import read_image

    with pytest.raises(ImageInputError, match="NUL"):
        read_image("photo\0.jpg")


def test_several_originals_share_one_images_pixel_budget():
    from glimpse.images import shared_limits, smart_resize

    limits = PixelLimits()  # 40,000 to 2,000,000 pixels, factor 28
    (alone,) = shared_limits([(4000, 3000)], limits)
    assert alone == limits  # one image: the per-image limits, unchanged

    sizes = [(4000, 3000), (3000, 4000), (800, 600)]
    shown = [smart_resize(w, h, lim) for (w, h), lim in zip(sizes, shared_limits(sizes, limits), strict=True)]
    areas = [w * h for w, h in shown]
    assert sum(areas) <= limits.max_pixels and sum(areas) > 0.9 * limits.max_pixels
    assert all(w % 28 == 0 and h % 28 == 0 for w, h in shown)
    alone_areas = [w * h for w, h in (smart_resize(w, h, limits) for w, h in sizes)]
    ratios = [a / b for a, b in zip(areas, alone_areas, strict=True)]
    assert max(ratios) / min(ratios) < 1.1  # all scaled by about the same factor, relative scale kept

    small = [(300, 200), (320, 240)]  # together under the cap: each as it would be alone
    assert shared_limits(small, limits) == [limits, limits]
    many = [(4000, 3000)] * 60  # more than max/min images: none drops below min_pixels
    assert all(lim.max_pixels == limits.min_pixels for lim in shared_limits(many, limits))
    w, h = smart_resize(4000, 3000, shared_limits(many, limits)[0])
    assert 0.9 * limits.min_pixels <= w * h <= limits.min_pixels
