"""Checkpoints never run code, and a bad one fails in one line naming the file, at every entry point.

The three entry points that read a checkpoint (`sazs-eval predict`, `sazs-eval run`,
`sazs-train run --resume`) are driven through their CLIs with a malicious file (a pickled
object whose ``__reduce__`` calls ``os.system``), a checkpoint of the old format (NumPy's
RNG state pickled), a truncated file, a bare state dict and weights of another
architecture.
"""

import ast
import os
import pickle
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from sazs.datasets.synthetic import make_voc
from sazs.eval import cli as eval_cli
from sazs.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_for_inference,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sazs.train import cli as train_cli

PROJECT = Path(__file__).resolve().parents[1]


def train_argv(voc, out):
    return [
        "run",
        "--dataset",
        "voc",
        "--data",
        str(voc),
        "--fold",
        "0",
        "--arch",
        "sazs-tiny",
        "--head-dim",
        "32",
        "--templates",
        "single",
        "--crop-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--workers",
        "0",
        "--spectral-weight",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic VOC and a 2-step tiny fold-0 checkpoint (no priors needed)."""
    root = tmp_path_factory.mktemp("ckptvoc")
    voc = make_voc(root, num_train=4, num_val=4, size=(56, 72), seed=3)
    assert train_cli.main(train_argv(voc, root / "run")) == 0
    return voc, root / "run" / "checkpoint.pt"


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def entry_points(voc, tmp_path):
    """Entry point name -> function(checkpoint path) -> exit code."""
    val_id = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    image = voc / "JPEGImages" / f"{val_id}.jpg"
    return {
        "predict": lambda ckpt: eval_cli.main(
            ["predict", str(image), "--classes", "cat", "--ckpt", str(ckpt), "--out", str(tmp_path / "pred")]
        ),
        "eval run": lambda ckpt: eval_cli.main(
            [
                "run",
                "--dataset",
                "voc",
                "--data",
                str(voc),
                "--folds",
                "0",
                "--ckpt",
                str(ckpt),
                "--fusion",
                "none",
                "--headline",
                "none",
                "--no-generalised",
                "--episodes",
                "2",
                "--draw",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path / "report"),
            ]
        ),
        # the very flags the checkpoint was trained with: only the file itself can be refused
        "train --resume": lambda ckpt: train_cli.main([*train_argv(voc, tmp_path / "resumed"), "--resume", str(ckpt)]),
    }


ENTRY_POINTS = ("predict", "eval run", "train --resume")


def one_error_line(err: str, path: Path) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and len(lines[0]) < 700, lines[0]
    return lines[0]


def good_checkpoint(ckpt_path) -> dict:
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_checkpoint_never_runs_its_payload(trained, tmp_path, capsys, entry):
    voc, ckpt_path = trained
    # the payload is live: plain unpickling runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({**good_checkpoint(ckpt_path), "config": _Payload(marker)}, evil)
    capsys.readouterr()
    assert entry_points(voc, tmp_path)[entry](evil) == 2
    line = one_error_line(capsys.readouterr().err, evil)
    assert "refusing checkpoint" in line and "posix.system" in line and "could run code" in line
    assert not marker.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", ["old format", "truncated", "bare state dict", "wrong architecture"])
def test_a_bad_checkpoint_fails_in_one_line_naming_the_file(trained, tmp_path, capsys, entry, case):
    voc, ckpt_path = trained
    good = good_checkpoint(ckpt_path)
    bad = tmp_path / f"{case.replace(' ', '-')}.pt"
    if case == "old format":  # sazs-train before weights_only: NumPy's and Python's RNG states as objects
        torch.save(
            {
                **good,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            },
            bad,
        )
        expected = "older sazs-train"
    elif case == "truncated":
        data = ckpt_path.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = "truncated"
    elif case == "bare state dict":
        torch.save(good["model"], bad)
        expected = "bare state dict"
    else:  # the config says sazs-tiny, one tensor has another shape
        key, value = next((k, v) for k, v in good["model"].items() if v.ndim >= 1)
        weights = {**good["model"], key: torch.zeros(value.shape[0] + 3, *value.shape[1:])}
        torch.save({**good, "model": weights}, bad)
        expected = "do not fit the sazs-tiny model"
    capsys.readouterr()
    assert entry_points(voc, tmp_path)[entry](bad) == 2
    assert expected in one_error_line(capsys.readouterr().err, bad)


def test_the_checkpoint_a_run_writes_loads_with_weights_only(trained):
    _, ckpt_path = trained
    ckpt = load_checkpoint(ckpt_path, need=("config", "model", "step", "optimizer", "scheduler", "rng"))
    assert isinstance(ckpt["config"], dict) and ckpt["step"] == 2
    model, _, again = load_for_inference(ckpt_path, "cpu")
    assert again["step"] == 2 and not model.training


def test_rng_state_round_trips_exactly_as_plain_values():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state
    state = rng_state()
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want


def test_save_refuses_what_weights_only_loading_would_refuse(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['step'\] \(numpy.float64\)"):
        save_checkpoint({"step": np.float64(1.0)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    save_checkpoint({"step": 1, "w": torch.zeros(2), "names": ["a"], "size": torch.Size([2])}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt", need=("step",))["step"] == 1


def test_a_checkpoint_that_is_not_a_run_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a sazs-train checkpoint"):
        load_checkpoint(path)
    torch.save({"config": {"model": {}}, "model": {}}, path)
    with pytest.raises(CheckpointError, match="not a sazs-train run config"):
        load_checkpoint(path)


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for path in sorted(PROJECT.rglob("*.py")):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(PROJECT)}:{node.lineno}", ok))
    assert calls and [c for c, ok in calls if not ok] == []
