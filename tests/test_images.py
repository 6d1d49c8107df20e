"""Image loading: modes, orientation, resizing and normalisation, against Pillow and torchvision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests.conftest import make_image
from vitembed.errors import ConfigError, InputError
from vitembed.images.decode import NORMALIZATIONS, Preprocess, is_image_path, load_image, parse_color
from vitembed.layer.reference import LayerConfig, build_layer
from vitembed.encoder import encode_images

TV_INTERP = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
    "lanczos": transforms.InterpolationMode.LANCZOS,
}


@pytest.mark.parametrize("interpolation", sorted(TV_INTERP))
def test_squash_matches_torchvision_resize(sample_paths, interpolation):
    path = sample_paths[0]
    ours = load_image(path, Preprocess(image_size=224, interpolation=interpolation))
    ref = transforms.Resize((224, 224), interpolation=TV_INTERP[interpolation])(Image.open(path).convert("RGB"))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(ref))


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (640, 427)])
def test_crop_matches_torchvision_resize_centercrop(tmp_path, size):
    path = make_image(tmp_path / "x.png", size=size)
    ours = load_image(path, Preprocess(image_size=224, resize="crop", crop_pct=0.875))
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    np.testing.assert_array_equal(ours, np.asarray(tf(Image.open(path).convert("RGB"))))


def test_pad_keeps_aspect_on_background(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (10, 20, 30)).save(path)
    out = load_image(path, Preprocess(image_size=224, resize="pad", background=(255, 0, 0)))
    assert out.shape == (224, 224, 3)
    # 200 x 100 -> 224 x 112, centred: rows 56..167 are the image, the rest the background.
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[223, 100], [255, 0, 0])
    np.testing.assert_array_equal(out[112, 112], [10, 20, 30])
    assert (out[56:168] == [10, 20, 30]).all()
    assert (out[:56] == [255, 0, 0]).all()


def test_target_size_is_not_resampled(tmp_path):
    path = make_image(tmp_path / "exact.png", size=(224, 224))
    for interpolation in ("bilinear", "nearest", "lanczos"):
        out = load_image(path, Preprocess(image_size=224, interpolation=interpolation))
        np.testing.assert_array_equal(out, np.asarray(Image.open(path)))


def test_alpha_composited_over_background(sample_paths):
    horse = next(p for p in sample_paths if p.name == "horse.png")
    rgba = np.asarray(Image.open(horse), dtype=np.float64)
    assert rgba.shape[2] == 4 and rgba[..., 3].min() < 255  # the photo really is translucent
    for background in [(255, 255, 255), (0, 0, 0), (0, 128, 255)]:
        alpha = rgba[..., 3:] / 255
        blended = rgba[..., :3] * alpha + np.array(background) * (1 - alpha)  # "over" compositing
        ref = Image.fromarray(np.rint(blended).astype(np.uint8)).resize((224, 224), Image.Resampling.BILINEAR)
        out = load_image(horse, Preprocess(background=background))
        assert np.abs(out.astype(int) - np.asarray(ref, dtype=int)).max() <= 1


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.paste(1, (0, 0, 16, 32))
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    out = load_image(path, Preprocess(image_size=32, background=(0, 255, 0)))
    assert out[5, 5].tolist() == [200, 10, 10]
    assert out[5, 25].tolist() == [0, 255, 0]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    out = load_image(path, Preprocess(image_size=2))
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [200, 255]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_and_grey_modes(tmp_path):
    cmyk = make_image(tmp_path / "c.jpg", mode="CMYK")
    grey = make_image(tmp_path / "g.png", mode="L")
    for path in (cmyk, grey):
        out = load_image(path, Preprocess(image_size=32))
        assert out.shape == (32, 32, 3)
    grey1 = load_image(grey, Preprocess(image_size=32, channels=1))
    assert grey1.shape == (32, 32, 1)


def test_exif_orientation_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rot.png"
    im.save(path, exif=exif)
    out = load_image(path, Preprocess(image_size=40, interpolation="nearest"))
    # Displayed upright the image is 20 wide x 40 high with the white half on top.
    assert out[:20].mean() > 200 and out[20:].mean() < 50


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    out = load_image(path, Preprocess(image_size=16))
    assert out[8, 8, 0] > 200 and out[8, 8, 2] < 50


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "not an image"), (b"<html>hello</html>", "not an image"), (None, "no such file")],
)
def test_bad_inputs_raise_input_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=reason):
        load_image(path, Preprocess())


def test_truncated_jpeg_is_an_error(tmp_path, sample_paths):
    jpg = next(p for p in sample_paths if p.suffix == ".jpg")
    path = tmp_path / "trunc.jpg"
    path.write_bytes(jpg.read_bytes()[:5000])
    with pytest.raises(InputError, match="decode"):
        load_image(path, Preprocess())


def test_max_pixels_refuses_from_header(tmp_path):
    path = make_image(tmp_path / "big.png", size=(300, 200))
    with pytest.raises(InputError, match="300 x 200"):
        load_image(path, Preprocess(max_pixels=50_000))
    assert load_image(path, Preprocess(max_pixels=60_000)).shape == (224, 224, 3)


def test_normalisation_matches_torchvision(sample_paths):
    """encode_images = torchvision ToTensor + Normalize on the same pixels, then the layer."""
    layer = build_layer(LayerConfig(224, 16, 32), seed=0)
    path = sample_paths[1]
    for name in ("imagenet", "clip", "none"):
        prep = Preprocess().with_normalize(name)
        pixels = load_image(path, prep)
        mean, std = NORMALIZATIONS[name]
        x = transforms.Normalize(mean, std)(transforms.ToTensor()(pixels)).unsqueeze(0)
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(encode_images([path], layer, prep), expected, rtol=1e-5, atol=1e-5)


def test_preprocess_validation():
    with pytest.raises(ConfigError, match="resize"):
        Preprocess(resize="stretch")
    with pytest.raises(ConfigError, match="crop-pct"):
        Preprocess(crop_pct=0)
    with pytest.raises(ConfigError, match="channels"):
        Preprocess(channels=4)
    with pytest.raises(ConfigError, match="normalization"):
        Preprocess().with_normalize("imagenet21k")
    assert Preprocess(channels=1).mean == (pytest.approx(sum(NORMALIZATIONS["imagenet"][0]) / 3),)


def test_parse_color():
    assert parse_color("white") == (255, 255, 255)
    assert parse_color("#102030") == (16, 32, 48)
    assert parse_color("1,2,3") == (1, 2, 3)
    with pytest.raises(ConfigError):
        parse_color("1,2")
    with pytest.raises(ConfigError):
        parse_color("notacolour")


def test_is_image_path():
    assert is_image_path("a/b.JPG") and is_image_path("x.png") and is_image_path("y.webp")
    assert not is_image_path("notes.txt") and not is_image_path("README")


def test_common_extensions_need_no_plugin_scan():
    """A folder of JPEGs is walked without importing all of Pillow's plugins (about 20 ms), and a
    rarer format is still found once they are."""
    code = (
        "from PIL import Image\n"
        "from vitembed.images.decode import is_image_path\n"
        "assert is_image_path('a.JPG') and is_image_path('b.jpeg') and is_image_path('c.png')\n"
        "assert not is_image_path('.marker') and not is_image_path('notes.txt') and not is_image_path('a.npy')\n"
        "assert Image._initialized < 2, 'every plugin was imported for a JPEG or a known non-image'\n"
        "assert is_image_path('d.tga') and is_image_path('e.tiff') and not is_image_path('f.txt')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_known_non_image_extensions_are_not_pillows():
    from vitembed.images.decode import _NOT_IMAGES, image_extensions

    assert _NOT_IMAGES.isdisjoint(image_extensions())
