"""The video model, adapter placement, freezing, and the exact merge (docs/method.md §3, §4)."""
import pytest
import timm
import torch

from _helpers import rel_err
from zeroi2v import PRESETS, create_video_model, merge_adapters
from zeroi2v.nn import LinearAdapter

# Two different timm ViT families at small image size (CLIP-style: pre-norm, QuickGELU, no
# patch bias; and a classic ViT), depth trimmed to keep CI fast.
MODELS = [
    ("vit_small_patch16_224", dict(img_size=32, depth=2), [1, -1, 2, -2, 0, 0]),
    ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32, depth=2), "vit_b_long"),
]


def randomize_trainable(model, gen, std=0.05):
    """fc2 starts at zero; give every trainable tensor random values so merging is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _video(gen, b=2, t=4, size=32):
    return torch.randn(b, 3, t, size, size, generator=gen)


@pytest.mark.parametrize("name,kw,offsets", MODELS)
def test_merge_is_exact_and_zero_cost(name, kw, offsets):
    gen = torch.Generator().manual_seed(0)
    T, classes = 4, 7
    model = create_video_model(name, T, classes, head_offsets=offsets, **kw).eval()
    randomize_trainable(model, gen)
    x = _video(gen, t=T)
    with torch.no_grad():
        y = model(x)
        merged = merge_adapters(model)
        y_merged = merged(x)
    assert merged.merged and not model.merged
    assert rel_err(y_merged, y) < 1e-5
    # the original model still has its adapters (merge copies by default)
    assert model.adapters(0)["t_adapter"] is not None and merged.adapters(0) == {}
    # every head offset survives the merge (the official inference backbone drops the ±2 heads)
    assert all(b.attn.head_offsets == model.head_offsets for b in merged.backbone.blocks)
    # the merged backbone is a plain timm ViT: strict load into a vanilla one of the same name
    vanilla = timm.create_model(name, num_classes=0, **kw)
    vanilla.load_state_dict(merged.backbone.state_dict(), strict=True)
    n_vanilla = sum(p.numel() for p in vanilla.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    extra = T * model.embed_dim + model.embed_dim * classes + classes
    assert n_merged == n_vanilla + extra
    # with all offsets zero, the merged model's per-frame features are the image model's
    with torch.no_grad():
        for blk in merged.backbone.blocks:
            blk.attn.set_temporal(T, "spatial")
        merged.temporal_embedding.zero_()
        frames = x.transpose(1, 2).flatten(0, 1)
        feats = merged.forward_features(x).flatten(0, 1)
        assert rel_err(feats, vanilla.forward_head(vanilla.forward_features(frames), pre_logits=True)) < 1e-5


def test_fresh_model_is_the_image_model():
    """fc2 = 0 and a zero temporal embedding: before training, spatial heads see image features."""
    gen = torch.Generator().manual_seed(1)
    model = create_video_model("vit_small_patch16_224", 4, 5, head_offsets="spatial",
                               img_size=32, depth=2).eval()
    vanilla = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, depth=2).eval()
    vanilla.load_state_dict(model.backbone.state_dict(), strict=False)
    x = _video(gen, t=4)
    with torch.no_grad():
        feats = model.forward_features(x).flatten(0, 1)
        ref = vanilla(x.transpose(1, 2).flatten(0, 1))
    assert rel_err(feats, ref) < 1e-6


def test_trainable_parameters():
    T, classes = 8, 10
    model = create_video_model("vit_small_patch16_224", T, classes, img_size=32, depth=3,
                               head_offsets=[1, -1, 0, 0, 0, 0])
    C, hidden, depth = 384, 96, 3
    adapter = C * hidden + hidden + hidden * C + C
    expected = depth * 4 * adapter + T * C + 2 * C + C * classes + classes  # + final norm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert "temporal_embedding" in trainable and "head.weight" in trainable
    assert "backbone.norm.weight" in trainable
    assert "backbone.blocks.0.attn.qkv.weight" not in trainable  # frozen; its adapter trains
    assert "backbone.blocks.0.attn.qkv.adapter.fc1.weight" in trainable
    assert not any("patch_embed" in n or "pos_embed" in n for n in trainable)


def test_forward_shapes_and_backward_reaches_adapters():
    gen = torch.Generator().manual_seed(2)
    model = create_video_model("vit_small_patch16_224", 4, 3, head_offsets=[1, -1, 0, 0, 0, 0],
                               img_size=32, depth=2)
    x = _video(gen, b=3, t=4)
    assert model.forward_features(x).shape == (3, 4, 384)
    logits = model(x)
    assert logits.shape == (3, 3)
    logits.sum().backward()
    blk = model.backbone.blocks[1]
    # fc2 starts at zero, fc1 receives no gradient until fc2 moves; fc2 itself does
    for slot, adapter in model.adapters(1).items():
        assert adapter.fc2.weight.grad.abs().sum() > 0, slot
    assert model.temporal_embedding.grad.abs().sum() > 0
    assert blk.attn.qkv.weight.grad is None


def test_adapter_affine_and_init():
    gen = torch.Generator().manual_seed(3)
    a = LinearAdapter(16, ratio=0.25, scale=0.5, dropout=0.1)
    assert a.fc2.weight.abs().sum() == 0 and a.hidden == 4
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    a.eval()
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    m, c = a.affine()
    assert torch.allclose(a.double()(x), x @ m.T + c)


def test_official_presets():
    assert PRESETS["vit_b"] == (1, -1) + (0,) * 10
    assert PRESETS["vit_l_long"] == (1, 1, -1, -1, 2, -2, 3) + (0,) * 9
    assert all(len(v) in (12, 16) for v in PRESETS.values())


def test_wrong_frame_count_and_set_num_frames():
    gen = torch.Generator().manual_seed(4)
    model = create_video_model("vit_small_patch16_224", 8, 3, img_size=32, depth=1,
                               head_offsets=[1, -1, 2, -3, 7, 0]).eval()
    x = _video(gen, b=1, t=4)
    with pytest.raises(ValueError, match="video has 4 frames but the model was built for 8"):
        model(x)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(x[:, :, 0])
    with torch.no_grad():
        model.temporal_embedding.copy_(torch.arange(8.0).view(1, 8, 1).expand(1, 8, 384))
    model.set_num_frames(4)
    assert model.head_offsets == (1, -1, 2, -3, 3, 0)  # 7 clamped to 3, signs kept
    assert torch.allclose(model.temporal_embedding[0, :, 0], torch.tensor([0.0, 7 / 3, 14 / 3, 7.0]))
    assert model(x).shape == (1, 3)
    model.set_num_frames(1)
    assert model.head_offsets == (0,) * 6
    model.set_num_frames(8)  # derived from the built offsets: the round trip restores them
    assert model.head_offsets == (1, -1, 2, -3, 7, 0)


def test_unsupported_architectures():
    with pytest.raises(TypeError, match="not a model family zeroi2v supports"):
        create_video_model("resnet18", 4, 3)
    with pytest.raises(TypeError, match="ResPostBlock; zeroi2v supports Block"):
        create_video_model("vit_small_patch16_224", 4, 3, img_size=32, depth=1,
                           block_fn=timm.models.vision_transformer.ResPostBlock)


def test_pretrained_file(tmp_path):
    src = timm.create_model("vit_small_patch16_224", num_classes=10, img_size=32, depth=1)
    path = tmp_path / "img.pth"
    torch.save(src.state_dict(), path)
    model = create_video_model("vit_small_patch16_224", 4, 3, img_size=32, depth=1,
                               pretrained_file=path, head_offsets="spatial")
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_video_model("vit_small_patch16_224", 4, 3, img_size=32, depth=1,
                           pretrained_file=tmp_path / "missing.pth")
    wrong = timm.create_model("vit_small_patch16_224", img_size=64, depth=1)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        create_video_model("vit_small_patch16_224", 4, 3, img_size=32, depth=1,
                           pretrained_file=tmp_path / "wrong.pth")


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
@pytest.mark.parametrize("frames", [1, 2, 4, 8, 16, 32])
def test_auto_offsets_fit_any_head_count(heads, frames):
    from zeroi2v.offsets import auto_offsets, resolve_offsets

    offs = auto_offsets(heads, frames)
    assert offs == resolve_offsets("auto", heads, frames) and len(offs) == heads
    assert all(abs(d) < frames for d in offs)
    if heads > 1:
        assert 0 in offs  # at least one spatial head remains
    if frames == 1 or heads == 1:
        assert set(offs) == {0}
    else:
        assert sum(d > 0 for d in offs) >= 1 and (heads < 3 or sum(d < 0 for d in offs) >= 1)
    if frames >= 8:  # the paper's layouts where it has one
        want = {12: "vit_b_long" if frames >= 16 else "vit_b",
                16: "vit_l_32f" if frames >= 32 else "vit_l"}.get(heads)
        if want:
            assert offs == PRESETS[want]


def test_auto_offsets_rule_for_other_head_counts():
    from zeroi2v.offsets import auto_offsets

    assert auto_offsets(6, 8) == (1, -1, 0, 0, 0, 0)            # ViT-S / DeiT-S / DINOv2-S
    assert auto_offsets(3, 8) == (1, -1, 0)                     # ViT-Ti
    assert auto_offsets(24, 8) == (1, -1, 1, -1) + (0,) * 20    # ~1/6 temporal
    assert auto_offsets(6, 16) == (1, -1, 0, 0, 0, 0)           # long clips: ~1/3, in pairs
    assert auto_offsets(24, 32)[:8] == (1, -1, 2, -2, 1, -1, 2, -2) and auto_offsets(24, 32)[8:] == (0,) * 16
    assert auto_offsets(12, 2) == (1, -1) + (0,) * 10           # clamped to |d| < T
    assert auto_offsets(12, 16)[:4] == (1, -1, 2, -2)


def test_default_model_uses_auto_and_stores_the_ints():
    m = create_video_model("vit_small_patch16_224", 8, 3, img_size=32, depth=1)  # 6 heads
    assert m.config.head_offsets == (1, -1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="ambiguous"):
        create_video_model("vit_small_patch16_224", 8, 3, head_offsets=None, img_size=32, depth=1)
