"""--weights with other libraries' checkpoints: the same tokens as timm, torchvision, transformers and the seed.

Each test builds the library's own model with random weights (small: 32 x 32 images, P = 8, D = 48),
saves it, encodes an image through the CLI and compares with the library's own input layer on the
same pixels. The images are already 32 x 32, so no resampling of pixels is involved.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_image, run_cli, slow_but
from tests.seed_reference import SeedVitInputLayer
from vitembed.weights.checkpoints import resample_pos_embed
from vitembed.errors import WeightsError
from vitembed.weights.load import load_weights

ATOL = RTOL = 1e-5
SMALL = dict(image_size=32, patch_size=8, dim=48)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("img") / "x.png", size=(32, 32), seed=3)


def pixels(path: Path, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """(1, 3, S, S) float32: pixels / 255, normalised, straight from Pillow."""
    a = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (a / 255.0 - m) / s


def encode(weights, image: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> tuple[torch.Tensor, str]:
    out = tmp_path / "z0.npy"
    r = run_cli("encode", image, "-o", out, "--weights", weights, "--workers", "0", *extra, env=env)
    assert r.returncode == 0, r.stderr.decode()
    return torch.from_numpy(np.load(out)), r.stderr.decode()


def assert_clean_error(r, *substrings: str, code: int = 1) -> None:
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for s in substrings:
        assert s in err, err


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# --------------------------------------------------------------------------- timm


def timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    m = VisionTransformer(**{**args, **kw}).eval()
    with torch.no_grad():  # timm starts some of these at zero; random values catch swapped rows
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(m, name, None) is not None:
                getattr(m, name).normal_()
    return m


TIMM_VARIANTS = {
    "plain": {},
    "no_embed_class+reg": dict(no_embed_class=True, reg_tokens=2),
    "reg": dict(reg_tokens=4),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "no_bias": {},  # CLIP-style models: a patch embedding without bias (set below)
}


@pytest.mark.parametrize("variant,suffix", slow_but([(v, s) for v in TIMM_VARIANTS for s in (".pth", ".safetensors")
                                                     if v in ("plain", "no_embed_class+reg") or s == ".pth"],
                                                    ("plain", ".safetensors"), ("no_embed_class+reg", ".pth"),
                                                    ("no_bias", ".pth"), several=True))
def test_timm_tokens(variant, suffix, image, tmp_path):
    m = timm_vit(**TIMM_VARIANTS[variant])
    if variant == "no_bias":
        m.patch_embed.proj.bias = None
    ckpt = save(m.state_dict(), tmp_path / f"timm{suffix}")
    z0, _ = encode(ckpt, image, tmp_path, "--normalize", "none")
    with torch.no_grad():
        expected = m._pos_embed(m.patch_embed(pixels(image)))[0]
    torch.testing.assert_close(z0, expected, atol=ATOL, rtol=RTOL)


def test_timm_resampled_to_another_image_size(tmp_path):
    """--image-size 48 on a 32-pixel checkpoint = timm's dynamic_img_size model on 48 x 48 pixels."""
    m = timm_vit(reg_tokens=1, dynamic_img_size=True)
    ckpt = save(m.state_dict(), tmp_path / "timm.safetensors")
    big = make_image(tmp_path / "big.png", size=(48, 48), seed=5)
    z0, err = encode(ckpt, big, tmp_path, "--normalize", "none", "--image-size", "48")
    assert "resampled the position embedding from 4x4 to 6x6" in err
    with torch.no_grad():
        expected = m._pos_embed(m.patch_embed(pixels(big)))[0]  # timm resamples with resample_abs_pos_embed
    assert z0.shape == (1 + 1 + 36, 48)
    torch.testing.assert_close(z0, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("old,new", [(4, 6), (14, 24), (7, 3)])
def test_resample_matches_timm(prefix, old, new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, prefix + old * old, 32, generator=torch.Generator().manual_seed(old * new + prefix))
    ours = resample_pos_embed(pos, new, old, prefix)
    theirs = resample_abs_pos_embed(pos, [new, new], [old, old], num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new * new, 32)
    # ours is computed in float64 (timm's in float32): equal up to float32 rounding
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, :prefix], pos[:, :prefix], atol=0, rtol=0)


def test_sizes_that_do_not_fit_the_patch_size(tmp_path, image):
    ckpt = save(timm_vit().state_dict(), tmp_path / "timm.pth")
    r = run_cli("encode", image, "-o", tmp_path / "z.npy", "--weights", ckpt, "--patch-size", "12")
    assert_clean_error(r, "image size (32) is not divisible by patch size (12)", "--image-size 24 or 36", code=2)
    r = run_cli("encode", image, "-o", tmp_path / "z.npy", "--weights", ckpt, "--image-size", "36")
    assert_clean_error(r, "--image-size 32 or 40", code=2)
    r = run_cli("encode", image, "-o", tmp_path / "z.npy", "--weights", ckpt, "--emb-dim", "40")
    assert_clean_error(r, "--emb-dim 40 (the weights have 48)", code=2)


# --------------------------------------------------------------------------- torchvision


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=48, mlp_dim=96).eval()
    with torch.no_grad():
        m.class_token.normal_()  # torchvision starts it at zero
    return m


def torchvision_z0(m, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = m._process_input(x)  # (B, N, D)
        z = torch.cat([m.class_token.expand(z.shape[0], -1, -1), z], dim=1)
        return (z + m.encoder.pos_embedding)[0]


@pytest.mark.parametrize("wrap", ["bare", "ddp+model"])
def test_torchvision_tokens(wrap, image, tmp_path):
    m = torchvision_vit()
    state = m.state_dict()
    if wrap != "bare":  # a training checkpoint: {"model": {"module.conv_proj.weight": ...}, "epoch": 3}
        state = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    ckpt = save(state, tmp_path / "tv.pth")
    z0, _ = encode(ckpt, image, tmp_path, "--normalize", "imagenet")
    expected = torchvision_z0(m, pixels(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    torch.testing.assert_close(z0, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_torchvision_named_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """torchvision:vit_b_16 reads $TORCH_HOME/hub/checkpoints/vit_b_16-c867db91.pth, as torchvision would."""
    from torchvision.models import ViT_B_16_Weights

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    state = {  # the input layer of a ViT-B/16 (the rest of the model is not needed)
        "class_token": torch.randn(1, 1, 768, generator=g),
        "conv_proj.weight": torch.randn(768, 3, 16, 16, generator=g),
        "conv_proj.bias": torch.randn(768, generator=g),
        "encoder.pos_embedding": torch.randn(1, 197, 768, generator=g),
    }
    torch.save(state, cache / os.path.basename(ViT_B_16_Weights.IMAGENET1K_V1.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loaded = load_weights("torchvision:vit_b_16")
    assert "IMAGENET1K_V1" in loaded.source
    assert (loaded.config.patch_size, loaded.config.emb_dim, loaded.config.image_size) == (16, 768, 224)
    torch.testing.assert_close(loaded.state_dict["pos_emb"], state["encoder.pos_embedding"])
    assert loaded.preprocess == {"resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
                                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    r = run_cli("info", "--weights", "torchvision:vit_b_16.IMAGENET1K_V1", "--json",
                env={"TORCH_HOME": str(tmp_path / "torch")})
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["patch_size"] == 16 and info["tokens"] == [197, 768]
    assert info["preprocess"]["resize"] == "crop" and info["preprocess"]["interpolation"] == "bilinear"


@pytest.mark.slow
def test_named_weights_without_network_is_one_line(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "empty"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    r = run_cli("info", "--weights", "torchvision:vit_b_32", env=env)
    assert_clean_error(r, "torchvision:vit_b_32: cannot download")
    r = run_cli("info", "--weights", "hf:acme/no-such-vit", env=env)
    assert_clean_error(r, "hf:acme/no-such-vit")
    r = run_cli("info", "--weights", "torchvision:vit_b_16.NOPE", env=env)
    assert_clean_error(r, "IMAGENET1K_V1")


# --------------------------------------------------------------------------- transformers


def hf_vit(cls_name: str = "ViTForImageClassification"):
    import transformers

    torch.manual_seed(2)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=96, num_labels=3)
    return getattr(transformers, cls_name)(config).eval()


def hf_z0(m, x):
    embeddings = m.vit.embeddings if hasattr(m, "vit") else m.embeddings
    with torch.no_grad():
        return embeddings(x)[0]


@pytest.mark.parametrize("how", ["ViTModel.bin", "ViTForImageClassification.safetensors"])
def test_transformers_state_dict(how, image, tmp_path):
    cls_name, suffix = how.split(".")
    m = hf_vit(cls_name)
    ckpt = save(m.state_dict(), tmp_path / f"model.{suffix}")
    z0, _ = encode(ckpt, image, tmp_path, "--normalize", "inception")
    torch.testing.assert_close(z0, hf_z0(m, pixels(image, (0.5,) * 3, (0.5,) * 3)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shard", [False, True])
def test_transformers_save_pretrained_folder_with_its_processor(shard, image, tmp_path):
    """A save_pretrained folder (sharded or not): tokens equal, and the image processor is the default."""
    from transformers import ViTImageProcessor

    m = hf_vit()
    folder = tmp_path / "vit"
    m.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    assert (folder / "model.safetensors.index.json").exists() == shard
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7])
    processor.save_pretrained(folder)
    z0, _ = encode(folder, image, tmp_path)  # no --normalize: the processor's mean and std
    x = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(z0, hf_z0(m, x), atol=ATOL, rtol=RTOL)


def fill_hf_cache(cache: Path, repo: str, files: dict[str, Path | bytes]) -> None:
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, content in files.items():
        (snap / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())


@pytest.mark.slow
def test_hf_repo_name_from_the_hub_cache(image, tmp_path):
    from transformers import ViTImageProcessor

    m = hf_vit()
    folder = tmp_path / "saved"
    m.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    cache = tmp_path / "hf"
    fill_hf_cache(cache, "acme/tiny-vit", {n: folder / n for n in
                                            ("config.json", "model.safetensors", "preprocessor_config.json")})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    z0, _ = encode("hf:acme/tiny-vit", image, tmp_path, env=env)  # the processor's mean and std: 0.5
    torch.testing.assert_close(z0, hf_z0(m, pixels(image, (0.5,) * 3, (0.5,) * 3)), atol=ATOL, rtol=RTOL)
    z0, _ = encode("hf:acme/tiny-vit", image, tmp_path, "--normalize", "none", env=env)  # the user's choice wins
    torch.testing.assert_close(z0, hf_z0(m, pixels(image)), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_timm_name_from_the_hub_cache(tmp_path):
    """timm:MODEL.TAG fetches timm's hub file through the HF cache; preprocessing comes from timm's cfg."""
    m = timm_vit()
    ckpt = save(m.state_dict(), tmp_path / "model.safetensors")
    cache = tmp_path / "hf"
    fill_hf_cache(cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", {"model.safetensors": ckpt})
    r = run_cli("info", "--weights", "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--json",
                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["source"].startswith("timm vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert info["preprocess"] == {"image_size": 32, "resize": "crop", "crop_pct": 0.9, "interpolation": "bicubic",
                                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


# --------------------------------------------------------------------------- the seed's class


@pytest.mark.parametrize("prefix", ["", "input_layer."])
def test_seed_class(prefix, image, tmp_path):
    torch.manual_seed(4)
    seed = SeedVitInputLayer(emb_dim=48, num_patch_row=4, image_size=32).eval()
    state = {prefix + k: v for k, v in seed.state_dict().items()}
    if prefix:  # inside a whole model
        state["encoder.0.weight"] = torch.randn(48, 48)
    ckpt = save(state, tmp_path / "seed.pt")
    z0, _ = encode(ckpt, image, tmp_path, "--normalize", "none")
    with torch.no_grad():
        torch.testing.assert_close(z0, seed(pixels(image))[0], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- info and errors


def test_info_shows_what_was_detected(tmp_path):
    ckpt = save(timm_vit(reg_tokens=4).state_dict(), tmp_path / "timm.safetensors")
    r = run_cli("info", "--weights", ckpt)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    for s in ("timm VisionTransformer", "patch         8 x 8", "4 x 4 = 16 patches", "D = 48", "21 x 48",
              "rows 1..4: register tokens", "preprocess", "squash"):
        assert s in out, out
    r = run_cli("info", "--weights", ckpt, "--json")
    info = json.loads(r.stdout)
    assert (info["patch_size"], info["grid"], info["emb_dim"], info["num_reg_tokens"]) == (8, [4, 4], 48, 4)
    assert info["preprocess"]["resize"] == "squash"


def test_unrecognised_checkpoint_lists_what_was_looked_for(tmp_path):
    ckpt = save({"layer1.conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}, tmp_path / "resnet.pth")
    r = run_cli("info", "--weights", ckpt)
    assert_clean_error(r, "no ViT input layer recognised", "patch_embed.proj.weight", "conv_proj.weight",
                       "embeddings.patch_embeddings.projection.weight", "patch_emb_layer.weight", "layer1.conv.weight")


def test_corrupt_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    assert_clean_error(run_cli("info", "--weights", junk), "cannot read as a PyTorch checkpoint")
    good = save(timm_vit().state_dict(), tmp_path / "t.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    assert_clean_error(run_cli("info", "--weights", cut), "cannot read as safetensors")


def test_wrong_shaped_tensor(tmp_path):
    state = timm_vit().state_dict()
    state["pos_embed"] = torch.zeros(1, 17, 40)  # D = 40 against the conv's 48
    ckpt = save(state, tmp_path / "bad.pth")
    assert_clean_error(run_cli("info", "--weights", ckpt), "pos_embed has shape (1, 17, 40)", "(1, rows, 48)")
    state["pos_embed"] = torch.zeros(1, 20, 48)  # 19 or 20 rows: no square grid
    ckpt = save(state, tmp_path / "bad2.pth")
    assert_clean_error(run_cli("info", "--weights", ckpt), "pos_embed has shape (1, 20, 48)")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_code_running_pickle_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    payload = {"pos_embed": torch.zeros(1, 5, 4), "x": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    r = run_cli("encode", make_image(tmp_path / "i.png"), "-o", tmp_path / "z.npy", "--weights", evil)
    assert_clean_error(r, "refused: the file would import" if how == "torch.save" else "cannot read", "never runs code")
    assert not marker.exists()
    with pytest.raises(WeightsError, match="never runs code"):
        load_weights(evil)
    assert not marker.exists()


def test_distillation_tokens_follow_the_class_token():
    """timm's distilled DeiT and transformers' DeiT: [cls, dist, patches] + E_pos, through the Python API."""
    import transformers
    from timm.models.deit import VisionTransformerDistilled

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    m = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2).eval()
    with torch.no_grad():
        m.dist_token.normal_()
        loaded = load_weights_from(m.state_dict())
        torch.testing.assert_close(loaded.build()(x), m._pos_embed(m.patch_embed(x)), atol=ATOL, rtol=RTOL)
    config = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=96)
    h = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    with torch.no_grad():
        loaded = load_weights_from(h.state_dict())
        assert loaded.config.dist_token and loaded.config.num_reg_tokens == 0 and "transformers DeiT" in loaded.source
        assert [what for _, _, what in loaded.config.token_rows()] == ["class token", "distillation token", "patches"]
        torch.testing.assert_close(loaded.build()(x), h.deit.embeddings(x), atol=ATOL, rtol=RTOL)


def load_weights_from(state: dict):
    from vitembed.weights.checkpoints import convert_state_dict

    return convert_state_dict(state, "test")


def test_torchscript_archive_is_refused_with_what_to_do(tmp_path):
    """OpenAI's clip package ships TorchScript archives: refused in one line naming them and the way out."""
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 8, 4, 4)), str(path))
    r = run_cli("info", "--weights", path)
    assert_clean_error(r, "a TorchScript archive", "jit=False", "state_dict()")


def test_a_table_that_fits_two_grids_is_refused_not_guessed(tmp_path):
    """A no_embed_class table of 9 rows after 5 prefix tokens: 2 x 2 patches with prefix rows, or 3 x 3 without."""
    state = {"patch_embed.proj.weight": torch.randn(16, 3, 8, 8), "patch_embed.proj.bias": torch.randn(16),
             "cls_token": torch.randn(1, 1, 16), "reg_token": torch.randn(1, 4, 16), "pos_embed": torch.randn(1, 9, 16)}
    r = run_cli("info", "--weights", save(state, tmp_path / "tiny.safetensors"))
    assert_clean_error(r, "pos_embed has 9 rows, which fit 2 x 2 patches after 5 prefix rows and 3 x 3 patches "
                          "without them", "refused rather than guessed")
