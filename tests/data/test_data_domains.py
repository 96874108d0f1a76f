"""Office-Home and DomainNet: domain folders and split lists into one shared label head."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mtl.config import AugmentConfig, DataConfig
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    benchmark_taskset,
    load_splits,
    make_loader,
    prepare,
)
from mtl.data.domains import DOMAINNET_DOMAINS, OFFICE_HOME_DOMAINS
from mtl.data.synthetic_layouts import write_domainnet, write_office_home


def _cfg(benchmark, root, **kw) -> DataConfig:
    return DataConfig(benchmark=benchmark, root=str(root), image_size=[8, 10], **kw)


def _edit_line(path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def office_home(tmp_path):
    return tmp_path, write_office_home(tmp_path, per_class=3, used_classes=2)


@pytest.fixture
def domainnet(tmp_path):
    return tmp_path, write_domainnet(tmp_path, per_class=3, used_classes=2)


def test_tasksets_share_one_label_head(tmp_path):
    for name, domains, classes in [
        ("office_home", OFFICE_HOME_DOMAINS, 65),
        ("domainnet", DOMAINNET_DOMAINS, 345),
    ]:
        taskset = benchmark_taskset(_cfg(name, tmp_path))  # reads no data
        assert taskset.domains == domains and taskset.image_size == (8, 10)
        assert [(h.name, h.kind, h.num_outputs) for h in taskset.heads] == [
            ("label", "classification", classes)
        ]


def test_office_home_seeded_split_per_domain(office_home):
    root, written = office_home
    cfg = _cfg("office_home", root)
    prepare(cfg)
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    # 6 images per domain: round(0.1 * 6) = 1 held out, drawn per domain.
    assert (len(train), len(val)) == (20, 4)
    assert np.bincount(val.rows["domain"]).tolist() == [1, 1, 1, 1]
    for split in (train, val):
        rows = zip(split.rows["image"], split.rows["label"], split.rows["domain"], strict=True)
        for path, label, code in rows:
            domain, folder, _ = str(path).split("/")
            assert domain == OFFICE_HOME_DOMAINS[code]
            assert label == int(folder.removeprefix("class_"))  # sorted folder position
    again = load_splits(cfg, benchmark_taskset(cfg))[1]
    assert list(again.rows["image"]) == list(val.rows["image"])
    draws = {
        tuple(
            load_splits(_cfg("office_home", root, seed=s), benchmark_taskset(cfg))[1].rows["image"]
        )
        for s in range(4)
    }
    assert len(draws) > 1  # data.seed draws the held-out images


def test_office_home_uses_split_lists_when_given(tmp_path):
    written = write_office_home(tmp_path, per_class=3, used_classes=2, lists=True)
    cfg = _cfg("office_home", tmp_path)
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    tests = [
        path for d in OFFICE_HOME_DOMAINS for i, (path, _) in enumerate(written[d]) if i % 3 == 2
    ]
    assert sorted(map(str, val.rows["image"])) == sorted(tests)
    assert (len(train), len(val)) == (16, 8)


def test_office_home_batches_mix_the_chosen_domains(office_home):
    root, _ = office_home
    cfg = _cfg("office_home", root, augment=AugmentConfig(enabled=True))
    taskset = benchmark_taskset(cfg).subset(["Product", "Art"])
    assert taskset.domains == ("Art", "Product")
    train, val = load_splits(cfg, taskset)
    assert set(train.rows["domain"].tolist()) == {0, 1} and len(val) == 2
    batch = next(iter(make_loader(train, 6, train=True, seed=0)))
    assert batch["image"].shape == (6, 3, 8, 10) and batch["image"].dtype == torch.float32
    assert batch["domain"].dtype == torch.int64 and set(batch["domain"].tolist()) <= {0, 1}
    assert batch["targets"]["label"].dtype == torch.int64
    assert set(batch["targets"]["label"].tolist()) <= {0, 1}


def test_office_home_missing_domain_is_named(office_home):
    root, _ = office_home
    shutil.rmtree(root / "Clipart")
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg("office_home", root))
    assert str(root / "Clipart") in str(err.value) and "data.root" in str(err.value)


def test_office_home_nested_one_folder_too_deep_names_the_expected_folder(tmp_path):
    write_office_home(tmp_path / "OfficeHomeDataset_10072016", per_class=1, used_classes=1)
    with pytest.raises(DatasetMissingError, match="set data.root") as err:
        prepare(_cfg("office_home", tmp_path))
    assert str(tmp_path / "Art") in str(err.value)


def test_office_home_class_folders_must_agree(office_home):
    root, _ = office_home
    (root / "Product" / "class_00").rename(root / "Product" / "Other")
    with pytest.raises(DatasetCorruptError, match="Product has other class folders") as err:
        prepare(_cfg("office_home", root))
    assert "Other" in str(err.value) and "class_00" in str(err.value)


def test_office_home_needs_65_classes(office_home):
    root, _ = office_home
    shutil.rmtree(root / "Art" / "class_64")
    with pytest.raises(DatasetCorruptError, match="64 class folders, Office-Home has 65"):
        prepare(_cfg("office_home", root))


def test_office_home_half_a_list_pair_is_named(office_home):
    root, _ = office_home
    (root / "Art_train.txt").write_text("Art/class_00/Art_000_000000.jpg 0\n")
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg("office_home", root))
    assert str(root / "Art_test.txt") in str(err.value) and "or neither" in str(err.value)


def test_office_home_list_label_out_of_range_names_line(tmp_path):
    write_office_home(tmp_path, per_class=3, used_classes=2, lists=True)
    _edit_line(tmp_path / "Product_train.txt", 2, lambda s: s.rsplit(" ", 1)[0] + " 65")
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg("office_home", tmp_path))
    assert f"{tmp_path / 'Product_train.txt'}, line 2" in str(err.value)
    assert "[0, 65)" in str(err.value)


def test_office_home_corrupt_image_is_named_by_prepare(office_home):
    root, _ = office_home
    cfg = _cfg("office_home", root)
    first = root / str(load_splits(cfg, benchmark_taskset(cfg))[0].rows["image"][0])
    first.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetCorruptError) as err:
        prepare(cfg)
    assert str(first) in str(err.value)


def test_domainnet_train_and_test_lists(domainnet):
    root, written = domainnet
    cfg = _cfg("domainnet", root)
    prepare(cfg)
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    assert (len(train), len(val)) == (24, 12)
    assert np.bincount(train.rows["domain"]).tolist() == [4] * 6
    expected = sorted(item for d in DOMAINNET_DOMAINS for item in written[d]["test"])
    served = zip(map(str, val.rows["image"]), val.rows["label"].tolist(), strict=True)
    assert sorted(served) == expected
    for path, code in zip(val.rows["image"], val.rows["domain"], strict=True):
        assert str(path).startswith(DOMAINNET_DOMAINS[code] + "/")
    assert len(set(val.rows["domain"][:6].tolist())) > 2  # val is served in a seeded order
    batch = next(iter(make_loader(val, 12, train=False)))
    assert batch["targets"]["label"].tolist() == val.rows["label"].tolist()
    assert batch["domain"].tolist() == val.rows["domain"].tolist()


def test_domainnet_subset_reindexes_domains(domainnet):
    root, _ = domainnet
    cfg = _cfg("domainnet", root)
    taskset = benchmark_taskset(cfg).subset(["sketch", "real"])
    train, val = load_splits(cfg, taskset)
    assert taskset.domains == ("real", "sketch")
    assert train.rows["domain"].tolist() == [0] * 4 + [1] * 4 and len(val) == 4
    assert all(str(p).startswith(("real/", "sketch/")) for p in train.rows["image"])


@pytest.mark.parametrize("missing", ["quickdraw", "sketch_test.txt", "clipart_train.txt"])
def test_domainnet_missing_folder_or_list_is_named(domainnet, missing):
    root, _ = domainnet
    path = root / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg("domainnet", root))
    assert str(path) in str(err.value) and "data.root" in str(err.value)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda s: s.rsplit(" ", 1)[0] + " 345", "[0, 345)"),
        (lambda s: s.rsplit(" ", 1)[0] + " -1", "[0, 345)"),
        (lambda s: s.rsplit(" ", 1)[0], "'<relative path> <label>'"),
        (lambda s: s.replace("painting/", "real/", 1), "is not under painting/"),
    ],
)
def test_domainnet_bad_list_line_is_named(domainnet, edit, fragment):
    root, _ = domainnet
    _edit_line(root / "painting_train.txt", 3, edit)
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg("domainnet", root))
    assert f"{root / 'painting_train.txt'}, line 3" in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("lists", [False, True])
def test_listed_image_missing_is_named_with_its_list(tmp_path, lists):
    if lists:
        written = write_office_home(tmp_path, per_class=3, used_classes=2, lists=True)
        cfg, listed = _cfg("office_home", tmp_path), tmp_path / "Clipart_test.txt"
        image = tmp_path / written["Clipart"][2][0]
    else:
        written = write_domainnet(tmp_path, per_class=3, used_classes=2)
        cfg, listed = _cfg("domainnet", tmp_path), tmp_path / "real_train.txt"
        image = tmp_path / written["real"]["train"][1][0]
    image.unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(cfg)
    assert f"{image} is missing, but {listed} lists it" in str(err.value)


def test_domainnet_corrupt_image_is_named_by_prepare(domainnet):
    root, written = domainnet
    first_train = root / written["clipart"]["train"][0][0]
    first_train.write_bytes(b"garbage")
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg("domainnet", root))
    assert str(first_train) in str(err.value)
