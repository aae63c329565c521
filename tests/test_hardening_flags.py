"""Numbers on the command line are checked where they are typed, and numerical trouble later
stops a run (training) or fails one image (the eigensolver) instead of crashing or saving junk.

``type=float`` accepts nan, inf and 1e300: every float flag of the four CLIs goes through
:func:`sazs.core.argtypes.number` (finite, in a range), so ``--lr nan``, ``--calibration inf``
or ``--global-weight 1e300`` end with argparse's one-line usage error and exit 2.
"""

import re
from pathlib import Path

import pytest
from scipy.sparse.linalg import ArpackError
from test_checkpoint_safety import train_argv

from sazs.core.argtypes import at_least, number
from sazs.datasets.synthetic import make_voc
from sazs.eval import cli as eval_cli
from sazs.pipeline import cli as priors_cli
from sazs.pipeline import spectral
from sazs.stores import cli as store_cli
from sazs.stores.reader import open_store
from sazs.train import cli as train_cli
from sazs.train import loop

SRC = Path(__file__).resolve().parents[1] / "src" / "sazs"

PREDICT = ["predict", "a.jpg", "--classes", "a", "--ckpt", "c.pt"]
PRIORS = ["priors", "s.zarr", "--dataset", "davis", "--data", "d", "--out", "o"]
IMPORT = ["import-dsm", "eigs", "--dataset", "folder", "--out", "o"]
CASES = [
    (train_cli, ["run", "--lr", "nan"], "--lr", "nan", "in (0, 10]"),
    (train_cli, ["run", "--lr", "0"], "--lr", "0", "in (0, 10]"),
    (train_cli, ["run", "--momentum", "inf"], "--momentum", "inf", "in [0, 1]"),
    (train_cli, ["run", "--epochs", "nan"], "--epochs", "nan", "finite number"),
    (train_cli, ["run", "--scale", "nan", "2"], "--scale", "nan", "finite number"),
    (train_cli, ["run", "--spectral-weight=-inf"], "--spectral-weight", "-inf", "finite number"),
    (train_cli, ["run", "--crop-size", "10000000"], "--crop-size", "10000000", "integer in 1..2048"),
    (train_cli, ["run", "--head-dim", "0"], "--head-dim", "0", "integer in 1..4096"),
    (eval_cli, ["run", "--calibration", "nan"], "--calibration", "nan", "in [-2, 2]"),
    (eval_cli, ["run", "--calibration", "inf"], "--calibration", "inf", "in [-2, 2]"),
    (eval_cli, ["run", "--boundary-tolerance", "nan"], "--boundary-tolerance", "nan", "in (0, 100]"),
    (eval_cli, [*PREDICT, "--calibration", "nan"], "--calibration", "nan", "in [-2, 2]"),
    (eval_cli, [*PRIORS, "--boundary-tolerance", "inf"], "--boundary-tolerance", "inf", "in (0, 100]"),
    (priors_cli, ["run", "--global-weight", "1e300"], "--global-weight", "1e300", "in [0, 1000]"),
    (priors_cli, ["run", "--global-weight", "nan"], "--global-weight", "nan", "in [0, 1000]"),
    (store_cli, [*IMPORT, "--shard-size", "0"], "--shard-size", "0", "integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("cli", "argv", "flag", "value", "expected"), CASES)
def test_bad_numbers_end_at_the_command_line_with_exit_2(
    tmp_path, monkeypatch, capsys, cli, argv, flag, value, expected
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '{value}' is not a" in err and expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_no_float_flag_bypasses_the_finite_parser():
    offenders = [
        f"{p.relative_to(SRC)}:{n}"
        for p in SRC.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"type=float[,)]", line)
    ]
    assert offenders == []


def test_the_argparse_types_name_the_range():
    assert number(0, 1)("0.5") == 0.5 and at_least(1, 3)("3") == 3
    for parse, text in (
        (number(0, 1), "nan"),
        (number(), "inf"),
        (number(0, 1, hi_open=True), "1"),
        (at_least(1), "1e3"),
    ):
        with pytest.raises(Exception, match="is not a"):
            parse(text)


def test_non_finite_weights_stop_a_run_before_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN learning rate (here from the schedule) leaves a finite loss at step 1 and NaN weights
    after it: the run stops with exit 3 and writes no checkpoint."""
    voc = make_voc(tmp_path / "voc", num_train=4, num_val=2, size=(56, 72), seed=3)
    monkeypatch.setattr(loop, "poly_lambda", lambda steps, power, warmup: lambda step: float("nan"))
    argv = train_argv(voc, tmp_path / "run")
    argv[argv.index("--steps") + 1] = "1"
    assert train_cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite weights after step 1" in err and "lower --lr" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_arpack_failure_fails_that_image_only(tmp_path, monkeypatch, capsys):
    real = spectral.sla.eigsh
    calls = []

    def eigsh(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first image's solve: ARPACK gives up (as with overflowing weights)
            raise ArpackError(-9999)
        return real(*args, **kwargs)

    monkeypatch.setattr(spectral.sla, "eigsh", eigsh)
    out = tmp_path / "s.zarr"
    argv = ["run", "--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]
    assert priors_cli.main([*argv, "--limit", "2", "--solver", "eigsh", "--out", str(out)]) == 0
    store = open_store(out)
    (failed,) = store.failures()
    assert "ARPACK failed" in store.failures()[failed] and len(store.done_ids()) == 1
