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
