"""zeroi2v.data: annotations, samplers, decoding, transforms, dataset errors/flip, DataLoader, synthetic set.

Tiny videos only (<= 40 frames, <= 64 px) to stay fast on a shared CPU.
"""
import logging
import os

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from test_decoders import needs
from zeroi2v.data import (
    CLIP_MEAN,
    CLIP_STD,
    DenseSampler,
    UniformSampler,
    VideoDataset,
    VideoDecodeError,
    VideoTransform,
    build_dataset,
    collate_videos,
    count_video_frames,
    make_synthetic_dataset,
    read_annotations,
    read_video_frames,
    symmetric_label_map,
    synthetic_orders,
    write_video,
)


# ---------------------------------------------------------------------------------------- helpers
def _level_video(t=20, h=48, w=64, seed=0):
    """Frames with a distinct brightness per frame plus a smooth gradient (compresses well)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = (xx / w * 40 + yy / h * 20)[..., None]
    levels = rng.permutation(np.linspace(30, 190, t))
    colour = np.array([1.0, 0.8, 0.6])
    return np.clip(levels[:, None, None, None] * colour + grad, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    clips = {}
    for i, (t, h, w) in enumerate([(20, 48, 64), (16, 32, 32), (40, 32, 48), (24, 64, 32)]):
        frames = _level_video(t, h, w, seed=i)
        write_video(d / f"v{i}.mp4", frames)
        clips[f"v{i}.mp4"] = frames
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with open(d / "half.mp4", "wb") as f:  # a truncated real file
        f.write((d / "v0.mp4").read_bytes()[:200])
    return d, clips


def _ann(tmp_path, lines, name="ann.txt"):
    p = tmp_path / name
    p.write_text("".join(f"{rel} {lab}\n" for rel, lab in lines))
    return p


# ------------------------------------------------------------------------------------ annotations
def test_read_annotations(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("# comment\nsub/a.mp4 3\n\n  b.mp4\t0  \n")
    assert read_annotations(p) == [("sub/a.mp4", 3), ("b.mp4", 0)]
    for bad, lineno in [("a.mp4 1\nb.mp4\n", 2), ("a.mp4 1\nb.mp4 x\n", 2), ("a.mp4 1 2\n", 1),
                        ("a.mp4 -1\n", 1)]:
        p.write_text(bad)
        with pytest.raises(ValueError, match=f"a.txt:{lineno}:"):
            read_annotations(p)


# -------------------------------------------------------------------------------------- samplers
def test_dense_sampler_train_one_clip():
    s = DenseSampler(4, 8)  # span 25, starts 0..75
    assert (s.num_frames, s.num_clips) == (4, 1)
    idx = s(100, np.random.default_rng(0))
    o = np.random.default_rng(0).integers(0, 76, size=1)[0]
    np.testing.assert_array_equal(idx, [[o, o + 8, o + 16, o + 24]])
    assert idx.dtype == np.int64 and idx.shape == (1, 4)


def test_dense_sampler_train_multi_clip():
    s = DenseSampler(4, 2, num_clips=3)  # span 7, max_offset 93, parts of 94 // 3 = 31
    idx = s(100, np.random.default_rng(1))
    offs = np.arange(3) * 31 + np.random.default_rng(1).integers(0, 31, size=3)
    np.testing.assert_array_equal(idx, offs[:, None] + np.arange(4) * 2)


def test_dense_sampler_test_mode():
    s = DenseSampler(4, 8, num_clips=3, test_mode=True)  # max_offset 75 -> starts 0, 38 (round 37.5), 75
    a = s(100, np.random.default_rng(0))
    np.testing.assert_array_equal(a[:, 0], [0, 38, 75])
    np.testing.assert_array_equal(a, s(100, np.random.default_rng(123)))  # rng ignored
    one = DenseSampler(8, 16, test_mode=True)(300, None)  # K400 8x16x1: centred, start (300-113)//2
    np.testing.assert_array_equal(one, [93 + 16 * np.arange(8)])


def test_dense_sampler_short_video():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(DenseSampler(4, 4)(10, rng), [[0, 4, 8, 2]])            # loops
    np.testing.assert_array_equal(DenseSampler(4, 4, out_of_bound="clamp")(10, rng), [[0, 4, 8, 9]])
    np.testing.assert_array_equal(DenseSampler(3, 1, num_clips=2, test_mode=True)(1, rng), [[0, 0, 0]] * 2)
    for n in [1, 2, 5, 13, 64, 129, 1000]:  # always in range, right shape
        for s in [DenseSampler(8, 16, 3), DenseSampler(8, 16, 3, test_mode=True), DenseSampler(5, 3, 4)]:
            idx = s(n, rng)
            assert idx.shape == (s.num_clips, 8 if s.clip_len == 8 else 5)
            assert idx.min() >= 0 and idx.max() < n
    with pytest.raises(ValueError):
        DenseSampler(4, 4)(0, rng)


def test_uniform_sampler():
    s = UniformSampler(8, test_mode=True)
    assert (s.num_frames, s.num_clips) == (8, 1)
    np.testing.assert_array_equal(s(80, None), [[5, 15, 25, 35, 45, 55, 65, 75]])
    np.testing.assert_array_equal(s(5, None), [[0, 0, 1, 2, 2, 3, 4, 4]])  # fewer frames than segments
    np.testing.assert_array_equal(UniformSampler(4, True, num_clips=2)(40, None),
                                  [[2, 12, 22, 32], [7, 17, 27, 37]])
    tr = UniformSampler(8)
    idx = tr(80, np.random.default_rng(5))
    u = np.random.default_rng(5).random((1, 8))
    np.testing.assert_array_equal(idx, np.floor((np.arange(8) + u) * 10).astype(np.int64))
    assert ((idx // 10) == np.arange(8)).all()  # one frame from each segment
    rng = np.random.default_rng(0)
    for n in [1, 3, 8, 9, 31, 500]:
        i = tr(n, rng)
        assert i.shape == (1, 8) and i.min() >= 0 and i.max() < n and (np.diff(i) >= 0).all()


# -------------------------------------------------------------------------------------- decoding
def test_write_and_decode(video_dir):
    d, clips = video_dir
    for name, ref in clips.items():
        assert count_video_frames(d / name) == len(ref)
        got = read_video_frames(d / name)
        assert got.shape == ref.shape and got.dtype == np.uint8
        assert np.abs(got.astype(float) - ref).mean() < 4.0
    idx = np.array([[5, 1], [1, 19]])
    got = read_video_frames(d / "v0.mp4", idx)
    assert got.shape == (2, 2, 48, 64, 3)
    ref = clips["v0.mp4"]
    np.testing.assert_allclose(got.reshape(4, -1).mean(1), ref[idx.ravel()].reshape(4, -1).mean(1), atol=3)
    with pytest.raises(VideoDecodeError, match="out of range"):
        read_video_frames(d / "v0.mp4", [20])
    with pytest.raises(ValueError, match="even"):
        write_video(d / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))


def test_decoders_agree_and_errors_name_the_file(video_dir):
    needs("decord")
    d, _ = video_dir
    a = read_video_frames(d / "v0.mp4", [[3, 0], [7, 3]], decoder="decord").astype(int)
    b = read_video_frames(d / "v0.mp4", [[3, 0], [7, 3]], decoder="pyav").astype(int)
    assert a.shape == b.shape == (2, 2, 48, 64, 3) and np.abs(a - b).mean() < 2.0
    assert count_video_frames(d / "v2.mp4", decoder="pyav") == 40
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        read_video_frames(d / "corrupt.mp4", decoder="pyav")
    with pytest.raises(VideoDecodeError, match="not found"):
        read_video_frames(d / "nope.mp4")


# ------------------------------------------------------------------------------------ transforms
def test_clip_normalisation_values():
    assert CLIP_MEAN == (122.769, 116.74, 104.04) and CLIP_STD == (68.493, 66.63, 70.321)
    vals = np.array([0, 123, 255], dtype=np.uint8)
    frames = np.broadcast_to(vals, (1, 2, 16, 16, 3)).copy()
    out = VideoTransform(False, size=16)(frames)
    assert out.shape == (1, 3, 2, 16, 16) and out.dtype == torch.float32
    expect = (vals - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[0, :, 0, 5, 5].numpy(), expect, rtol=1e-5)
    assert torch.allclose(out, out[:, :, :1, :1, :1].expand_as(out))


def test_test_views_three_crops():
    rng = np.random.default_rng(0)
    wide = torch.from_numpy(rng.integers(0, 256, (2, 3, 24, 40, 3), dtype=np.uint8))  # 2 clips of 3 frames
    tf = VideoTransform(False, size=16, num_crops=3)
    out = tf(wide)
    assert out.shape == (6, 3, 3, 16, 16)
    resized = TF.resize(wide[1].permute(0, 3, 1, 2), 16, antialias=True)  # (T, C, 16, 27)
    w = resized.shape[-1]
    for k, left in enumerate([0, (w - 16) // 2, w - 16]):
        ref = ((resized[..., left:left + 16].float() - torch.tensor(CLIP_MEAN).view(3, 1, 1))
               / torch.tensor(CLIP_STD).view(3, 1, 1))
        torch.testing.assert_close(out[3 + k], ref.permute(1, 0, 2, 3))
    tall = torch.from_numpy(rng.integers(0, 256, (1, 2, 40, 24, 3), dtype=np.uint8))
    out = tf(tall)
    assert out.shape == (3, 3, 2, 16, 16)
    assert not torch.equal(out[0], out[2])  # crops move along the (vertical) long side
    centre = VideoTransform(False, size=16, num_crops=1)(tall)
    torch.testing.assert_close(centre[0], out[1])
    big = VideoTransform(False, size=16, test_short_side=20)(tall)  # resize to 20 first, then centre crop
    ref = TF.center_crop(TF.resize(tall[0].permute(0, 3, 1, 2), 20, antialias=True), [16, 16])
    torch.testing.assert_close(big[0], VideoTransform(False, size=16)(ref.permute(0, 2, 3, 1)[None])[0])


def test_train_transform_consistent_across_frames_and_seeded():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 20, 28, 3), dtype=np.uint8)
    clip = np.repeat(frame, 4, axis=0)  # 4 identical frames
    tf = VideoTransform(True, size=16, short_side=20, rand_augment=(7, 4), random_erasing=1.0)
    state = torch.get_rng_state()
    a = tf(clip, np.random.default_rng(1))
    assert torch.equal(state, torch.get_rng_state())  # global torch RNG untouched
    assert a.shape == (3, 4, 16, 16)
    for t in range(1, 4):  # same crop / RandAugment ops / erased box on every frame
        torch.testing.assert_close(a[:, t], a[:, 0])
    torch.testing.assert_close(tf(clip, np.random.default_rng(1)), a)
    assert not torch.equal(tf(clip, np.random.default_rng(2)), a)
    two = tf(np.stack([clip, clip]), np.random.default_rng(3))
    assert two.shape == (2, 3, 4, 16, 16)
    # forced flip with an identity-crop transform is an exact mirror
    plain = VideoTransform(True, size=16, short_side=None, rand_augment=None, scale=(1, 1), ratio=(1, 1))
    sq = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(plain(sq, 0, flip=True), plain(sq, 0, flip=False).flip(-1))
    with pytest.raises(ValueError):
        VideoTransform(False, num_crops=2)


# --------------------------------------------------------------------------------------- dataset
def test_dataset_shapes_train_and_test(video_dir, tmp_path):
    d, _ = video_dir
    ann = _ann(tmp_path, [("v0.mp4", 0), ("v1.mp4", 1), ("v2.mp4", 2)])
    tr = build_dataset(ann, d, num_frames=4, sampling="dense", frame_interval=3, train=True, size=16,
                       short_side=24, rand_augment=None)
    assert len(tr) == 3 and tr.num_classes == 3 and tr.samples[1] == (os.path.join(str(d), "v1.mp4"), 1)
    x, y = tr[2]
    assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32 and y == 2
    te = build_dataset(ann, d, num_frames=4, sampling="uniform", num_clips=2, train=False, size=16,
                       num_crops=3)
    x, y = te[0]
    assert x.shape == (6, 3, 4, 16, 16) and y == 0
    torch.testing.assert_close(te[0][0], x)  # test mode is deterministic
    with pytest.raises(ValueError, match="sampling"):
        build_dataset(ann, d, num_frames=4, sampling="nope", train=True)


def test_dataset_decodes_the_sampled_frames(video_dir, tmp_path):
    d, clips = video_dir
    ann = _ann(tmp_path, [("v2.mp4", 0)])
    ds = build_dataset(ann, d, num_frames=4, sampling="dense", frame_interval=5, train=False, size=32)
    x, _ = ds[0]
    idx = ds.sampler(40, None)[0]  # starts at (40 - 16) // 2 = 12
    np.testing.assert_array_equal(idx, [12, 17, 22, 27])
    mean_std = torch.tensor(CLIP_MEAN).view(3, 1), torch.tensor(CLIP_STD).view(3, 1)
    pix = x[0].reshape(3, 4, -1).mean(-1) * mean_std[1] + mean_std[0]          # per-frame channel means
    ref = torch.from_numpy(clips["v2.mp4"][idx, :, 8:40].astype(np.float32)).mean((1, 2)).T
    torch.testing.assert_close(pix, ref, atol=4.0, rtol=0)


def test_dataset_errors_skip_raise_drop(video_dir, tmp_path, caplog):
    d, _ = video_dir
    lines = [("v1.mp4", 0), ("missing.mp4", 1), ("corrupt.mp4", 2), ("half.mp4", 3), ("v0.mp4", 4)]
    kw = dict(num_frames=2, sampling="uniform", size=16)
    train_kw = dict(kw, train=True, short_side=16, rand_augment=None)
    raising = build_dataset(_ann(tmp_path, lines), d, on_error="raise", train=False, **kw)
    for i, name in [(1, "missing.mp4"), (2, "corrupt.mp4"), (3, "half.mp4")]:
        with pytest.raises(VideoDecodeError, match=name):
            raising[i]
    skipping = build_dataset(_ann(tmp_path, lines), d, on_error="skip", **train_kw)
    assert len(skipping) == 5  # len unchanged
    with caplog.at_level(logging.WARNING, logger="zeroi2v.data"):
        sample = skipping[1]
    assert sample[1] == 4 and sample.index == 4  # replaced by the next loadable index: 1 -> 2 -> 3 -> 4
    assert [os.path.basename(p) for p, _ in sample.skipped] == ["missing.mp4", "corrupt.mp4", "half.mp4"]
    assert "missing.mp4" in caplog.text and "corrupt.mp4" in caplog.text and "half.mp4" in caplog.text
    assert skipping[4][1] == 4 and skipping[0][1] == 0 and skipping[0].skipped == ()
    for mode in ("drop", "skip"):  # a test set never substitutes: skip drops there too
        dropping = build_dataset(_ann(tmp_path, lines), d, on_error=mode, train=False, **kw)
        video, label, report = collate_videos([dropping[i] for i in range(5)])
        assert video.shape == (2, 1, 3, 2, 16, 16) and label.tolist() == [0, 4]
        assert [s.index for s in report.dropped] == [1, 2, 3] and report.num_skipped == 3
    all_bad = build_dataset(_ann(tmp_path, [("missing.mp4", 0), ("corrupt.mp4", 1)]), d, **train_kw)
    with pytest.raises(RuntimeError, match="unreadable"):
        all_bad[0]
    with pytest.raises(ValueError, match="on_error"):
        build_dataset(_ann(tmp_path, lines), d, on_error="ignore", train=False, **kw)


def test_flip_label_swap(tmp_path):
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    frames[:, :, 8:] = 255  # bright right half: a flip moves it to the left
    write_video(tmp_path / "lr.mp4", frames)
    ann = _ann(tmp_path, [("lr.mp4", 0)] * 4 + [("lr.mp4", 2)] * 4)
    tf = VideoTransform(True, size=16, short_side=None, rand_augment=None, scale=(1, 1), ratio=(1, 1))
    ds = VideoDataset(ann, tmp_path, UniformSampler(2), tf, flip_label_map={0: 1})
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y = ds[i]
            flipped = bool(x[:, :, :, :8].mean() > x[:, :, :, 8:].mean())
            orig = 0 if i < 4 else 2
            assert y == ({0: 1, 1: 0}.get(orig, orig) if flipped else orig)
            seen.add((orig, flipped))
    assert seen == {(0, True), (0, False), (2, True), (2, False)}
    ds.set_epoch(1)
    a = [ds[i][1] for i in range(8)]
    assert a == [ds[i][1] for i in range(8)]  # (seed, epoch, index) -> same draw
    noflip = VideoDataset(ann, tmp_path, UniformSampler(2),
                          VideoTransform(True, size=16, short_side=None, rand_augment=None, flip=False),
                          flip_label_map={0: 1})
    assert [noflip[i][1] for i in range(8)] == [0] * 4 + [2] * 4
    assert symmetric_label_map({86: 87, 93: 94}) == {86: 87, 87: 86, 93: 94, 94: 93}
    with pytest.raises(ValueError):
        symmetric_label_map({1: 2, 2: 3})


def test_dataloader_two_workers(video_dir, tmp_path):
    d, _ = video_dir
    lines = [("v0.mp4", 0), ("v1.mp4", 1), ("v2.mp4", 2), ("v3.mp4", 3), ("corrupt.mp4", 4), ("v1.mp4", 5)]
    ds = build_dataset(_ann(tmp_path, lines), d, num_frames=4, sampling="uniform", train=True, size=16,
                       short_side=20, rand_augment=(7, 2))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0][0].shape == (3, 3, 4, 16, 16)
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 2, 3, 5, 5]  # corrupt index 4 -> next (5)
    assert all(torch.isfinite(b[0]).all() for b in batches)


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_orders_are_permutations_and_mirror_pairs():
    for t in (8, 9, 16):
        orders = synthetic_orders(t)
        assert len({tuple(o) for o in orders}) == 6
        for o in orders:
            assert sorted(o.tolist()) == list(range(t))
        for k in (0, 2, 4):  # mirrored class 2k has order T-1 - order(2k) = order(2k+1)
            np.testing.assert_array_equal(orders[k + 1], t - 1 - orders[k])


def test_synthetic_dataset(tmp_path):
    info = make_synthetic_dataset(tmp_path / "syn", num_classes=4, videos_per_class=4, num_frames=8, size=32,
                                  seed=0, val_fraction=0.25)
    assert info["classes"] == ["forward", "backward", "forward_back", "back_forward"]
    assert info["flip_label_map"] is None and info["flip"]  # a mirrored clip keeps its label
    train, val = read_annotations(info["train"]), read_annotations(info["val"])
    assert len(train) == 12 and len(val) == 4
    assert np.bincount([y for _, y in train]).tolist() == [3] * 4
    assert np.bincount([y for _, y in val]).tolist() == [1] * 4

    def groups(s):
        return {os.path.basename(p) for p, _ in s}

    assert not groups(train) & groups(val)
    videos = {}
    for rel, label in train + val:
        fr = read_video_frames(os.path.join(info["root"], rel)).astype(np.float32)
        assert fr.shape == (8, 32, 32, 3)
        videos[(os.path.basename(rel), label)] = fr
    orders = synthetic_orders(8)
    stats = np.zeros((4, 3))
    for (g, label), fr in videos.items():
        base = videos[(g, 0)]  # class 0 is the base order
        # same frames, reordered: decoded class-c video ~ base[order_c] (exact before compression)
        assert np.abs(fr - base[orders[label]]).mean() < 3.0
        stats[label] += fr.mean((0, 1, 2)) / 4
    # per-class mean frame statistics are equal (temporal order is the only difference) ...
    assert np.abs(stats - stats.mean(0)).max() < 1.0
    # ... while the order itself differs: class 0 vs 1 videos are far apart frame by frame
    diffs = [np.abs(videos[(g, 0)] - videos[(g, 1)]).mean() for g, y in videos if y == 0]
    assert min(diffs) > 5.0
    # the light's hue turns one way in class 0 and the other way in class 1: the mean colour of
    # consecutive frames rotates clockwise vs anticlockwise on the chroma plane
    def turn(fr):
        rgb = fr.mean((1, 2))
        z = (2 * rgb[:, 0] - rgb[:, 1] - rgb[:, 2]) + 1j * np.sqrt(3) * (rgb[:, 1] - rgb[:, 2])
        return np.sign(np.angle(z[1:] / z[:-1])).mean()
    for (g, label), fr in videos.items():
        if label in (0, 1):
            assert turn(fr) == (1.0 if label == 0 else -1.0), (g, label)
    ds = build_dataset(info["train"], info["root"], num_frames=8, sampling="uniform", train=True, size=28,
                       short_side=32, rand_augment=None, flip_label_map=info["flip_label_map"])
    x, y = ds[0]
    assert x.shape == (3, 8, 28, 28) and 0 <= y < 4
