"""Every popular timm ViT family becomes a video model with default arguments (issue #13).

Each family is built the way a user would (``create_video_model(name, frames, classes)`` with
nothing else but a small image and depth 2 to keep CI fast; head counts are the real ones), then
checked for: a forward and backward pass, the image model at initialisation, an exact merge into
a plain timm model, and a save/load round trip.
"""
from __future__ import annotations

import pytest
import timm
import torch

from _helpers import rel_err
from zeroi2v import create_video_model, load_model, merge_adapters
from zeroi2v.errors import UnsupportedModelError
from zeroi2v.offsets import auto_offsets

# (timm name, kwargs that only shrink it, family, heads). Kwargs never change a model's head
# count, attention or MLP type, so the default head offsets are resolved as for the full model.
CASES = [
    ("vit_tiny_patch16_224", dict(img_size=32), "vit", 3),
    ("vit_small_patch16_224", dict(img_size=32), "vit", 6),
    ("vit_large_patch14_clip_224", dict(img_size=28), "vit", 16),
    ("vit_huge_patch14_224", dict(img_size=28), "vit", 16),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28), "vit", 6),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=32), "vit", 12),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32), "vit", 3),
    ("vit_base_patch16_siglip_224", dict(img_size=32), "vit", 12),
    ("aimv2_large_patch14_224", dict(img_size=28), "vit", 8),           # SwiGLU, no biases
    ("vit_giant_patch14_dinov2", dict(img_size=28, depth=1), "vit", 24),  # GluMlp (packed)
    ("eva02_tiny_patch14_224", dict(img_size=28), "eva", 3),            # RoPE, GluMlp
    ("eva02_base_patch14_224", dict(img_size=28), "eva", 12),           # separate q/k/v, SwiGLU
    ("vit_small_patch16_dinov3", dict(img_size=32), "eva", 6),          # RoPE, registers
    ("beitv2_base_patch16_224", dict(img_size=32), "beit", 12),         # relative position bias
]
IDS = [c[0] for c in CASES]
T = 4


def _build(name, kw, **extra):
    kw = dict(depth=2) | kw
    return create_video_model(name, T, 5, **kw, **extra)


def _randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def _video(model, b=2, seed=1, dtype=torch.float32):
    size = model.backbone.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, T, *size, generator=g).to(dtype)


@pytest.mark.parametrize("name,kw,family,heads", CASES, ids=IDS)
def test_default_arguments_forward_backward(name, kw, family, heads):
    model = _build(name, kw)
    assert model.family == family
    assert model.head_offsets == auto_offsets(heads, T)
    assert model.config.head_offsets == model.head_offsets  # the resolved ints are stored
    assert any(model.head_offsets)  # a temporal layout, not the image model
    x = _video(model)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert model.temporal_embedding.grad.abs().sum() > 0
    for slot, adapter in model.adapters(1 if len(model.backbone.blocks) > 1 else 0).items():
        assert adapter.fc2.weight.grad.abs().sum() > 0, slot
    frozen = [p for n, p in model.backbone.named_parameters()
              if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("name,kw,family,heads", CASES, ids=IDS)
def test_initial_model_is_the_image_model(name, kw, family, heads):
    """Spatial heads, zero temporal embedding, fresh adapters (fc2 = 0): per-frame features are
    the timm model's own, for the same weights."""
    model = _build(name, kw, head_offsets="spatial").eval()
    merged = merge_adapters(model)  # fresh adapters fold to identity (zero biases where added)
    image = timm.create_model(name, num_classes=0, **merged.config.timm_kwargs).eval()
    image.load_state_dict(merged.backbone.state_dict(), strict=True)
    x = _video(model)
    with torch.no_grad():
        feats = model.forward_features(x).flatten(0, 1)
        ref = image(x.transpose(1, 2).flatten(0, 1))
    assert rel_err(feats, ref) < 1e-5


@pytest.mark.parametrize("name,kw,family,heads", CASES, ids=IDS)
def test_merge_is_exact(name, kw, family, heads):
    model = _randomize(_build(name, kw).double()).eval()
    x = _video(model, dtype=torch.float64)
    with torch.no_grad():
        merged = merge_adapters(model)
        err64 = rel_err(merged(x), model(x))
        merged32, model32 = merged.float(), model.float()
        err32 = rel_err(merged32(x.float()), model32(x.float()))
    assert err64 < 1e-12
    assert err32 < 1e-5
    assert merged.adapted_linears() == [] and merged.head_offsets == model.head_offsets
    # the merged backbone loads strictly into vanilla timm built with the recorded kwargs
    cfg = merged.config
    vanilla = timm.create_model(cfg.model_name, num_classes=0, **cfg.timm_kwargs)
    vanilla.load_state_dict(merged.backbone.state_dict(), strict=True)


# Every variant the README's family table lists, shrunk to width 64 / 4 heads / one block: what a
# round trip depends on is the structure (MLP type, biases, registers, norms, stem), not the size.
SMALL = dict(img_size=32, depth=1, embed_dim=64, num_heads=4)
ROUND_TRIP = [
    ("vit_tiny_patch16_224", SMALL),
    ("vit_small_patch16_224", SMALL),
    ("vit_base_patch16_224", SMALL),
    ("vit_large_patch14_clip_224", dict(SMALL, img_size=28)),        # CLIP: norm_pre
    ("vit_base_patch16_clip_quickgelu_224", SMALL),
    ("vit_huge_patch14_224", dict(SMALL, img_size=28)),
    ("deit_tiny_distilled_patch16_224", SMALL),                      # distillation token
    ("vit_small_patch14_reg4_dinov2", dict(SMALL, img_size=28)),     # registers, layer scale
    ("vit_base_patch16_reg4_gap_256", SMALL),                        # registers, fc_norm
    ("vit_base_patch16_siglip_224", SMALL),                          # attention-pool head
    ("aimv2_large_patch14_224", dict(SMALL, img_size=28)),           # SwiGLU, no biases
    ("vit_giant_patch14_dinov2", dict(SMALL, img_size=28, embed_dim=96)),  # GluMlp (even width)
    ("vit_tiny_r_s16_p8_224", SMALL),                                # ResNet-stem hybrids
    ("vit_small_r26_s32_224", SMALL),
    ("vit_small_resnet26d_224", SMALL),                              # batch norms in the stem
    ("eva02_tiny_patch14_224", dict(SMALL, img_size=28)),            # RoPE, fused qkv
    ("eva02_base_patch14_224", dict(SMALL, img_size=28)),            # separate q/k/v, SwiGLU
    ("eva02_base_patch16_clip_224", SMALL),                          # EVA-CLIP
    ("vit_small_patch16_dinov3", SMALL),                             # DINOv3 RoPE, registers
    ("vit_medium_patch16_rope_reg1_gap_256", SMALL),                 # RoPE ViT (an Eva)
    ("beit_base_patch16_224", SMALL),                                # relative position bias
    ("beitv2_base_patch16_224", SMALL),
]


@pytest.mark.parametrize("source", ["name", "instance"])
@pytest.mark.parametrize("name,kw", ROUND_TRIP, ids=[c[0] for c in ROUND_TRIP])
def test_save_and_load_round_trip(name, kw, source, tmp_path):
    """save_pretrained -> load_model gives the same logits, unmerged and merged, and the merged
    folder's backbone tensors load strict=True into timm built from its config.json alone."""
    import json

    from safetensors.torch import load_file

    if source == "name":
        model = create_video_model(name, T, 5, **kw)
    else:  # zeroi2v recovers the timm kwargs (verified on the meta device) or cannot save
        model = create_video_model(timm.create_model(name, **kw), T, 5)
        assert model.config.timm_kwargs is not None
    model = _randomize(model).eval()
    x = _video(model)
    for label, m in (("unmerged", model), ("merged", merge_adapters(model))):
        m.save_pretrained(tmp_path / label)
        back = load_model(tmp_path / label)
        assert back.config == m.config and back.merged == (label == "merged")
        with torch.no_grad():
            assert torch.equal(back(x), m(x)), label
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    vanilla = timm.create_model(cfg["model_name"], num_classes=0, **cfg["timm_kwargs"])
    tensors = load_file(str(tmp_path / "merged" / "model.safetensors"))
    vanilla.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()
                             if k.startswith("backbone.")}, strict=True)


def test_instances_whose_construction_cannot_be_recovered_are_not_guessed(tmp_path):
    """describe never returns kwargs that rebuild another model: an Eva without RoPE (a keyword
    it does not read off the instance) works but cannot be saved."""
    from zeroi2v.models import timm_spec

    for name, kw in (("eva02_tiny_patch14_224", dict(qkv_bias=False, mlp_ratio=3.0, num_reg_tokens=2)),
                     ("beitv2_base_patch16_224", dict(qkv_bias=False, drop_path_rate=0.1))):
        vit = timm.create_model(name, num_classes=0, **SMALL, **kw)
        got_name, got = timm_spec.describe(vit)
        assert got_name == name and got is not None, name
        rebuilt = timm_spec.create(name, got, device="meta")
        assert timm_spec.signature(rebuilt) == timm_spec.signature(vit)
    odd = timm.create_model("eva02_tiny_patch14_224", use_rot_pos_emb=False, **dict(SMALL, img_size=28))
    assert timm_spec.describe(odd) == ("eva02_tiny_patch14_224", None)
    video = create_video_model(odd, T, 5)
    assert video(_video(video, b=1)).shape == (1, 5)
    with pytest.raises(ValueError, match="cannot save.*does not know how this 'eva02_tiny_patch14_224'"):
        video.save_pretrained(tmp_path / "odd")


def test_hybrid_resnet_stem():
    """A ResNet-stem hybrid takes 3-channel frames; its patch embedding is a CNN."""
    model = create_video_model("vit_base_r50_s16_224", T, 5, img_size=64, depth=2)
    x = _video(model, b=1)
    assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="expected 3 channels"):
        model(x[:, :1].expand(-1, 1024, -1, -1, -1))


def test_attention_rope_vits_are_refused_by_class():
    with pytest.raises(UnsupportedModelError, match="unsupported attention .*AttentionRope"):
        create_video_model("vit_small_patch16_rope_224", T, 5, img_size=32, depth=1)


def test_naflex_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="NaFlexVit.*NaFlexViT packs images"):
        create_video_model("naflexvit_base_patch16_siglip", T, 5, depth=1)


def test_instance_is_not_modified_and_refused_before_copying():
    src = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=10)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    video = create_video_model(src, T, 5)
    assert type(src.blocks[0].attn).__name__ == "Attention" and src.num_classes == 10
    assert src.state_dict().keys() == before.keys()
    assert all(torch.equal(src.state_dict()[k], v) for k, v in before.items())
    assert video.backbone.blocks[0].attn.qkv is not src.blocks[0].attn.qkv
    bad = timm.create_model("vit_small_patch16_224", img_size=32, depth=1,
                            block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        create_video_model(bad, T, 5)
    assert type(bad.blocks[0]).__name__ == "ResPostBlock"


@pytest.mark.parametrize("name,kw", [(c[0], c[1]) for c in CASES
                                     if c[0] in ("vit_small_patch16_224", "eva02_tiny_patch14_224",
                                                 "beitv2_base_patch16_224")])
def test_gradient_checkpointing_gives_the_same_gradients(name, kw):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same frozen weights; eval: no dropout in either run
        model = _randomize(_build(name, kw)).eval()
        model.backbone.set_grad_checkpointing(ckpt)
        calls = []
        model.backbone.blocks[0].register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        model(_video(model)).square().sum().backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputes in the backward
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("name,kw", [(c[0], c[1]) for c in CASES if c[2] in ("eva", "beit")]
                         + [("vit_small_patch14_reg4_dinov2", dict(img_size=28))])
def test_pretrained_image_file_of_each_family(name, kw, tmp_path):
    """A timm checkpoint of the image model (with its classifier) loads into the video model's
    backbone through that family's own key filter; the classifier is ignored."""
    from safetensors.torch import save_file

    kw = dict(depth=2) | kw
    image = timm.create_model(name, num_classes=7, **kw)
    save_file({k: v.contiguous() for k, v in image.state_dict().items()},
              str(tmp_path / "image.safetensors"))
    video = create_video_model(name, T, 5, pretrained_file=tmp_path / "image.safetensors", **kw)
    got = merge_adapters(video).backbone.state_dict()
    for k, v in image.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name,kw,slot", [
    ("eva02_base_patch14_224", dict(img_size=28), "t_adapter"),    # q_proj, k_proj, v_proj
    ("eva02_base_patch14_224", dict(img_size=28), "mlp_adapter"),  # SwiGLU fc1_g, fc1_x
])
def test_a_shared_adapter_runs_once_per_input(name, kw, slot):
    """One adapter before several linears: one dropout draw for all of them in training, as for
    the paper's single adapter before the attention / MLP; nothing is kept after the call."""
    model = _randomize(_build(name, kw, adapter_dropout=0.5)).train()
    adapter = model.adapters(0)[slot]
    draws = []
    adapter.drop.register_forward_hook(lambda m, i, o, d=draws: d.append(o))
    model(_video(model)).sum().backward()
    assert len(draws) == 1
    assert adapter.__dict__.get("_shared_output") is None
    assert adapter.fc1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # and in eval it is still the same function as applying it per linear
        x = torch.randn(2, 5, adapter.dim, generator=torch.Generator().manual_seed(0))
        sites = [m for m in model.adapted_linears() if m.get_adapter() is adapter]
        assert len(sites) > 1
        for m in sites:
            want = torch.nn.functional.linear(adapter(x), m.weight, m.bias)
            assert torch.allclose(m(x), want, atol=1e-6)


def test_frozen_batch_norms_of_a_hybrid_stem_stay_frozen_in_training():
    model = create_video_model("vit_small_resnet26d_224", 2, 5, img_size=32, depth=1).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        model(torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))
    assert model.training and model.head.training


@pytest.mark.parametrize("name,kw", [
    ("beitv2_base_patch16_224", dict(img_size=32, qkv_bias=False)),  # gains BEiT's q/v biases
    ("eva02_tiny_patch14_224", dict(img_size=28, qkv_bias=False)),   # constant into norm1
])
def test_bias_free_attention_merges_into_plain_timm(name, kw, tmp_path):
    model = _randomize(_build(name, kw).double()).eval()
    x = _video(model, dtype=torch.float64)
    merged = merge_adapters(model)
    with torch.no_grad():
        assert rel_err(merged.forward_frames(x), model.forward_frames(x)) < 1e-12
    cfg = merged.config
    vanilla = timm.create_model(cfg.model_name, num_classes=0, **cfg.timm_kwargs)
    vanilla.load_state_dict(merged.backbone.state_dict(), strict=True)
    merged.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m").double()(x), merged(x))


def test_loading_a_hybrid_builds_its_parameters_on_meta():
    """timm's hybrid ViTs run their CNN stem on a dummy image while being built (to size the
    patch projection); loading builds the parameters on the meta device, so that forward runs
    there too (it used to fail: 'Tensor on device meta is not on the expected device cpu')."""
    from zeroi2v import ZeroI2VViT
    from zeroi2v.models.timm_spec import parameters_on_meta

    cfg = create_video_model("vit_small_resnet26d_224", T, 5, **SMALL).config
    empty = ZeroI2VViT.from_config(cfg, empty=True)
    assert all(p.is_meta for p in empty.parameters())  # nothing allocated for the weights
    stats = [b for n, b in empty.named_buffers() if n.endswith("running_mean")]
    assert stats and not any(b.is_meta for b in stats)  # buffers stay real, loaded with assign
    with parameters_on_meta():
        w = torch.nn.Linear(2, 2).weight
        real = torch.ones(2, 2)
        assert (real + w).is_meta
        with pytest.raises(RuntimeError, match="meta"):  # a write into a real tensor is not
            real.copy_(w)                                 # turned into one into a meta copy


class ToyViT(timm.models.vision_transformer.VisionTransformer):
    """A 'new' timm family for the test below: a ViT subclass zeroi2v has never seen."""


def test_a_new_family_is_one_entry():
    """Everything zeroi2v needs to know about a family (classes, attention, image-key filter,
    merge rules) is one Family; registering it is the whole change."""
    from zeroi2v.models import families

    fam = families.register_family(families.Family(
        "toy", f"{__name__}.ToyViT", ("timm.models.vision_transformer.Block",),
        next(f for f in families.FAMILIES if f.name == "vit").forward_tokens,  # ViT's tokens
        "timm.models.vision_transformer.checkpoint_filter_fn",
        attention_paths=("timm.layers.Attention",)))
    try:
        toy = ToyViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4,
                     num_classes=0, qkv_bias=False)
        m = create_video_model(toy, 4, 3, head_offsets=[1, -1, 0, 0]).eval()
        assert m.family == "toy" and m.family_rules is fam
        x = torch.randn(2, 3, 4, 32, 32)
        merged = merge_adapters(m)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), m(x), rtol=1e-5, atol=1e-5)
        # its merge rules apply: no bias keyword of its own, so none is recorded
        assert "qkv_bias" not in (merged.config.timm_kwargs or {})
        with pytest.raises(ValueError, match="a family named 'toy' exists already"):
            families.register_family(fam)
    finally:
        families.FAMILIES.remove(fam)
