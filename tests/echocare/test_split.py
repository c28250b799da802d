"""Leak-free train/val split and federated partitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from echocare.data import open_data, partition, split_train_val
from echocare.data.dedup import group_samples
from echocare.phantom import write_phantoms


def _keys(data) -> set[str]:
    return {s.key for s in data.samples}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """30 phantoms on disk plus, for two of them, an exact copy and a brightened, re-saved JPEG copy."""
    root = tmp_path_factory.mktemp("planted")
    write_phantoms(root, 30, "all", seed=5)
    originals = ["benign/phantom-linear-a-00000.png", "malignant/phantom-convex-b-00004.png"]
    for rel in originals:
        src = root / rel
        img = np.asarray(Image.open(src)).astype(np.int16)
        Image.open(src).save(src.with_name(src.stem + "-copy.png"))
        bright = np.clip(img * 1.08 + 6, 0, 255).astype(np.uint8)
        Image.fromarray(bright).save(src.with_name(src.stem + "-bright.jpg"), quality=90)
    return root, originals


def test_planted_duplicates_are_grouped_and_never_split(planted):
    root, originals = planted
    data = open_data(f"folder:{root}")
    assert len(data) == 34
    grouping = group_samples(data.samples)
    groups = [{grouping.samples[i].key for i in g} for g in grouping.content_groups()]
    for rel in originals:
        stem = rel[:-4]
        assert {rel, stem + "-copy.png", stem + "-bright.jpg"} in groups
    assert len(groups) == 2  # and nothing else: unrelated phantoms are not merged
    assert grouping.exact_duplicates == 2 and grouping.near_duplicate_pairs >= 4
    for seed in range(8):
        train, val = split_train_val(data, 0.3, seed=seed)
        assert _keys(train) | _keys(val) == _keys(data) and not _keys(train) & _keys(val)
        for g in groups:
            assert g <= _keys(train) or g <= _keys(val)


def test_split_is_deterministic_and_stratified():
    data = open_data("phantom:90?seed=1")
    a = split_train_val(data, 0.2, seed=3)
    b = split_train_val(data, 0.2, seed=3)
    c = split_train_val(data, 0.2, seed=4)
    assert [s.key for s in a[1].samples] == [s.key for s in b[1].samples]
    assert [s.key for s in a[1].samples] != [s.key for s in c[1].samples]
    val_counts = Counter(s.label for s in a[1].samples)
    assert val_counts == {"benign": 6, "malignant": 6, "normal": 6}
    assert len(a[0]) == 72
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(data, 1.0)


def test_explicit_groups_stay_together(hc18_root):
    data = open_data(f"hc18:{hc18_root}?limit=80&seed=2")
    train, val = split_train_val(data, 0.25, seed=0)
    train_groups, val_groups = {s.group for s in train.samples}, {s.group for s in val.samples}
    assert not train_groups & val_groups
    assert 0.15 < len(val) / len(data) < 0.35


def test_clip_frames_never_straddle_the_split(pocus_root):
    data = open_data(f"pocus:{pocus_root}?frames=2&limit=16&seed=0")
    train, val = split_train_val(data, 0.3, seed=1)
    assert not {s.group for s in train.samples} & {s.group for s in val.samples}


def test_busi_near_duplicates_measured_and_kept_together(busi_root):
    """BUSI: about 19% of images are near-duplicates (README). The grouping finds that many."""
    data = open_data(f"busi:{busi_root}")
    grouping = group_samples(data.samples)
    groups = grouping.content_groups()
    in_groups = sum(len(g) for g in groups)
    redundant = in_groups - len(groups)  # images beyond the first of each group
    assert 80 <= len(groups) <= 130 and max(len(g) for g in groups) <= 8
    assert 0.14 <= redundant / len(data) <= 0.26, (len(groups), in_groups, redundant)
    train, val = split_train_val(data, 0.2, seed=0)
    for g in groups:
        keys = {grouping.samples[i].key for i in g}
        assert keys <= _keys(train) or keys <= _keys(val)


def test_partition_iid_balances_sites_and_labels():
    data = open_data("phantom:60?seed=2")
    sites = partition(data, 3, "iid", seed=0)
    assert [len(s) for s in sites] == [20, 20, 20]
    for s in sites:  # 20 per class over 3 sites: 6 or 7 each
        assert sorted(Counter(x.label for x in s.samples).values()) in ([6, 7, 7], [6, 6, 7], [7, 7, 6])
    assert set().union(*map(_keys, sites)) == _keys(data) and sum(map(len, sites)) == len(data)


def _label_skew(sites) -> float:
    """Mean total-variation distance between each site's label distribution and the pooled one."""
    labels = ["benign", "malignant", "normal"]
    pooled = Counter(x.label for s in sites for x in s.samples)
    total = sum(pooled.values())
    out = []
    for s in sites:
        c = Counter(x.label for x in s.samples)
        out.append(0.5 * sum(abs(c[k] / len(s) - pooled[k] / total) for k in labels))
    return float(np.mean(out))


def test_partition_dirichlet_skews_labels_and_every_site_gets_data():
    data = open_data("phantom:90?seed=3")
    iid = partition(data, 4, "iid", seed=0)
    skewed = partition(data, 4, "dirichlet:0.3", seed=0)
    assert all(len(s) > 0 for s in skewed) and sum(map(len, skewed)) == 90
    assert _label_skew(skewed) > _label_skew(iid) + 0.15
    assert [s.key for s in partition(data, 4, "dirichlet:0.3", seed=0)[2].samples] == [s.key for s in skewed[2].samples]


def test_partition_by_device_gives_one_site_per_profile():
    data = open_data("phantom:30?profiles=linear-a,convex-b,linear-c")
    sites = partition(data, 3, "by-device")
    assert [{x.meta["profile"] for x in s.samples} for s in sites] == [{"convex-b"}, {"linear-a"}, {"linear-c"}]
    assert partition(data, None, "by-device")[0].samples == sites[0].samples
    with pytest.raises(ValueError, match="3 devices .*not 2 sites"):
        partition(data, 2, "by-device")


def test_partition_keeps_groups_on_one_site(planted):
    root, originals = planted
    data = open_data(f"folder:{root}")
    for scheme in ("iid", "dirichlet:0.5", "by-device"):
        sites = partition(data, 3, scheme, seed=1)
        for rel in originals:
            stem = rel[:-4]
            homes = [i for i, s in enumerate(sites) if {rel, stem + "-copy.png", stem + "-bright.jpg"} & _keys(s)]
            assert len(homes) == 1, (scheme, homes)


def test_partition_errors_are_clear(busi_root):
    data = open_data("phantom:9")
    with pytest.raises(ValueError, match="unknown scheme 'random'"):
        partition(data, 2, "random")
    with pytest.raises(ValueError, match="dirichlet needs a positive"):
        partition(data, 2, "dirichlet:x")
    with pytest.raises(ValueError, match="cannot fill 20 sites"):
        partition(data, 20, "iid")
    with pytest.raises(ValueError, match="no device information"):
        partition(open_data(f"busi:{busi_root}?limit=9"), 2, "by-device")
