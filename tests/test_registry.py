"""core.registry: one pattern for every name-chosen thing."""

import pytest

from sazs.core.registry import Registry


def test_register_lookup_and_order():
    reg: Registry = Registry("solver")

    @reg.register("b", help="second letter", gpu=True)
    def b():
        return "B"

    reg.add("a", lambda: "A", help="first letter")
    assert reg.names() == ["b", "a"] and list(reg) == ["b", "a"] and len(reg) == 2
    assert reg["b"]() == "B" and reg["a"]() == "A" and "a" in reg and "c" not in reg
    assert reg.entry("b").meta == {"gpu": True}
    assert reg.help("eigen-solver") == "eigen-solver: b (second letter), a (first letter)"


def test_unknown_name_lists_the_valid_ones_and_duplicates_are_refused():
    reg: Registry = Registry("fusion")
    reg.add("none", None)
    reg.add("project", None)
    with pytest.raises(ValueError, match=r"unknown fusion 'x'; choose from \['none', 'project'\]"):
        reg["x"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("none", None)
    assert reg.check("project") == "project"


def test_zero_shot_benchmarks_are_one_card_each():
    from sazs.datasets.zeroshot import BENCHMARKS, benchmark, benchmark_named, zero_shot_split

    assert BENCHMARKS.names() == ["voc", "coco", "camvid"]
    voc = benchmark("voc")
    assert (voc.name, voc.title, voc.num_folds, voc.sampling, voc.background) == (
        "pascal-5i",
        "PASCAL-5i",
        4,
        "cycle",
        True,
    )
    assert voc.unseen(2) == (11, 12, 13, 14, 15) and zero_shot_split("voc", 2).unseen == voc.unseen(2)
    assert benchmark_named("coco-20i").sampling == "class-uniform" and benchmark_named("camvid-11").sampling is None
    assert zero_shot_split("camvid", 0).background is False and benchmark("camvid").num_folds == 3
    with pytest.raises(ValueError, match=r"no zero-shot benchmark for dataset 'davis'; choose from \['voc'"):
        benchmark("davis")
