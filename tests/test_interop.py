"""Interop (issue #7): CLIP weights from local files, official checkpoint import, export.

All weights are random, written to tmp files in each layout. The reference forwards (CLIP visual
tower, official ZeroI2V backbone with STDHA by a shift of a cloned tensor) are written here,
independently of the library, from the official architecture's description (docs/method.md §2, §3, §6).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from official_ckpt import ADAPTERS, make_official
from zeroi2v import merge_adapters
from zeroi2v.interop import (
    export_onnx,
    export_program,
    load_clip_weights,
    load_official_checkpoint,
    official_config,
    onnx_files,
)

CLIP_B = "vit_base_patch16_clip_quickgelu_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)  # 17 tokens


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


# ============================================================================ CLIP (OpenAI layout)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):  # (L, N, D)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, h):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResBlock(d, h) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TinyCLIPVisual(nn.Module):
    """The CLIP image tower as OpenAI writes it (ln_pre, LND blocks, ln_post on CLS, proj)."""

    def __init__(self, img=32, patch=8, width=64, layers=2, heads=4, out_dim=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((img // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class TinyCLIP(nn.Module):
    """Image tower under ``visual.`` plus a few text-side tensors, as in OpenAI's files."""

    def __init__(self, **kw):
        super().__init__()
        self.visual = TinyCLIPVisual(**kw)
        self.token_embedding = nn.Embedding(10, 16)
        self.positional_embedding = nn.Parameter(torch.randn(7, 16))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image):
        return self.visual(image)


def _randomize(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1)
                    * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return _randomize(TinyCLIP()).eval()


def _images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _timm_clip(**kw):
    import timm
    return timm.create_model(CLIP_B, pretrained=False, **dict(TINY, **kw)).eval()


def test_clip_openai_state_dict(tiny_clip, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    torch.save(tiny_clip.state_dict(), path)
    vit = load_clip_weights(_timm_clip(num_classes=32), path)  # head <- visual.proj
    x = _images()
    with torch.no_grad():
        assert rel_err(vit(x), tiny_clip.visual(x)) < 1e-5


def test_clip_torchscript_archive_by_name(tiny_clip, tmp_path):
    path = tmp_path / "ViT-tiny-jit.pt"
    torch.jit.trace(tiny_clip, _images(1)).save(str(path))
    vit = load_clip_weights(CLIP_B, path, num_classes=32, **TINY).eval()
    x = _images()
    with torch.no_grad():
        assert rel_err(vit(x), tiny_clip.visual(x)) < 1e-5
    # default: a headless backbone (the video model's); proj is ignored
    feats = load_clip_weights(CLIP_B, path, **TINY).eval()
    with torch.no_grad():
        assert rel_err(feats(x) @ tiny_clip.visual.proj, tiny_clip.visual(x)) < 1e-5


def test_clip_open_clip_timm_trunk_and_timm_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _randomize(_timm_clip(num_classes=0))
    x = _images()
    with torch.no_grad():
        want = src(x)
    oc = tmp_path / "open_clip.bin"
    torch.save({"state_dict": {"visual.trunk." + k: v for k, v in src.state_dict().items()}}, oc)
    st = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    for path in (oc, st):
        vit = load_clip_weights(_timm_clip(num_classes=0), path)
        with torch.no_grad():
            assert torch.equal(vit(x), want), path


def test_clip_into_video_model_and_create_video_model(tiny_clip, tmp_path):
    from zeroi2v import create_video_model

    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    ref = load_clip_weights(CLIP_B, path, **TINY)
    video = create_video_model(CLIP_B, 4, 5, head_offsets=[1, -1, 0, 0], **TINY)
    assert load_clip_weights(video, path) is video
    video2 = create_video_model(CLIP_B, 4, 5, head_offsets=[1, -1, 0, 0], pretrained_file=path, **TINY)
    for m in (video, video2):
        got = m.backbone.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(got[k], v), k


def test_clip_wrong_shape_names_key(tiny_clip, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)clip\.pt.*'pos_embed'.*\(1, 17, 64\).*\(1, 17, 96\)"):
        load_clip_weights(CLIP_B, path, **dict(TINY, embed_dim=96))
    # a mismatch past the embeddings: one block's MLP of the wrong size
    sd = tiny_clip.state_dict()
    sd["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.randn(128, 64)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc1\.weight'.*\(128, 64\).*\(256, 64\)"):
        load_clip_weights(CLIP_B, path, **TINY)


# ============================================================================ official checkpoints

def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _adapter(x, sd, p, scale):
    if p + ".D_fc1.weight" not in sd:
        return x
    y = F.linear(x, sd[p + ".D_fc1.weight"], sd[p + ".D_fc1.bias"])
    return x + scale * F.linear(y, sd[p + ".D_fc2.weight"], sd[p + ".D_fc2.bias"])


def _shift(feat, frames, offsets):
    """Official STDHA on (N, B*T, C): head h of frame t takes frame t - d_h from a shifted clone;
    frames shifted in from outside the clip keep their own values."""
    n, bt, c = feat.shape
    d_head = c // len(offsets)
    feat = feat.view(n, bt // frames, frames, c)
    out = feat.clone()
    for h, d in enumerate(offsets):
        sl = slice(h * d_head, (h + 1) * d_head)
        if d > 0:
            out[:, :, d:, sl] = feat[:, :, :-d, sl]
        elif d < 0:
            out[:, :, :d, sl] = feat[:, :, -d:, sl]
    return out.view(n, bt, c)


def official_forward(sd, video, offsets, scale):
    """The official ViT_Zero_CLIP + I3D head forward, in float64, from the state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    x = video.double()
    b, _, t = x.shape[:3]
    heads = len(offsets)
    w = sd["backbone.conv1.weight"]
    x = x.transpose(1, 2).flatten(0, 1)
    x = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["backbone.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], 1) + sd["backbone.positional_embedding"]
    n, c = x.shape[1:]
    x = (x.view(b, t, n, c) + sd["backbone.temporal_embedding"].view(1, t, 1, c)).view(b * t, n, c)
    x = _ln(x, sd, "backbone.ln_pre").permute(1, 0, 2)  # (N, BT, C)
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("backbone.transformer."))
    for i in range(layers):
        p = f"backbone.transformer.resblocks.{i}."
        y = _adapter(_ln(x, sd, p + "ln_1"), sd, p + "T_Adapter_in", scale)
        q, k, v = F.linear(y, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        k, v = _shift(k, t, offsets), _shift(v, t, offsets)
        dh = c // heads
        q, k, v = (z.reshape(n, b * t * heads, dh).transpose(0, 1) for z in (q, k, v))
        a = torch.softmax((q / math.sqrt(dh)) @ k.transpose(1, 2), -1) @ v
        a = a.transpose(0, 1).reshape(n, b * t, c)
        a = F.linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        x = x + _adapter(a, sd, p + "S_Adapter", scale)
        y = _adapter(_ln(x, sd, p + "ln_2"), sd, p + "MLP_Adapter", scale)
        y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        y = F.linear(y * torch.sigmoid(1.702 * y), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        x = x + _adapter(y, sd, p + "MLP_Adapter_out", scale)
    x = _ln(x.permute(1, 0, 2)[:, 0], sd, "backbone.ln_post")
    x = x.view(b, t, c).mean(1)
    return F.linear(x, sd["cls_head.fc_cls.weight"], sd["cls_head.fc_cls.bias"])


class MmengineMeta:
    """Stands for mmengine objects (HistoryBuffer, ...) that weights_only loading refuses."""

    def __init__(self):
        self.hook_msgs = {"best_score": np.float64(0.8)}


def _save_official(sd, path, wrap=True):
    obj = {"meta": {"epoch": 40, "hub": MmengineMeta(), "acc": np.float64(83.0)},
           "state_dict": sd} if wrap else sd
    torch.save(obj, path)
    return path


def _video(frames, b=2, seed=2):
    return torch.randn(b, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed))


# (preset / offsets, width, frames, classes, expected adapter scale)
OFFICIAL_CASES = {
    "vit_b": ("vit_b", 96, 4, 10, 0.5),            # 12 heads of 8
    "vit_b_long": ("vit_b_long", 96, 4, 174, 1.0),  # SSv2 class count -> scale 1.0
    "vit_l_long": ("vit_l_long", 128, 4, 10, 0.5),  # 16 heads of 8, offsets up to +3
}


@pytest.mark.parametrize("case", sorted(OFFICIAL_CASES))
def test_official_import_matches_official_forward(case, tmp_path):
    preset, width, frames, classes, scale = OFFICIAL_CASES[case]
    sd = make_official(width, 2, frames, classes)
    path = _save_official(sd, tmp_path / "epoch_40.pth")
    model = load_official_checkpoint(path, head_offsets=preset).eval()
    from zeroi2v import PRESETS
    offsets = PRESETS[preset]
    assert model.head_offsets == offsets
    assert model.adapters(0)["t_adapter"].scale == scale
    assert (model.num_frames, model.head.out_features) == (frames, classes)
    x = _video(frames)
    want = official_forward(sd, x, offsets, scale)
    with torch.no_grad():
        got = model(x)
        assert rel_err(got, want) <= 1e-5
        if case == "vit_b_long":  # the merged *_long model keeps the ±2 heads
            merged = merge_adapters(model)
            assert merged.head_offsets == offsets and merged.merged
            assert rel_err(merged(x), want) <= 1e-5


def test_official_explicit_offsets_one_mlp_adapter_and_reparameterized(tmp_path):
    # num_tadapter=1 configs have no MLP_Adapter_out; explicit offsets give the head count
    offsets = [1, -1, 2, 0]
    sd = make_official(64, 2, 4, 7, adapters=ADAPTERS[:3])
    model = load_official_checkpoint(_save_official(sd, tmp_path / "a.pth", wrap=False),
                                     head_offsets=offsets, adapter_scale=1.0).eval()
    assert "mlp_adapter_out" not in model.adapters(0) and not model.merged
    x = _video(4)
    with torch.no_grad():
        assert rel_err(model(x), official_forward(sd, x, offsets, 1.0)) <= 1e-5
    # a checkpoint without adapters (official tools/weight_reparam.py output) imports merged
    sd = make_official(64, 2, 4, 7, adapters=())
    model = load_official_checkpoint(_save_official(sd, tmp_path / "b.pth"), head_offsets=offsets).eval()
    assert model.merged
    with torch.no_grad():
        assert rel_err(model(x), official_forward(sd, x, offsets, 0.5)) <= 1e-5


def test_official_config_presets():
    assert official_config(768, 12, 16, 8, 400) == dict(
        head_offsets="vit_b", adapter_scale=0.5, timm_name=CLIP_B)
    assert official_config(768, 12, 16, 16, 174)["head_offsets"] == "vit_b_long"
    assert official_config(768, 12, 16, 16, 174)["adapter_scale"] == 1.0
    assert official_config(768, 12, 16, 32, 101)["head_offsets"] == "vit_b_long"
    assert official_config(1024, 24, 14, 8, 400)["head_offsets"] == "vit_l"
    assert official_config(1024, 24, 14, 32, 400)["head_offsets"] == "vit_l_32f"
    l_ssv2 = official_config(1024, 24, 14, 32, 174)
    assert (l_ssv2["head_offsets"], l_ssv2["adapter_scale"]) == ("vit_l_long", 1.0)
    assert l_ssv2["timm_name"] == "vit_large_patch14_clip_quickgelu_224"
    assert official_config(64, 2, 8, 8, 10)["head_offsets"] is None


def test_official_errors(tmp_path):
    sd = make_official(64, 2, 4, 7)
    good = _save_official(sd, tmp_path / "good.pth")
    # no official layout for this size: offsets needed
    with pytest.raises(ValueError, match="head_offsets="):
        load_official_checkpoint(good)
    # wrong shape: argument disagreeing with the checkpoint, and a corrupted key
    with pytest.raises(ValueError, match=r"'backbone\.temporal_embedding'.*\(1, 4, 64\).*\(1, 8, 64\)"):
        load_official_checkpoint(good, head_offsets=[1, -1, 0, 0], num_frames=8)
    bad = dict(sd)
    bad["backbone.transformer.resblocks.1.attn.out_proj.weight"] = torch.randn(64, 65)
    with pytest.raises(ValueError, match=r"bad\.pth.*resblocks\.1\.attn\.out_proj\.weight"
                                         r".*\(64, 65\).*\(64, 64\)"):
        load_official_checkpoint(_save_official(bad, tmp_path / "bad.pth"), head_offsets=[1, -1, 0, 0])
    # wrong architecture: a timm ViT checkpoint
    vit_path = tmp_path / "timm_vit.pth"
    torch.save(_timm_clip().state_dict(), vit_path)
    with pytest.raises(ValueError, match=r"timm_vit\.pth.*not an official.*'backbone\.conv1\.weight'"):
        load_official_checkpoint(vit_path)
    # not checkpoints at all
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not a checkpoint\n" * 10)
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for p in (txt, trunc):
        with pytest.raises(ValueError, match=p.name):
            load_official_checkpoint(p)
        with pytest.raises(ValueError, match=p.name):
            load_clip_weights(CLIP_B, p, **TINY)


# ============================================================================ export


@pytest.fixture(scope="module")
def imported_long(tmp_path_factory):
    sd = make_official(96, 2, 4, 174)
    path = _save_official(sd, tmp_path_factory.mktemp("ckpt") / "long.pth")
    return load_official_checkpoint(path, head_offsets="vit_b_long").eval()


def test_torch_export_and_onnx(imported_long, tmp_path):
    import onnxruntime as ort

    merged = merge_adapters(imported_long).eval()
    x = _video(4)
    with torch.no_grad():
        want = merged(x)
    ep = export_program(merged, x)
    with torch.no_grad():
        assert rel_err(ep.module()(x), want) <= 1e-5
        assert rel_err(merged(x), want) == 0  # eager model unaffected by tracing
    # the TorchScript-based exporter (onnx without onnxscript) fixes the batch size
    path = export_onnx(merged, x, tmp_path / "model.onnx", dynamo=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"video": x.numpy()})
    assert rel_err(torch.from_numpy(got), want) <= 1e-4
    with pytest.raises(ValueError, match="dynamic_batch=True needs the dynamo-based"):
        export_onnx(merged, x, tmp_path / "dyn.onnx", dynamo=False, dynamic_batch=True)


@pytest.mark.slow
def test_onnx_dynamo_exporter(imported_long, tmp_path):
    import onnxruntime as ort

    merged = merge_adapters(imported_long).eval()
    x = _video(4)
    path = export_onnx(merged, x, tmp_path / "model.onnx", dynamo=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"video": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), merged(x)) <= 1e-4


# one model of each family, merged: a ViT, an Eva (RoPE) and a BEiT (relative position bias)
SMALL = dict(depth=1, embed_dim=64, num_heads=4)
EXPORT_FAMILIES = [
    pytest.param("vit_small_patch16_224", dict(SMALL, img_size=32), id="vit"),
    pytest.param("eva02_tiny_patch14_224", dict(SMALL, img_size=28), id="eva",
                 marks=pytest.mark.slow),
    pytest.param("beitv2_base_patch16_224", dict(SMALL, img_size=32), id="beit",
                 marks=pytest.mark.slow),
    pytest.param("vit_tiny_r_s16_p8_224", dict(SMALL, img_size=32), id="hybrid",
                 marks=pytest.mark.slow),
]


def _small_video_model(name, kw):
    from zeroi2v import create_video_model

    model = create_video_model(name, 4, 5, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters and head, so the merge changes weights
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _clip(model, b, seed=3):
    size = model.backbone.patch_embed.img_size
    return torch.randn(b, 3, model.num_frames, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,kw", EXPORT_FAMILIES)
def test_export_each_family_with_a_dynamic_batch(name, kw, tmp_path):
    """.pt2 and ONNX of the merged model, any batch size, equal to the torch model's output;
    the ONNX weights are inside the one .onnx file."""
    import onnxruntime as ort

    model = _small_video_model(name, kw)
    merged = merge_adapters(model)
    x1, x3 = _clip(model, 1), _clip(model, 3, seed=4)
    torch.export.save(export_program(model, x1, dynamic_batch=True), str(tmp_path / "m.pt2"))
    prog = torch.export.load(str(tmp_path / "m.pt2")).module()
    path = export_onnx(model, x1, tmp_path / "m.onnx", dynamic_batch=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]
    assert onnx_files(path) == [tmp_path / "m.onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in (x1, x3):
        with torch.no_grad():
            want = merged(x)
            assert rel_err(prog(x), want) <= 1e-5
        (got,) = sess.run(None, {"video": x.numpy()})
        assert got.shape == (x.shape[0], 5)
        assert rel_err(torch.from_numpy(got), want) <= 1e-4


def test_cli_export_dynamic_batch_one_file_and_sidecar(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    from zeroi2v.cli import main
    from zeroi2v.interop import export as export_mod

    model = _small_video_model("vit_small_patch16_224", dict(SMALL, img_size=32))
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        want = {b: merge_adapters(model)(_clip(model, b)) for b in (1, 2)}
    for fmt in ("onnx", "pt2"):
        out = tmp_path / fmt / f"m.{fmt}"
        assert main(["export", str(tmp_path / "model"), "--out", str(out), "--dynamic-batch"]) == 0
        text = capsys.readouterr().out
        assert f"-> {out} ({fmt}, input video (any, 3, 4, 32, 32)" in text, text
        assert [p.name for p in out.parent.iterdir()] == [out.name]  # one file, nothing beside
        for b in (1, 2):
            if fmt == "onnx":
                sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(sess.run(None, {"video": _clip(model, b).numpy()})[0])
            else:
                with torch.no_grad():
                    got = torch.export.load(str(out)).module()(_clip(model, b))
            assert rel_err(got, want[b]) <= 1e-4, (fmt, b)
    # past the one-file limit the weights go beside the file, and the command names that file
    monkeypatch.setattr(export_mod, "ONNX_ONE_FILE_BYTES", 0)
    out = tmp_path / "big" / "m.onnx"
    assert main(["export", str(tmp_path / "model"), "--out", str(out), "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    sidecars = onnx_files(out)[1:]
    assert sidecars and all(p.is_file() for p in sidecars)
    assert all(str(p) in text for p in sidecars) and "keep them in the same folder" in text
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"video": _clip(model, 2).numpy()})[0])
    assert rel_err(got, want[2]) <= 1e-4
    # a hybrid's example clip has the stem's 3 channels (not its patch projection's input)
    hybrid = _small_video_model("vit_tiny_r_s16_p8_224", dict(SMALL, img_size=32))
    hybrid.save_pretrained(tmp_path / "hybrid")
    assert main(["export", str(tmp_path / "hybrid"), "--out", str(tmp_path / "h.pt2")]) == 0
    assert "input video (1, 3, 4, 32, 32)" in capsys.readouterr().out
    with torch.no_grad():
        got = torch.export.load(str(tmp_path / "h.pt2")).module()(_clip(hybrid, 1))
        assert rel_err(got, merge_adapters(hybrid)(_clip(hybrid, 1))) <= 1e-5


def test_onnx_export_without_its_extra_is_one_line(tmp_path, capsys, monkeypatch):
    """Without onnx (a plain `pip install zeroi2v`), export says which extra to install, before
    loading the model; .pt2 needs no extra."""
    import sys

    from zeroi2v.cli import main

    model = _small_video_model("vit_small_patch16_224", dict(SMALL, img_size=32))
    model.save_pretrained(tmp_path / "model")
    for mod in ("onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, mod, None)  # importing it fails, as when not installed
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("zeroi2v export: error: ONNX export needs the onnx package")
    assert "pip install 'zeroi2v[onnx]'" in err and "pip install -e '.[onnx]'" in err
    assert not (tmp_path / "m.onnx").exists()
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "m.pt2")]) == 0


def test_the_test_extra_installs_the_onnx_extra():
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pip vendors the same parser
        from pip._vendor import tomli as tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = doc["project"]["optional-dependencies"]
    assert {"onnx", "onnxscript"} <= set(extras["onnx"]) <= set(extras["test"])
    assert "onnxruntime" in extras["test"]


def test_read_checkpoint_training_metadata_is_inert(tmp_path):
    from zeroi2v.interop import read_checkpoint, read_state_dict

    sd = {"w": torch.randn(3)}
    path = _save_official(sd, tmp_path / "ckpt.pth")
    obj = read_checkpoint(path)  # weights_only refuses MmengineMeta; no code from the file runs
    assert not isinstance(obj["meta"]["hub"], MmengineMeta)
    assert "placeholder" in repr(obj["meta"]["hub"])
    assert torch.equal(read_state_dict(path)["w"], sd["w"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


def test_check_state_dict_names_the_first_bad_key():
    """The one checker both importers use: missing, unexpected and wrong-shape keys, in the file's
    own names where the keys were converted."""
    from zeroi2v.safe_io import check_state_dict

    own = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "head.weight": torch.zeros(4, 2)}
    good = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    check_state_dict(own, good, "x.pt", optional=lambda k: k.startswith("head."))
    with pytest.raises(ValueError,
                       match=r"x\.pt does not match the model: missing key 'head\.weight' \(1 missing"):
        check_state_dict(own, good, "x.pt")
    with pytest.raises(ValueError, match=r"unexpected key 'extra' \(1 unexpected.*"):
        check_state_dict(own, {**good, "head.weight": torch.randn(4, 2), "extra": torch.randn(1)}, "x.pt")
    bad = {**good, "head.weight": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"the ZeroI2V architecture: key 'cls\.w' has shape \(4, 3\) in the "
                                         r"file, the model expects \(4, 2\) \(for 'head\.weight'\)"):
        check_state_dict(own, bad, "x.pt", what="the ZeroI2V architecture", source={"head.weight": "cls.w"})
