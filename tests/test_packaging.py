"""The `src/sazs` package installs editable and as a wheel; nothing is importable from the repository root."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_namespace():
    import sazs.eval
    import sazs.pipeline.cli
    import sazs.stores.writer
    import sazs.train

    src = ROOT / "src" / "sazs"
    assert Path(sazs.pipeline.cli.__file__).parent == src / "pipeline"
    assert Path(sazs.stores.writer.__file__).parent == src / "stores"
    assert Path(sazs.train.__file__).parent == src / "train"
    assert Path(sazs.eval.__file__).parent == src / "eval"


def test_the_repository_root_shadows_no_installed_package():
    """Run from the root (as make and pytest do), `datasets` is HuggingFace's or absent, never ours."""
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('datasets'); print(s and s.origin)"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert not out.startswith(str(ROOT / "datasets")), out


@pytest.mark.slow
def test_built_wheel_contains_and_imports_the_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sazs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "sazs/pipeline/cli.py",
        "sazs/features/extractors.py",
        "sazs/model/model.py",
        "sazs/quality/cli.py",
        "sazs/segments/refine.py",
        "sazs/stores/writer.py",
        "sazs/train/__init__.py",
        "sazs/eval/__init__.py",
    ):
        assert module in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sazs-priors = sazs.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S: no site-packages, so the editable finder cannot answer; the import must come from the wheel.
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            # modules that import no third-party package (-S has none)
            "import sazs.core.host as m, sazs.pipeline as p; print(m.__file__, p.__file__)",
        ],
        env={"PYTHONPATH": str(target)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.count(str(target)) == 2
