"""Protocols: HSNet split lists, the generation rule on synthetic layouts, deterministic episodes."""

import pickle
from collections import Counter

import numpy as np
import pytest

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.datasets.synthetic import make_coco, make_voc
from sazs.datasets.zeroshot import coco20i_unseen, parse_folds, zero_shot_split
from sazs.eval import splits
from sazs.eval.episodes import ProtocolConfig, fold_episodes, sample_episodes
from sazs.eval.splits import (
    Episode,
    coco_image_id,
    generate_split_list,
    hsnet_list_path,
    parse_split_lines,
    read_coco_pickle,
    read_split_list,
    scan_labels,
    write_split_list,
)


@pytest.fixture(scope="module")
def voc_val(tmp_path_factory):
    root = make_voc(tmp_path_factory.mktemp("voc"), num_train=2, num_val=12, size=(48, 64), seed=3)
    return build_dataset(DatasetConfig(name="voc", root=str(root), split="val"))


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory):
    root = make_coco(tmp_path_factory.mktemp("coco"), num_train=2, num_val=30, size=(48, 64), seed=1)
    return build_dataset(DatasetConfig(name="coco", root=str(root), split="val"))


def brute_force_pairs(dataset):
    pairs = []
    for id_ in dataset.ids:
        mask = dataset.load_mask(id_)
        pairs += [(id_, int(c)) for c in sorted(set(np.unique(mask).tolist()) - {0, 255})]
    return pairs


@pytest.mark.parametrize("name", ["voc_val", "coco_val"])
def test_generated_lists_follow_the_rule(name, request):
    dataset = request.getfixturevalue(name)
    counts = scan_labels(dataset)
    assert list(counts) == dataset.ids
    pairs = brute_force_pairs(dataset)
    everything = []
    for fold in range(4):
        split = zero_shot_split(dataset.name, fold)
        entries = generate_split_list(counts, split.unseen)
        assert all(e.label in split.unseen for e in entries)
        # dataset order, classes ascending within an image: the brute-force pairs restricted to the fold
        assert [(e.image_id, e.label) for e in entries] == [p for p in pairs if p[1] in split.unseen]
        everything += [(e.image_id, e.label) for e in entries]
    assert sorted(everything) == sorted(pairs)  # the folds partition the classes
    # min_pixels drops the small ones
    smallest = min(n for c in counts.values() for n in c.values())
    fewer = generate_split_list(counts, range(1, 81), min_pixels=smallest + 1)
    assert len(fewer) < len(generate_split_list(counts, range(1, 81)))


def test_coco_crowd_pixels_do_not_make_an_episode(coco_val):
    counts = scan_labels(coco_val)
    crowded = [i for i in coco_val.ids if (coco_val.load_mask(i) == 255).any()]  # the synthetic COCO has one
    assert len(crowded) == 1
    assert 255 not in counts[crowded[0]] and 0 not in counts[crowded[0]] and counts[crowded[0]]


def test_hsnet_text_format_round_trip(voc_val, coco_val, tmp_path):
    lines = parse_split_lines("2007_000033__01\n2008_001234__15\n\n", benchmark="pascal-5i")
    assert lines == [Episode("2007_000033", 1), Episode("2008_001234", 15)]
    coco = parse_split_lines("val2014/COCO_val2014_000000000139.jpg__01\n", benchmark="coco-20i")
    assert coco == [Episode("139", 1)]
    with pytest.raises(ValueError, match=r"x.txt:2: expected '<image>__<class>'"):
        parse_split_lines("2007_000033__01\n2007_000033_01\n", benchmark="pascal-5i", source="x.txt")
    for dataset, bench, folder in ((voc_val, "pascal-5i", "pascal"), (coco_val, "coco-20i", "coco")):
        counts = scan_labels(dataset)
        for fold in range(4):
            entries = generate_split_list(counts, zero_shot_split(dataset.name, fold).unseen)
            path = write_split_list(entries, tmp_path / folder / "val" / f"fold{fold}.txt")
            assert hsnet_list_path(tmp_path, bench, fold) == path
            assert read_split_list(path, bench) == entries
    assert (tmp_path / "pascal" / "val" / "fold0.txt").read_text().splitlines()[0].count("__") == 1


def test_coco_image_ids():
    assert coco_image_id("val2014/COCO_val2014_000000000139.jpg") == "139"
    assert coco_image_id("000000581929.jpg") == "581929" and coco_image_id("42") == "42"
    with pytest.raises(ValueError, match="COCO image id"):
        coco_image_id("cat.jpg")


class _Evil:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_coco_pickle_lists_are_read_without_running_code(tmp_path, capsys):
    good = tmp_path / "fold0.pkl"
    names = {
        4: ["val2014/COCO_val2014_000000000042.jpg"],
        0: ["val2014/COCO_val2014_000000000139.jpg", "val2014/COCO_val2014_000000000007.jpg"],
    }
    good.write_bytes(pickle.dumps(names))
    assert read_coco_pickle(good) == [Episode("139", 1), Episode("7", 1), Episode("42", 5)]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({0: [_Evil()]}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        read_split_list(evil, "coco-20i")
    assert "a pickle ran code" not in capsys.readouterr().out
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"person": ["x_1.jpg"]}))
    with pytest.raises(ValueError, match="0-based COCO-20i class id"):
        read_coco_pickle(bad)
    # HSNet folder layout: .pkl is found when there is no .txt
    (tmp_path / "coco" / "val").mkdir(parents=True)
    (tmp_path / "coco" / "val" / "fold2.pkl").write_bytes(good.read_bytes())
    assert hsnet_list_path(tmp_path, "coco-20i", 2).suffix == ".pkl"
    with pytest.raises(FileNotFoundError, match="no pascal-5i split list for fold 1"):
        hsnet_list_path(tmp_path, "pascal-5i", 1)


def _shared_nest(depth, make=list):
    """A structure of 2**depth leaves that pickles in a few hundred bytes (each level shares the one below)."""
    x = make()
    for _ in range(depth):
        x = make((x, x))
    return x


@pytest.mark.parametrize("case", ["class value", "inside the names", "top level", "tuple key"])
def test_a_tiny_pickle_of_shared_nested_containers_is_refused_at_once(tmp_path, case):
    """A pickle of ~200 bytes used to expand to 2**22 leaves (a 38 MB error line); now it is
    refused by its opcodes, before decoding, with a short message naming the file."""
    obj = {
        "class value": {0: _shared_nest(22)},
        "inside the names": {0: ["val2014/COCO_val2014_000000000139.jpg", _shared_nest(22)]},
        "top level": _shared_nest(22),
        "tuple key": {_shared_nest(22, tuple): ["a_1.jpg"]},  # hashing it alone takes 2**22 steps
    }[case]
    path = tmp_path / "fold0.pkl"
    path.write_bytes(pickle.dumps(obj))
    assert path.stat().st_size < 600
    with pytest.raises(ValueError) as info:
        read_split_list(path, "coco-20i")
    msg = str(info.value)
    assert str(path) in msg and len(msg) < 400, msg[:400]
    assert ("nested deeper than a dict of lists" in msg) or ("TUPLE has no place" in msg), msg


def test_split_list_size_and_entry_bounds(tmp_path, monkeypatch):
    # a list of 30 000 names shared by all 80 classes: 2.4 million entries from a 60 kB file
    shared = ["val2014/COCO_val2014_000000000139.jpg"] * 30_000
    many = tmp_path / "many.pkl"
    many.write_bytes(pickle.dumps({c: shared for c in range(80)}))
    assert many.stat().st_size < 100_000
    with pytest.raises(ValueError, match=f"{many}: more than 2000000 entries"):
        read_coco_pickle(many)
    # a file larger than any split list is refused before it is read (sparse: no disk used)
    for name in ("big.pkl", "big.txt"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(splits.MAX_SPLIT_LIST_BYTES + 1)
        with pytest.raises(ValueError, match=f"{tmp_path / name} is 16 MiB, larger than any HSNet split list"):
            read_split_list(tmp_path / name, "coco-20i")
    # the text format is bounded too (checked while parsing), and a long line is not echoed whole
    monkeypatch.setattr(splits, "MAX_SPLIT_LIST_ENTRIES", 3)
    with pytest.raises(ValueError, match="more than 3 entries"):
        parse_split_lines("a__01\nb__01\nc__01\nd__01\n", benchmark="pascal-5i", source="fold0.txt")
    with pytest.raises(ValueError) as info:
        parse_split_lines("x" * 100_000 + "__01\n", benchmark="pascal-5i", source="fold0.txt")
    assert len(str(info.value)) < 200


def test_a_split_list_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "fold0.txt"
    path.write_bytes(b"2007_000033__01\n2007_\xff00042__02\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text \(byte 0xff\).*re-save it as UTF-8"):
        read_split_list(path, "pascal-5i")


def test_pickle_names_must_be_short_strings(tmp_path):
    path = tmp_path / "fold0.pkl"
    for names, expected in (
        ([b"a_1.jpg"], "BINBYTES"),
        ([["a_1.jpg"]], "nested deeper"),
        (["9" * 5000], "expected image names"),
        ([2**70], "expected image names"),
    ):
        path.write_bytes(pickle.dumps({0: names}))
        with pytest.raises(ValueError) as info:
            read_coco_pickle(path)
        assert expected in str(info.value) and len(str(info.value)) < 400, str(info.value)[:400]
    path.write_bytes(pickle.dumps({0: [139, "val2014/COCO_val2014_000000000007.jpg"]}, protocol=0))
    assert read_coco_pickle(path) == [Episode("139", 1), Episode("7", 1)]


def test_cycle_rule_is_hsnet_and_deterministic():
    entries = [Episode(f"im{i}", 1 + i % 5) for i in range(3)]
    assert sample_episodes(entries, 7, rule="cycle") == [entries[j % 3] for j in range(7)]
    long = [Episode(f"im{i}", 1) for i in range(50)]
    a = sample_episodes(long, 10, rule="cycle", seed=0)
    assert a == sample_episodes(long, 10, rule="cycle", seed=0)
    assert a != sample_episodes(long, 10, rule="cycle", seed=1)
    assert len(set(a)) == 10 and [long.index(e) for e in a] == sorted(long.index(e) for e in a)  # list order kept
    with pytest.raises(ValueError, match="empty"):
        sample_episodes([], 5, rule="cycle")
    with pytest.raises(ValueError, match="unknown episode rule"):
        sample_episodes(entries, 5, rule="shuffle")


def test_class_uniform_rule_balances_classes():
    entries = [Episode(f"a{i}", 1) for i in range(90)] + [Episode(f"b{i}", 5) for i in range(10)]
    eps = sample_episodes(entries, 2000, rule="class-uniform", seed=0, fold=0)
    assert eps == sample_episodes(entries, 2000, rule="class-uniform", seed=0, fold=0)
    assert eps != sample_episodes(entries, 2000, rule="class-uniform", seed=0, fold=1)
    per_class = Counter(e.label for e in eps)
    assert set(per_class) == {1, 5} and 900 < per_class[5] < 1100  # classes equally likely, not images
    assert len({e for e in eps if e.label == 5}) == 10


def test_fold_episodes_generated_and_read(voc_val, tmp_path):
    counts = scan_labels(voc_val)
    cfg = ProtocolConfig(episodes=25)
    gen = fold_episodes("voc", 0, cfg, dataset_ids=voc_val.ids, label_counts=counts)
    assert len(gen.episodes) == 25 and gen.rule == "cycle" and gen.source.startswith("generated")
    assert {e.label for e in gen.episodes} <= set(zero_shot_split("voc", 0).unseen)
    d = gen.describe()
    assert d["episodes"] == 25 and d["list_entries"] == len(gen.entries) and sum(d["episodes_per_class"].values()) == 25
    assert sum(gen.counts().values()) == 25
    write_split_list(gen.entries, tmp_path / "pascal" / "val" / "fold0.txt")
    read = fold_episodes("voc", 0, ProtocolConfig(episodes=25, splits_dir=str(tmp_path)), dataset_ids=voc_val.ids)
    assert read.episodes == gen.episodes and read.source.endswith("fold0.txt")
    # a list naming images the dataset does not have, or classes the fold does not hold out, is refused
    (tmp_path / "pascal" / "val" / "fold1.txt").write_text("2099_000001__06\n")
    with pytest.raises(ValueError, match="not in the validation split"):
        fold_episodes("voc", 1, ProtocolConfig(splits_dir=str(tmp_path)), dataset_ids=voc_val.ids)
    (tmp_path / "pascal" / "val" / "fold1.txt").write_text(f"{voc_val.ids[0]}__01\n")
    with pytest.raises(ValueError, match="not unseen in pascal-5i fold 1"):
        fold_episodes("voc", 1, ProtocolConfig(splits_dir=str(tmp_path)), dataset_ids=voc_val.ids)
    with pytest.raises(ValueError, match="needs the label counts"):
        fold_episodes("voc", 0, cfg, dataset_ids=voc_val.ids)


def test_coco_folds_use_the_class_uniform_rule(coco_val):
    counts = scan_labels(coco_val)
    for fold in range(4):
        fe = fold_episodes("coco", fold, ProtocolConfig(episodes=40), dataset_ids=coco_val.ids, label_counts=counts)
        assert fe.rule == "class-uniform" and len(fe.episodes) == 40
        assert {e.label for e in fe.episodes} <= set(coco20i_unseen(fold))


def test_parse_folds_and_config():
    assert parse_folds("all") == (0, 1, 2, 3) and parse_folds("2,0") == (0, 2) and parse_folds("1 3") == (1, 3)
    assert parse_folds([3, 3]) == (3,)
    for bad in ("4", "x", ""):
        with pytest.raises(ValueError):
            parse_folds(bad)
    with pytest.raises(ValueError, match="episodes"):
        ProtocolConfig(episodes=0)
    with pytest.raises(ValueError, match="unknown episode rule"):
        ProtocolConfig(sampling="random")
    assert ProtocolConfig().rule("pascal-5i") == "cycle" and ProtocolConfig().rule("coco-20i") == "class-uniform"
    assert ProtocolConfig(sampling="cycle").rule("coco-20i") == "cycle"
