"""Model families from timm, OpenAI CLIP / open_clip and the DINOv2 / DINOv3 repositories: the same
tokens as each library's own first-block input, or a refusal with its reason.

Each model is built by its own library (or, for layouts whose library is not installed, renamed
from one that is) with one block and every parameter drawn N(0, 1), so that a dropped or swapped
step shows in the numbers. It is saved as .safetensors and as a .pt state dict, loaded with
vitembed, and compared with the library's z0 at its trained size and at one other size, square and
rectangular, with the default position resampling: through the reference layer
(`LoadedWeights.build()`), the numpy engine and the torch engine, on the same uint8 pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_image, run_cli, slow_but
from tests.dinov2_reference import Dinov2Reference, Dinov3Reference
from tests.test_checkpoints import assert_clean_error, pixels, save
from vitembed.weights.checkpoints import resize_weights
from vitembed.encoder import Encoder
from vitembed.images.decode import Preprocess, load_image
from vitembed.weights.load import load_weights

ATOL = RTOL = 1e-4
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
SIZES = ((32, 32), (48, 48), (40, 56))  # the trained size, another square, a rectangle


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn N(0, 1) (timm and the repositories start some at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def uint8_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, h, w, 3), dtype=np.uint8)


def normalised(images: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W): pixels / 255, normalised as the libraries' transforms do."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def assert_engines_match(loaded, reference, sizes=SIZES) -> None:
    """At each size (the weights resized by default), the reference layer and both engines on uint8
    pixels equal `reference(x)` on the same pixels normalised."""
    for seed, (h, w) in enumerate(sizes):
        resized = resize_weights(loaded, (h, w))
        images = uint8_pixels(h, w, seed)
        with torch.no_grad():
            x = normalised(images)
            expected = reference(x)
            torch.testing.assert_close(resized.build()(x), expected, atol=ATOL, rtol=RTOL)
        prep = Preprocess(image_size=h, image_width=w, mean=CLIP_MEAN, std=CLIP_STD)
        for engine in ("numpy", "torch"):
            z = Encoder(resized, prep, engine=engine, device="cpu").encode(images)
            torch.testing.assert_close(torch.from_numpy(z), expected, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{engine} engine at {h}x{w}: {m}")


def saved_both_ways(state: dict, tmp_path: Path):
    """The state dict saved as .safetensors and as .pt, loaded by vitembed: the same layer both ways."""
    a = load_weights(save(state, tmp_path / "model.safetensors"))
    b = load_weights(save(state, tmp_path / "model.pt"))
    assert a.config == b.config and a.source == b.source
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], atol=0, rtol=0)
    return a


# --------------------------------------------------------------------------- timm


def timm_z0(m, x: torch.Tensor) -> torch.Tensor:
    """What timm's first block receives: norm_pre(patch_drop(_pos_embed(patch_embed(x))))."""
    out = m._pos_embed(m.patch_embed(x))
    if isinstance(out, tuple):  # Eva: (tokens, rope), patch dropout applied inside
        z = out[0]
    else:
        z = m.patch_drop(out)
    return m.norm_pre(z)


def beit_z0(m, x: torch.Tensor) -> torch.Tensor:
    """timm Beit's forward_features up to its blocks: cat(cls, patch_embed(x)) (+ pos_embed)."""
    z = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), m.patch_embed(x)], dim=1)
    return z if m.pos_embed is None else z + m.pos_embed


def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**TINY, "dynamic_img_size": True, **kw})


def _timm(name: str, **kw):
    import timm

    return timm.create_model(name, pretrained=False, **{**TINY, **kw})


def _distilled(**kw):
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**{**TINY, "dynamic_img_size": True, **kw})


def _eva(**kw):
    from timm.models.eva import Eva

    return Eva(**{**TINY, "dynamic_img_size": True, **kw})


# name: (builder, what `info` must say: prefix tokens, positions, pre-norm)
TIMM_FAMILIES = {
    "vit_no_class_token": (lambda: _vit(class_token=False, global_pool="avg"), [], "table", False),
    "vit_reg4": (lambda: _vit(reg_tokens=4), ["class"] + ["register"] * 4, "table", False),
    "vit_no_embed_class_reg": (lambda: _vit(no_embed_class=True, reg_tokens=2), ["class", "register", "register"],
                               "patches only", False),
    "vit_no_embed_class_no_prefix": (lambda: _vit(no_embed_class=True, class_token=False, global_pool="avg"),
                                     [], "table", False),
    "vit_pre_norm": (lambda: _vit(pre_norm=True, norm_layer=torch.nn.LayerNorm), ["class"], "table", True),
    "vit_clip": (lambda: _timm("vit_base_patch16_clip_224", dynamic_img_size=True), ["class"], "table", True),
    "vit_no_pos_embed": (lambda: _vit(pos_embed="none"), ["class"], "no table", False),
    "deit_distilled": (lambda: _distilled(), ["class", "distillation"], "table", False),
    "eva02": (lambda: _eva(use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True), ["class"],
              "table", False),  # its RoPE leaves no tensor in the state dict
    "vit_rope_no_table": (lambda: _eva(class_token=False, num_reg_tokens=1, use_abs_pos_emb=False, use_rot_pos_emb=True,
                                       global_pool="avg", ref_feat_shape=(4, 4)), ["register"], "no table: rotary (RoPE)",
                          False),
    "perception_encoder": (lambda: _timm("vit_pe_core_tiny_patch16_384", dynamic_img_size=True), ["class"], "table",
                           True),
    "dinov3": (lambda: _timm("vit_small_patch16_dinov3", dynamic_img_size=True), ["class"] + ["register"] * 4,
               "no table: rotary (RoPE)", False),
    "dinov2_reg4": (lambda: _timm("vit_small_patch14_reg4_dinov2", img_size=56, patch_size=14, dynamic_img_size=True),
                    ["class"] + ["register"] * 4, "patches only", False),
}


@pytest.mark.parametrize("family", list(TIMM_FAMILIES))
def test_timm_family_tokens(family, tmp_path):
    """timm's z0 at its trained size and resampled (timm's dynamic_img_size: resample_abs_pos_embed)."""
    torch.manual_seed(0)
    m = randomized(TIMM_FAMILIES[family][0]())
    loaded = saved_both_ways(m.state_dict(), tmp_path)
    p = loaded.config.patch_size
    sizes = [(h // 8 * p, w // 8 * p) for h, w in SIZES]  # the same grids for P = 14
    assert sizes[0] == loaded.config.size or not loaded.config.pos_table  # no table: 224 pixels' grid
    assert_engines_match(loaded, lambda x: timm_z0(m, x), sizes)


@pytest.mark.parametrize("family", slow_but(list(TIMM_FAMILIES), "vit_reg4", "deit_distilled", "dinov3"))
def test_timm_family_info(family, tmp_path):
    """`info` names the family and its steps: prefix tokens by kind, positions, pre-norm, conv bias."""
    _, prefix, positions, pre_norm = TIMM_FAMILIES[family]
    torch.manual_seed(0)
    m = TIMM_FAMILIES[family][0]()
    ckpt = save(m.state_dict(), tmp_path / "model.safetensors")
    r = run_cli("info", "--weights", ckpt, "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    # a Perception Encoder's input layer and attention keep a VisionTransformer's names: named as one
    source = {"eva02": "timm Eva", "vit_rope_no_table": "timm Eva", "dinov3": "timm Eva",
              "deit_distilled": "timm VisionTransformerDistilled (DeiT)"}.get(family, "timm VisionTransformer")
    assert info["source"] == source
    steps = info["steps"]
    assert steps["prefix_tokens"] == prefix
    assert positions in steps["positions"], steps
    assert (steps["pre_norm"] is not None) == pre_norm
    assert steps["conv_bias"] == (m.patch_embed.proj.bias is not None)


def test_timm_beit_relative_positions(tmp_path):
    """timm Beit: [class; patches], no table (a relative position bias inside attention); at another
    size, the model timm builds for it loaded through timm's own checkpoint filter."""
    from timm.models.beit import Beit, checkpoint_filter_fn

    args = dict(TINY, use_abs_pos_emb=False, use_rel_pos_bias=True)
    m = randomized(Beit(**args))
    loaded = saved_both_ways(m.state_dict(), tmp_path)
    assert loaded.config.steps()["positions"] == "no table: relative position bias positions, applied inside attention"
    assert loaded.source == "timm Beit"
    for h, w in SIZES:
        other = Beit(**{**args, "img_size": (h, w)}).eval()
        other.load_state_dict(checkpoint_filter_fn(m.state_dict(), other))
        assert_engines_match(loaded, lambda x: beit_z0(other, x), [(h, w)])


def test_timm_clip_end_to_end_through_the_cli(tmp_path):
    """A timm CLIP (norm_pre) checkpoint through `vitembed encode --workers 0` at a rectangular size:
    z0, and with --tokens z0-before-norm timm's tokens before its norm_pre."""
    torch.manual_seed(0)
    m = randomized(TIMM_FAMILIES["vit_clip"][0]())
    ckpt = save(m.state_dict(), tmp_path / "clip.safetensors")
    image = make_image(tmp_path / "x.png", size=(56, 40), seed=4)
    x = pixels(image, CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        before = m._pos_embed(m.patch_embed(x))
        cases = {"z0": m.norm_pre(before)[0], "z0-before-norm": before[0]}
    for tokens, expected in cases.items():
        out = tmp_path / f"{tokens}.npy"
        r = run_cli("encode", image, "-o", out, "--weights", ckpt, "--workers", "0", "--normalize", "clip",
                    "--image-size", "40x56", "--tokens", tokens)
        assert r.returncode == 0, r.stderr.decode()
        torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- OpenAI CLIP / open_clip


def hf_clip_vision():
    import transformers

    config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=96)
    return randomized(transformers.CLIPVisionModel(config), seed=3)


def openai_clip_state(hf) -> dict:
    """A whole OpenAI CLIP / open_clip state dict (visual tower, text tower, logit scale) whose
    visual input layer is the HF model's tensors renamed to OpenAI's names."""
    tower = getattr(hf, "vision_model", hf)  # transformers 5 keeps the tower's modules on the model itself
    e, d = tower.embeddings, 48
    g = torch.Generator().manual_seed(9)
    visual = {
        "conv1.weight": e.patch_embedding.weight, "class_embedding": e.class_embedding,
        "positional_embedding": e.position_embedding.weight, "ln_pre.weight": tower.pre_layrnorm.weight,
        "ln_pre.bias": tower.pre_layrnorm.bias,
        "transformer.resblocks.0.ln_1.weight": torch.randn(d, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * d, d, generator=g),
        "transformer.resblocks.0.attn.out_proj.weight": torch.randn(d, d, generator=g),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(4 * d, d, generator=g),
        "transformer.resblocks.0.mlp.c_proj.weight": torch.randn(d, 4 * d, generator=g),
        "ln_post.weight": torch.randn(d, generator=g), "proj": torch.randn(d, 16, generator=g),
    }
    text = {  # the text tower's own positional_embedding (context length 77) sits at the top level
        "positional_embedding": torch.randn(77, 32, generator=g), "token_embedding.weight": torch.randn(100, 32, generator=g),
        "transformer.resblocks.0.ln_1.weight": torch.randn(32, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32, generator=g),
        "ln_final.weight": torch.randn(32, generator=g), "text_projection": torch.randn(32, 16, generator=g),
        "logit_scale": torch.tensor(4.6),
    }
    return {**{f"visual.{k}": v.detach().clone() for k, v in visual.items()}, **text}


def openai_clip_z0(state: dict, x: torch.Tensor, prefix: str = "visual.") -> torch.Tensor:
    """ln_pre(cat(class, conv1(x)) + positional_embedding), the table resampled for another grid as
    open_clip's resize_pos_embed does (bicubic, antialiased)."""
    s = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    z = F.conv2d(x, s["conv1.weight"], stride=s["conv1.weight"].shape[-1])  # (B, D, gh, gw)
    (gh, gw), d = z.shape[-2:], z.shape[1]
    pos = s["positional_embedding"]  # (1 + M M, D)
    m = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, m, m, d).permute(0, 3, 1, 2)  # (1, D, M, M)
    if (gh, gw) != (m, m):
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
    pos = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])  # (1 + gh gw, D)
    z = torch.cat([s["class_embedding"].expand(x.shape[0], 1, d), z.flatten(2).transpose(1, 2)], dim=1) + pos
    return F.layer_norm(z, (d,), s["ln_pre.weight"], s["ln_pre.bias"], eps=1e-5)


@pytest.mark.parametrize("wrap", slow_but(["", "module.", "model."], "model."))
def test_openai_clip_layout(wrap, tmp_path):
    """OpenAI CLIP / open_clip keys (also under DDP's module. or a training script's model.): the
    tokens are ln_pre(cat(class, conv1(x)) + positional_embedding), and at the trained size the HF
    CLIP model's hidden_states[0] that the tensors came from."""
    hf = hf_clip_vision()
    state = {wrap + k: v for k, v in openai_clip_state(hf).items()}
    loaded = saved_both_ways(state, tmp_path)
    assert loaded.source == "OpenAI CLIP / open_clip VisionTransformer" + (f" (under {wrap + 'visual'!r})")
    assert loaded.config.steps()["pre_norm"] == "LayerNorm (eps 1e-05)" and not loaded.config.conv_bias
    x = normalised(uint8_pixels(32, 32))
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states[0]
        torch.testing.assert_close(openai_clip_z0(state, x, wrap + "visual."), hidden, atol=ATOL, rtol=RTOL)
    assert_engines_match(loaded, lambda x: openai_clip_z0(state, x, wrap + "visual."))


def test_llava_style_vision_tower(tmp_path):
    """A LLaVA-style checkpoint: HF CLIP vision keys under vision_tower.vision_model., beside a projector
    and a language model; the tokens are the tower's hidden_states[0] (at another size, with
    transformers' CLIP interpolate_pos_encoding)."""
    hf = hf_clip_vision()
    g = torch.Generator().manual_seed(1)
    tower = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    state = {f"model.vision_tower.vision_model.{k}": v for k, v in tower.items()}
    state.update({"model.multi_modal_projector.linear_1.weight": torch.randn(64, 48, generator=g),
                  "model.language_model.embed_tokens.weight": torch.randn(100, 64, generator=g),
                  "model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g)})
    loaded = saved_both_ways(state, tmp_path)
    assert loaded.source == "transformers CLIPVisionModel (under 'model.vision_tower.vision_model')"
    with torch.no_grad():
        assert_engines_match(loaded, lambda x: hf(pixel_values=x, output_hidden_states=True,
                                                  interpolate_pos_encoding=True).hidden_states[0])


# --------------------------------------------------------------------------- the DINOv2 and DINOv3 repositories


@pytest.mark.parametrize("registers", slow_but([0, 4], 4))
def test_dinov2_repository_layout(registers, tmp_path):
    """The official DINOv2 state dict (patch_embed.proj, cls_token, pos_embed with its class row,
    register_tokens inserted after E_pos, mask_token, blocks.0.ls1.gamma): its prepare_tokens_with_masks,
    and at other sizes its interpolate_pos_encoding (scale factor (grid + 0.1) / M, not antialiased)."""
    torch.manual_seed(0)
    m = randomized(Dinov2Reference(img_size=56, patch_size=14, embed_dim=48, num_register_tokens=registers))
    assert "blocks.0.ls1.gamma" in m.state_dict() and "mask_token" in m.state_dict()
    loaded = saved_both_ways(m.state_dict(), tmp_path)
    assert loaded.source == "DINOv2 (facebookresearch/dinov2)" and loaded.pos_resample == "dinov2"
    assert loaded.config.size == (56, 56) and loaded.config.num_reg_tokens == registers
    assert loaded.config.steps()["prefix_tokens"] == ["class"] + ["register"] * registers
    assert_engines_match(loaded, m, [(56, 56), (84, 84), (70, 98)])


@pytest.mark.parametrize("storage", slow_but([0, 4], 4))
def test_dinov3_repository_layout(storage, tmp_path):
    """The official DINOv3 state dict (storage_tokens, rope_embed.periods, no pos_embed): [cls; storage;
    patch_embed(x)] at any size, positions being RoPE inside attention."""
    torch.manual_seed(0)
    m = randomized(Dinov3Reference(patch_size=8, embed_dim=48, n_storage_tokens=storage))
    loaded = saved_both_ways(m.state_dict(), tmp_path)
    assert loaded.source == "DINOv3 (facebookresearch/dinov3)"
    steps = loaded.config.steps()
    assert steps["prefix_tokens"] == ["class"] + ["register"] * storage
    assert steps["positions"] == "no table: rotary (RoPE) positions, applied inside attention"
    assert loaded.config.size == (224, 224)  # no table, so no trained size: 224 pixels' grid
    assert_engines_match(loaded, m)


# --------------------------------------------------------------------------- refusals


def _hybrid() -> dict:
    import timm

    return timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, depth=1, img_size=32).state_dict()


def _cait() -> dict:
    from timm.models.cait import Cait

    return Cait(**{**TINY, "depth_token_only": 1}).state_dict()


REFUSALS = {  # what vitembed is given: (its state dict, what the one line says)
    "hybrid": (_hybrid, "a hybrid ViT: its patch embedding runs a CNN stem (patch_embed.backbone)"),
    "patch_embed_norm": (lambda: _vit(embed_norm_layer=torch.nn.LayerNorm).state_dict(),
                         "its patch embedding ends in a norm layer (patch_embed.norm)"),
    "cait": (_cait, "a CaiT model: its class token joins after the patch blocks"),
    "lone_patch_embedding": (lambda: {k: v for k, v in _vit().state_dict().items() if k.startswith("patch_embed.")},
                             "a patch embedding found, but not the class or position tensors"),
}


@pytest.mark.parametrize("family", list(REFUSALS))
def test_refused_families_say_why(family, tmp_path):
    """One line, exit 1, no traceback: the reason, and the families vitembed reads."""
    build, reason = REFUSALS[family]
    ckpt = save(build(), tmp_path / "model.safetensors")
    image = make_image(tmp_path / "x.png", size=(32, 32))
    for args in (("info", "--weights", ckpt), ("encode", image, "-o", tmp_path / "z.npy", "--weights", ckpt)):
        assert_clean_error(run_cli(*args), str(ckpt), reason, "timm (ViT, DeiT, Eva, Beit", "OpenAI CLIP / open_clip",
                           "DINOv2 and DINOv3 repositories")
    assert not (tmp_path / "z.npy").exists()


# --------------------------------------------------------------------------- show, and the Python API


def test_show_on_clip_and_rope_checkpoints(tmp_path):
    """show positions / patches draw a CLIP checkpoint's layer; show positions on a RoPE checkpoint
    (no table) is refused with the reason, in one line."""
    clip = save(openai_clip_state(hf_clip_vision()), tmp_path / "clip.safetensors")
    torch.manual_seed(0)
    rope = save(randomized(TIMM_FAMILIES["vit_rope_no_table"][0]()).state_dict(), tmp_path / "rope.safetensors")
    image = make_image(tmp_path / "x.png", size=(40, 40))
    for args in (("positions", "--weights", clip), ("patches", image, "--weights", clip),
                 ("patches", image, "--weights", rope, "--image-size", "32")):
        out = tmp_path / f"{args[0]}-{Path(args[-1]).stem}.png"
        r = run_cli("show", *args, "-o", out)
        assert r.returncode == 0, r.stderr.decode()
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("show", "positions", "--weights", rope, "-o", tmp_path / "rope-positions.png")
    assert_clean_error(r, "show positions draws the position table E_pos", "timm Eva",
                       "no table: rotary (RoPE) positions, applied inside attention", code=2)
    assert not (tmp_path / "rope-positions.png").exists()


def test_api_native_grids_with_a_pre_norm(tmp_path):
    """vitembed.encode on --resize native with a pre-norm layer (timm CLIP): a table per grid, the
    pre-norm after it; the numpy and torch engines give timm's z0 for each image's own grid."""
    import vitembed

    torch.manual_seed(0)
    m = randomized(TIMM_FAMILIES["vit_clip"][0]())
    ckpt = save(m.state_dict(), tmp_path / "clip.safetensors")
    photos = tmp_path / "photos"
    for i, size in enumerate([(64, 40), (40, 64), (50, 50)]):
        make_image(photos / f"{i}.png", size=size, seed=i)
    outputs = {}
    for engine in ("numpy", "torch"):
        summary = vitembed.encode([photos], tmp_path / engine, weights=str(ckpt), resize="native", max_patches=30,
                                  normalize="clip", engine=engine, device="cpu", workers=0)
        assert summary.ok == 3
        outputs[engine] = {p.name: np.load(p) for p in sorted((tmp_path / engine).rglob("*.npy"))}
    assert outputs["numpy"].keys() == outputs["torch"].keys() and len(outputs["numpy"]) == 3
    prep = Preprocess(resize="native", max_patches=30, patch_size=8, mean=CLIP_MEAN, std=CLIP_STD)
    grids = set()
    for path in sorted(photos.iterdir()):
        images = load_image(path, prep)[None]  # (1, H, W, 3), the image's own grid
        grids.add(images.shape[1:3])
        with torch.no_grad():
            expected = timm_z0(m, normalised(images))[0]
        for engine in ("numpy", "torch"):
            got = torch.from_numpy(outputs[engine][path.stem + ".npy"])
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=lambda s: f"{engine} {path.name}: {s}")
    assert len(grids) == 3


def test_ray_actor_gets_the_pre_norm_through_the_fold(tmp_path, monkeypatch):
    """A Ray actor's Encoder is built from the driver's LayerParams, pickled: a pre-norm layer without
    a table (a Perception Encoder-style RoPE ViT) gives the driver's tokens, timm's z0. The actor is
    built here, outside Ray: its node label is not asked of Ray (asking would start a local cluster)."""
    import pickle

    from vitembed.executors import actors
    from vitembed.executors.actors import EncoderActor

    monkeypatch.setattr(actors, "node_id", lambda: "")

    torch.manual_seed(0)
    m = randomized(_eva(use_rot_pos_emb=True, use_abs_pos_emb=False, use_pre_transformer_norm=True))
    loaded = resize_weights(load_weights(save(m.state_dict(), tmp_path / "pe.safetensors")), (40, 56))
    assert loaded.config.pre_norm_eps is not None and not loaded.config.pos_table
    driver = Encoder(loaded, Preprocess(image_size=40, image_width=56, mean=CLIP_MEAN, std=CLIP_STD), engine="numpy")
    actor = EncoderActor(pickle.loads(pickle.dumps(driver.params)), pickle.loads(pickle.dumps(driver.prep)))
    images = uint8_pixels(40, 56)
    with torch.no_grad():
        expected = timm_z0(m, normalised(images))
    torch.testing.assert_close(torch.from_numpy(actor.encoder.encode(images)), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("crop_mode,crop_pct", [("squash", 0.875), ("squash", 1.0), ("center", 0.875)])
def test_timm_eval_transform_is_the_weights_preprocessing(crop_mode, crop_pct, sample_paths):
    """A timm pretrained cfg's crop_mode and crop_pct give the pixels of timm's own eval transform
    (crop_mode squash with crop_pct < 1: squash to S / crop_pct, then the centre S)."""
    from timm.data import create_transform

    from vitembed.weights.checkpoints import timm_preprocess

    cfg = {"crop_mode": crop_mode, "crop_pct": crop_pct, "interpolation": "bilinear", "mean": (0, 0, 0),
           "std": (1, 1, 1)}
    prep = Preprocess(image_size=64, **timm_preprocess(cfg))
    transform = create_transform(input_size=(3, 64, 64), crop_pct=crop_pct, crop_mode=crop_mode,
                                 interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    from PIL import Image

    for path in sample_paths[:3]:
        ours = load_image(path, prep).astype(np.float64)
        theirs = transform(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy() * 255
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).mean() < 1.0, path  # levels of 255, resampling rounding apart
