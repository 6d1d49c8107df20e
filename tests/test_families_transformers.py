"""transformers' ViT families: vitembed's z0 equals each class's own first hidden state.

Each model is built by transformers with random weights (one block, every parameter drawn N(0, 1),
so that a dropped or misplaced step shows in the numbers: D = 32, P = 8, trained at 32 x 32),
saved with `save_pretrained` (config.json travels with it) and read back by vitembed from that
folder. The reference is `model(pixel_values=x, output_hidden_states=True).hidden_states[0]`, what
the first transformer block receives, with `interpolate_pos_encoding=True` where the class takes it
(Dinov2 and DINOv3 resample or need nothing on their own). Sizes: the trained one, another square
and a rectangle, each with vitembed's default resampling (the checkpoint library's own).

Also here: a folder's image processor as the default preprocessing (its crop size, geometry,
interpolation, mean, std and rescale, against the processor's own pixels), the common `hf:` names
from a Hugging Face cache laid out by the test, offline, and what `info` says and refuses.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_image, run_cli, slow_but
from tests.test_checkpoints import assert_clean_error, fill_hf_cache, pixels
from vitembed.weights.checkpoints import resize_weights
from vitembed.encoder import Encoder
from vitembed.images.decode import Preprocess, load_image
from vitembed.show.pictures import token_layout
from vitembed.weights.load import load_weights

ATOL = RTOL = 1e-4
P, D, TRAINED = 8, 32, 32
SIZES = [(32, 32), (48, 48), (32, 48)]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# name (the transformers class, +variant): its config class, config arguments beyond the common ones,
# the source vitembed names, and the rows before the patches
FAMILIES = {
    "ViTModel": ("ViTConfig", {}, "transformers ViTModel", 1),
    "DeiTModel": ("DeiTConfig", {}, "transformers DeiTModel", 2),
    "ViTMAEModel": ("ViTMAEConfig", dict(mask_ratio=0.0), "transformers ViTMAEModel", 1),
    "BeitModel": ("BeitConfig", dict(use_relative_position_bias=True), "transformers BeitModel", 1),
    "BeitModel+abs": ("BeitConfig", dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True),
                      "transformers BeitModel", 1),
    "Dinov2Model": ("Dinov2Config", {}, "transformers Dinov2Model", 1),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(num_register_tokens=2),
                                 "transformers Dinov2WithRegistersModel", 3),
    "DINOv3ViTModel": ("DINOv3ViTConfig", dict(num_register_tokens=2), "transformers DINOv3ViTModel", 3),
    # a pre-norm eps far from the default: read from config.json (a full model's vision_config), or z0 differs
    "CLIPVisionModel": ("CLIPVisionConfig", dict(layer_norm_eps=0.1), "transformers CLIPVisionModel", 1),
    "CLIPModel": ("CLIPConfig", dict(layer_norm_eps=0.1), "transformers CLIPVisionModel (under 'vision_model')", 1),
    "SiglipVisionModel": ("SiglipVisionConfig", {}, "transformers SiglipVisionModel", 0),
    "SiglipModel": ("SiglipConfig", {}, "transformers SiglipVisionModel (under 'vision_model')", 0),
}


def randomize(model):
    """Every parameter N(0, 1) (position tables, tokens, norms included), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def build(name: str, image_size: int = TRAINED, patch_size: int = P):
    """The family's model, one block, D = 32, its parameters random."""
    import transformers

    config_name, extra = FAMILIES[name][:2]
    cls_name = name.split("+")[0]
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=D, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=2 * D, **extra)
    config_cls = getattr(transformers, config_name)
    if name in ("CLIPModel", "SiglipModel"):  # the full model: a text tower beside the vision tower
        text = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * D,
                    vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        config = config_cls(text_config=text, vision_config=vision, projection_dim=D)
    else:
        config = config_cls(**vision)
    torch.manual_seed(0)
    return randomize(getattr(transformers, cls_name)(config))


def hidden0(model, x: torch.Tensor) -> torch.Tensor:
    """What the model's first block receives for pixel_values x: hidden_states[0]."""
    tower = model.vision_model if hasattr(model, "text_model") else model
    kw = {}
    if "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters:
        kw["interpolate_pos_encoding"] = True
    if type(model).__name__ == "ViTMAEModel":  # unmasked (mask_ratio 0), in the patches' own order
        b, _, h, w = x.shape
        kw["noise"] = torch.arange((h // P) * (w // P), dtype=torch.float32).expand(b, -1)
    with torch.no_grad():
        return tower(pixel_values=x, output_hidden_states=True, **kw).hidden_states[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, its save_pretrained folder), each built once for the module."""
    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(name: str):
        if name not in cache:
            model = build(name)
            model.save_pretrained(root / name)
            cache[name] = model, root / name
        return cache[name]

    return get


def normalised(u8: np.ndarray, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, (pixels / 255 - mean) / std."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- z0 = hidden_states[0]


@pytest.mark.parametrize("size", slow_but(SIZES, (32, 48)), ids=lambda s: f"{s[0]}x{s[1]}")  # the inner loop: a rectangle
@pytest.mark.parametrize("name", FAMILIES)
def test_first_hidden_state_of_each_class(name, size, saved):
    """The reference layer, the numpy engine and the torch engine, all from the save_pretrained folder."""
    model, folder = saved(name)
    loaded = load_weights(folder)
    source, prefix = FAMILIES[name][2:]
    assert loaded.source == source
    h, w = size
    layer = resize_weights(loaded, size)  # the default: E_pos resampled as the class itself does
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    expected = hidden0(model, x)
    assert expected.shape == (2, prefix + (h // P) * (w // P), D)
    with torch.no_grad():
        torch.testing.assert_close(layer.build()(x), expected, atol=ATOL, rtol=RTOL)
    u8 = np.random.default_rng(h + w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = hidden0(model, normalised(u8, mean, std)).numpy()
    prep = Preprocess(image_size=h, image_width=w, mean=mean, std=std)
    for engine in ("numpy", "torch"):
        z0 = Encoder(layer, prep, engine=engine, device="cpu").encode(u8)
        np.testing.assert_allclose(z0, expected, atol=ATOL, rtol=RTOL, err_msg=engine)


@pytest.mark.parametrize("name", slow_but(["DeiTModel", "BeitModel+abs", "Dinov2WithRegistersModel", "DINOv3ViTModel",
                                           "CLIPModel", "SiglipVisionModel"],
                                          "Dinov2WithRegistersModel", "CLIPModel", "SiglipVisionModel"))
def test_encode_from_the_folder(name, saved, tmp_path):
    """End to end: `vitembed encode img -o z.npy --weights FOLDER --workers 0` at a rectangular size."""
    model, folder = saved(name)
    image = make_image(tmp_path / "x.png", size=(48, 32), seed=11)  # W x H: already 32 x 48, no pixel resampling
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0", "--image-size", "32x48",
                "--normalize", "none")
    assert r.returncode == 0, r.stderr.decode()
    torch.testing.assert_close(torch.from_numpy(np.load(out)), hidden0(model, pixels(image))[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", slow_but(["DINOv3ViTModel", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"],
                                          "DINOv3ViTModel"))
def test_native_grid_from_the_folder(name, saved, tmp_path):
    """--resize native: each image at its own grid (here 4 x 8 patches for an 80 x 40 image, at most
    32), E_pos resampled to it as the class does = the model on those pixels."""
    model, folder = saved(name)
    image = make_image(tmp_path / "wide.png", size=(80, 40), seed=17)
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0", "--resize", "native",
                "--max-patches", "32", "--normalize", "none")
    assert r.returncode == 0, r.stderr.decode()
    u8 = load_image(image, Preprocess(resize="native", max_patches=32, patch_size=P))
    assert u8.shape == (32, 64, 3)
    expected = hidden0(model, normalised(u8[None], (0.0,) * 3, (1.0,) * 3))[0]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", slow_but(["CLIPVisionModel", "Dinov2WithRegistersModel"], "CLIPVisionModel"))
def test_native_grid_through_the_python_api(name, saved, tmp_path):
    """Encoder(load_weights(folder), Preprocess(resize="native", ...)) resamples E_pos as the class does
    by default, as the CLI does (CLIP: bicubic; Dinov2WithRegisters: antialiased), not always timm's way."""
    model, folder = saved(name)
    u8 = np.random.default_rng(8).integers(0, 256, (1, 24, 56, 3), dtype=np.uint8)  # a 3 x 7 grid
    prep = Preprocess(resize="native", max_patches=21, patch_size=P, mean=(0.0,) * 3, std=(1.0,) * 3)
    expected = hidden0(model, normalised(u8, (0.0,) * 3, (1.0,) * 3))[0].numpy()
    for engine in ("numpy", "torch"):
        (z0,) = Encoder(load_weights(folder), prep, engine=engine, device="cpu").encode([u8[0]])
        np.testing.assert_allclose(z0, expected, atol=ATOL, rtol=RTOL, err_msg=engine)


def test_clip_tokens_before_its_pre_norm(saved, tmp_path):
    """--tokens z0-before-norm = CLIP's embeddings(x), before pre_layrnorm; z0 is after it."""
    model, folder = saved("CLIPVisionModel")
    image = make_image(tmp_path / "x.png", size=(32, 32), seed=12)
    x = pixels(image)
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0", "--normalize", "none",
                "--tokens", "z0-before-norm")
    assert r.returncode == 0, r.stderr.decode()
    tower = getattr(model, "vision_model", model)  # transformers 5 keeps the tower's modules on the model itself
    with torch.no_grad():
        before = tower.embeddings(x)[0]
        torch.testing.assert_close(torch.from_numpy(np.load(out)), before, atol=ATOL, rtol=RTOL)
        assert (tower.pre_layrnorm(before) - before).abs().max() > 0.1  # the norm is no no-op


def test_mae_masking_takes_patches_plus_positions(saved):
    """ViTMAE masks x_p E + E_pos's patch rows (--tokens patches+pos): with mask_ratio 0.75, the kept
    rows of vitembed's patches+pos, in the model's order, and the class row of z0 = hidden_states[0]."""
    model = build("ViTMAEModel")
    model.config.mask_ratio = 0.75
    layer = load_weights(saved("ViTMAEModel")[1])
    u8 = np.random.default_rng(5).integers(0, 256, (2, TRAINED, TRAINED, 3), dtype=np.uint8)
    x = normalised(u8, (0.5,) * 3, (0.5,) * 3)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        masked = model(pixel_values=x, noise=noise, output_hidden_states=True).hidden_states[0]  # (2, 1 + 4, D)
    prep = Preprocess(image_size=TRAINED, mean=(0.5,) * 3, std=(0.5,) * 3)
    patches = Encoder(layer, prep, engine="numpy", tokens="patches+pos").encode(u8)  # (2, 16, D)
    kept = torch.argsort(noise, dim=1)[:, :4].numpy()
    np.testing.assert_allclose(np.take_along_axis(patches, kept[:, :, None], 1), masked[:, 1:].numpy(),
                               atol=ATOL, rtol=RTOL)
    z0 = Encoder(layer, prep, engine="numpy").encode(u8)
    np.testing.assert_allclose(z0[:, 0], masked[:, 0].numpy(), atol=ATOL, rtol=RTOL)


def test_beit_state_dict_as_transformers_holds_it(saved, tmp_path):
    """A BeitModel's own state_dict() (torch.save, not save_pretrained) names its relative position
    bias as the modules do (layers.0.relative_position_bias, shared_position_bias): still a BEiT."""
    for name in ("BeitModel", "BeitModel+abs"):
        model, _ = saved(name)
        torch.save(model.state_dict(), tmp_path / f"{name}.pth")
        loaded = load_weights(tmp_path / f"{name}.pth")
        assert loaded.source == "transformers BeitModel" and loaded.config.attn_positions == "relative"
        x = torch.randn(1, 3, *loaded.config.size, generator=torch.Generator().manual_seed(1))  # no table: 224
        with torch.no_grad():
            torch.testing.assert_close(loaded.build()(x), hidden0(model, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", slow_but(["BeitModel", "DINOv3ViTModel"], "DINOv3ViTModel"))
def test_folder_without_a_table_is_read_at_its_config_size(name, saved, tmp_path):
    """No position table to give the size (relative bias, RoPE): config.json's image_size is the default."""
    model, folder = saved(name)
    assert load_weights(folder).config.size == (TRAINED, TRAINED)
    image = make_image(tmp_path / "x.png", size=(TRAINED, TRAINED), seed=13)
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0", "--normalize", "none")
    assert r.returncode == 0, r.stderr.decode()
    torch.testing.assert_close(torch.from_numpy(np.load(out)), hidden0(model, pixels(image))[0], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- a folder's processor


@pytest.fixture(scope="module")
def dinov2_518(tmp_path_factory):
    """An HF Dinov2 folder as facebook/dinov2-* ship it: a 518-pixel table (37 x 37 patches of 14) and
    a processor that resizes the shorter side to 256 and crops 224 (bicubic, ImageNet mean and std)."""
    from transformers import BitImageProcessor

    folder = tmp_path_factory.mktemp("dinov2") / "dinov2"
    model = build("Dinov2Model", image_size=518, patch_size=14)
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return model, folder


def test_dinov2_folder_defaults_to_its_processors_crop(dinov2_518, tmp_path):
    """By default the layer is at the 224 crop (257 rows, not 1370), its table resampled from 37 x 37 as
    Dinov2Model.interpolate_pos_encoding does: equal to the model's hidden_states[0] on 224 x 224 input."""
    from vitembed.pipeline.request import LayerOptions

    model, folder = dinov2_518
    layer, _, notes, prep = LayerOptions(weights=str(folder)).load()
    assert layer.config.size == (224, 224) and layer.config.num_tokens == 257
    assert any("from 37x37 to 16x16 patches" in n and "Dinov2Model.interpolate_pos_encoding" in n for n in notes)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(layer.build()(x), hidden0(model, x), atol=ATOL, rtol=RTOL)

    image = make_image(tmp_path / "photo.png", size=(300, 260), seed=14)
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0")  # no option: the processor's
    assert r.returncode == 0, r.stderr.decode()
    u8 = Encoder(layer, Preprocess(**{**prep, "image_size": 224})).decode(image)  # shorter side 256, centre 224
    expected = hidden0(model, normalised(u8[None], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))[0]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, atol=ATOL, rtol=RTOL)
    info = json.loads(run_cli("info", "--weights", folder, "--json").stdout)
    assert (info["tokens"], info["grid"], info["pos_resample"]) == ([257, D], [16, 16], "hf")
    assert info["preprocess"]["resize"] == "crop" and info["preprocess"]["interpolation"] == "bicubic"
    assert int(224 / info["preprocess"]["crop_pct"]) == 256


def processor_folder(tmp_path: Path, name: str, processor: dict) -> Path:
    """A saved model's folder with `processor` as its preprocessor_config.json."""
    folder = tmp_path / name
    build(name).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def info_json(weights) -> dict:
    r = run_cli("info", "--weights", weights, "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_clip_and_siglip_processors_are_the_default_preprocessing(tmp_path):
    """CLIP's processor (shorter side, centre crop, bicubic, CLIP's mean and std) and SigLIP's (squash to
    height x width, 0.5 / 0.5, rescaled by 1 / 255) become info's preprocess, in vitembed's form."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    clip = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).to_dict()
    prep = info_json(processor_folder(tmp_path, "CLIPVisionModel", clip))["preprocess"]
    assert (prep["image_size"], prep["resize"], prep["interpolation"]) == (32, "crop", "bicubic")
    assert int(32 / prep["crop_pct"]) == 36
    assert prep["mean"] == pytest.approx(CLIP_MEAN, abs=1e-9) and prep["std"] == pytest.approx(CLIP_STD, abs=1e-9)

    siglip = SiglipImageProcessor(size={"height": 32, "width": 32}).to_dict()
    prep = info_json(processor_folder(tmp_path, "SiglipVisionModel", siglip))["preprocess"]
    assert (prep["image_size"], prep["resize"], prep["interpolation"]) == (32, "squash", "bicubic")
    assert prep["mean"] == pytest.approx([0.5] * 3, abs=1e-9) and prep["std"] == pytest.approx([0.5] * 3, abs=1e-9)


PROCESSORS = [
    ("CLIPImageProcessor", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
    ("BitImageProcessor", dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})),
    ("SiglipImageProcessor", dict(size={"height": 224, "width": 224})),
    ("DeiTImageProcessor", dict(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224})),
    ("BeitImageProcessor", dict(size={"height": 240, "width": 240}, crop_size={"height": 224, "width": 224},
                                do_center_crop=True)),
]


@pytest.mark.parametrize("processor,kwargs", slow_but(PROCESSORS, PROCESSORS[0], PROCESSORS[4], several=True))
def test_processor_pixels_are_vitembeds(processor, kwargs, sample_paths):
    """What the processor feeds the model = what vitembed decodes with the preprocessing read from its
    config, normalised: within two levels of 255 at a pixel, a twentieth of one on average (torch's
    resize and Pillow's round differently)."""
    import transformers
    from PIL import Image

    from vitembed.weights.checkpoints import hf_input_size, hf_preprocess

    proc = getattr(transformers, processor)(**kwargs)
    config = proc.to_dict()
    h, w = hf_input_size(config)
    prep = Preprocess(**{**hf_preprocess(config), "image_size": h, "image_width": w})
    for path in sample_paths[:3]:
        theirs = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        ours = normalised(load_image(path, prep)[None], prep.mean, prep.std)
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        level = 1.01 / 255 / min(prep.std)
        assert (ours - theirs).abs().max() <= 2 * level and (ours - theirs).abs().mean() < level / 20, path


PLAIN_SIZES = [
    ({"size": 256, "crop_size": 224, "feature_extractor_type": "DeiTFeatureExtractor"}, "squash-crop"),
    ({"size": 256, "crop_size": 224, "image_processor_type": "BeitImageProcessorFast"}, "squash-crop"),
    ({"size": 256, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}, "crop"),
    ({"size": 256, "crop_size": 224, "image_processor_type": "BitImageProcessor"}, "crop"),
]


@pytest.mark.parametrize("config,resize", slow_but(PLAIN_SIZES, PLAIN_SIZES[0], PLAIN_SIZES[2], several=True))
def test_processor_plain_size_read_as_its_class_reads_it(config, resize, tmp_path):
    """A plain number as `size` (as older configs on the Hub have it) is the height and width for
    ViT, DeiT and BEiT processors (squashed to 256 x 256, then the centre 224), the shorter side for
    CLIP's and Bit's (DINOv2's); info says which."""
    folder = processor_folder(tmp_path, "DeiTModel", {**config, "do_center_crop": True})
    prep = info_json(folder)["preprocess"]
    assert (prep["resize"], int(224 / prep["crop_pct"]), prep["image_size"]) == (resize, 256, 224)
    expected = "squash-crop (squashed to 256x256, centre 224x224)" if resize == "squash-crop" else \
        "crop (shorter side to 256, centre 224)"
    assert f"preprocess    {expected}" in info_text(folder)


@pytest.mark.parametrize("rescale,mean,std", [
    ({"do_rescale": False}, 0.5 / 255, 0.25 / 255),  # the model sees 0..255: (x - 0.5) / 0.25 = (x / 255 - 0.5 / 255) / (0.25 / 255)
    ({"rescale_factor": 1 / 127.5}, 0.25, 0.125),  # the model sees 0..2: (2u - 0.5) / 0.25 = (u - 0.25) / 0.125
], ids=["no-rescale", "rescale-by-1/127.5"])
def test_processor_rescale_in_vitembeds_form(rescale, mean, std, tmp_path):
    """Another rescale (none, or not 1 / 255) gives the mean and std of pixels / 255 that do the same,
    and the tokens equal the model's on the pixels as the processor's arithmetic makes them."""
    siglip = {**siglip_processor(), "image_mean": [0.5] * 3, "image_std": [0.25] * 3, **rescale}
    folder = processor_folder(tmp_path, "SiglipVisionModel", siglip)
    prep = info_json(folder)["preprocess"]
    assert prep["mean"] == pytest.approx([mean] * 3, rel=1e-9) and prep["std"] == pytest.approx([std] * 3, rel=1e-9)

    image = make_image(tmp_path / "x.png", size=(TRAINED, TRAINED), seed=15)
    out = tmp_path / "z.npy"
    r = run_cli("encode", image, "-o", out, "--weights", folder, "--workers", "0")
    assert r.returncode == 0, r.stderr.decode()
    raw = pixels(image) * 255.0  # 0..255, as the processor has them before rescaling
    factor = 1.0 if rescale.get("do_rescale") is False else rescale["rescale_factor"]
    model = build("SiglipVisionModel")
    torch.testing.assert_close(torch.from_numpy(np.load(out)), hidden0(model, (raw * factor - 0.5) / 0.25)[0],
                               atol=ATOL, rtol=RTOL)


def siglip_processor() -> dict:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": TRAINED, "width": TRAINED}).to_dict()


# --------------------------------------------------------------------------- named weights, offline


NAMED = {  # repo: (family, trained size, its processor, expected tokens, resize, mean)
    "openai/clip-vit-base-patch16": ("CLIPModel", TRAINED, "CLIPImageProcessor", [17, D], "crop", CLIP_MEAN),
    "google/siglip-base-patch16-224": ("SiglipModel", TRAINED, "SiglipImageProcessor", [16, D], "squash", (0.5,) * 3),
    "facebook/dinov2-small": ("Dinov2Model", 64, "BitImageProcessor", [17, D], "crop", (0.485, 0.456, 0.406)),
    "facebook/dinov2-with-registers-small": ("Dinov2WithRegistersModel", 64, "BitImageProcessor", [19, D], "crop",
                                             (0.485, 0.456, 0.406)),
}


@pytest.mark.slow
@pytest.mark.parametrize("repo", NAMED)
def test_named_hf_weights_from_the_cache(repo, tmp_path):
    """hf:ORG/REPO for the common checkpoints, from a Hugging Face cache laid out here (tiny random
    models in the repos' own files), offline: the family, the token shape and the processor's preprocessing."""
    import transformers

    name, size, processor_name, tokens, resize, mean = NAMED[repo]
    model = build(name, image_size=size)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    crop = dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True)
    kwargs = {"SiglipImageProcessor": dict(size={"height": 32, "width": 32}),
              "BitImageProcessor": dict(**crop, image_mean=list(mean), image_std=[0.229, 0.224, 0.225])}
    getattr(transformers, processor_name)(**kwargs.get(processor_name, crop)).save_pretrained(folder)
    cache = tmp_path / "hf"
    fill_hf_cache(cache, repo, {n: folder / n for n in ("config.json", "model.safetensors", "preprocessor_config.json")})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("info", "--weights", f"hf:{repo}", "--json", env=env)
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["source"].startswith(f"hf {repo} (transformers {FAMILIES[name][2].split()[1]}"), info["source"]
    assert info["tokens"] == tokens and info["image_size"] == 32
    assert info["preprocess"]["resize"] == resize and info["preprocess"]["interpolation"] == "bicubic"
    assert info["preprocess"]["mean"] == pytest.approx(mean, abs=1e-9)
    prefix = {"CLIPModel": ["class"], "SiglipModel": [], "Dinov2Model": ["class"],
              "Dinov2WithRegistersModel": ["class", "register", "register"]}[name]
    assert info["steps"]["prefix_tokens"] == prefix
    assert info["steps"]["pre_norm"] == ("LayerNorm (eps 0.1)" if name == "CLIPModel" else None)
    if name == "CLIPModel":  # and the tokens, end to end
        image = make_image(tmp_path / "x.png", size=(TRAINED, TRAINED), seed=16)
        out = tmp_path / "z.npy"
        r = run_cli("encode", image, "-o", out, "--weights", f"hf:{repo}", "--workers", "0", "--resize", "squash",
                    env=env)
        assert r.returncode == 0, r.stderr.decode()
        expected = hidden0(model, pixels(image, CLIP_MEAN, CLIP_STD))[0]
        torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- info, and what is refused


def info_text(weights, *extra: str) -> str:
    r = run_cli("info", "--weights", weights, *extra)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_info_names_each_family_and_its_steps(saved):
    out = info_text(saved("CLIPVisionModel")[1], "--image-size", "48")
    for s in ("source        transformers CLIPVisionModel", "conv bias     no", "pre-norm      LayerNorm (eps 0.1)",
              "resampled     bicubic, not antialiased, as transformers' CLIPVisionModel.interpolate_pos_encoding"):
        assert s in out, out
    out = info_text(saved("CLIPModel")[1])
    assert "transformers CLIPVisionModel (under 'vision_model')" in out and "conv bias     no" in out, out
    out = info_text(saved("DINOv3ViTModel")[1])
    for s in ("source        transformers DINOv3ViTModel", "rows 1..2: register tokens",
              "positions     no table: rotary (RoPE) positions, applied inside attention", "pre-norm      none"):
        assert s in out, out
    assert "resampled" not in out, out
    out = info_text(saved("BeitModel")[1])
    assert "positions     no table: relative position bias positions, applied inside attention" in out, out
    out = info_text(saved("BeitModel+abs")[1])
    assert "table E_pos of 17 rows (prefix tokens and patches), and relative position bias inside attention" in out
    out = info_text(saved("DeiTModel")[1])
    assert "row 0: class token, row 1: distillation token, rows 2..17: patches" in out, out
    assert "register" not in out, out
    out = info_text(saved("SiglipVisionModel")[1])
    assert "source        transformers SiglipVisionModel" in out and "rows 0..15: patches" in out, out


def test_dinov3_refuses_tokens_that_need_a_table(saved, tmp_path):
    image = make_image(tmp_path / "x.png", size=(TRAINED, TRAINED))
    r = run_cli("encode", image, "-o", tmp_path / "z.npy", "--weights", saved("DINOv3ViTModel")[1], "--workers", "0",
                "--tokens", "patches+pos")
    assert_clean_error(r, "--tokens patches+pos needs a position table", "applied inside attention", code=2)
    assert not (tmp_path / "z.npy").exists()


def test_siglip2_naflex_is_refused_with_its_reason(tmp_path):
    """A Siglip2VisionModel (NaFlex: a Linear patch embedding, its table resampled per image) is refused
    in one line naming NaFlex, from its folder and from its bare state dict."""
    import transformers

    config = transformers.Siglip2VisionConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=2 * D, patch_size=P, num_patches=16)
    model = randomize(transformers.Siglip2VisionModel(config))
    model.save_pretrained(tmp_path / "siglip2")
    torch.save(model.state_dict(), tmp_path / "siglip2.pth")
    for weights in (tmp_path / "siglip2", tmp_path / "siglip2.pth"):
        assert_clean_error(run_cli("info", "--weights", weights), str(weights), "SigLIP2 NaFlex", "Linear layer")


def test_show_names_the_distillation_token_and_refuses_positions_without_a_table(saved, tmp_path):
    """show patches on a DeiT names its distillation token; show positions on DINOv3 (no table) is
    one line, exit 2, nothing written."""
    image = make_image(tmp_path / "x.png", size=(TRAINED, TRAINED))
    r = run_cli("show", "patches", image, "--weights", saved("DeiTModel")[1], "-o", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr.decode()
    assert "token 1: distillation token (no patch)" in token_layout(load_weights(saved("DeiTModel")[1]).config)
    r = run_cli("show", "positions", "--weights", saved("DINOv3ViTModel")[1], "-o", tmp_path / "pos.png")
    assert_clean_error(r, "show positions draws the position table", "rotary (RoPE) positions", code=2)
    assert not (tmp_path / "pos.png").exists()
