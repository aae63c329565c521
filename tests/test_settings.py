"""Every default is written once, in its stage's frozen config: a CLI flag's default must equal its config's.

Each CLI's flags are mapped to the config field they set. A flag whose default differs from
its field's (or whose field has no default) fails here, unless it is listed in RESOLVED: flags
whose default is a word the job resolves at run time (``auto``), with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sazs.datasets.base import DatasetConfig
from sazs.features.extractors import ExtractorConfig
from sazs.pipeline.cli_options import get_args_parser as priors_parser
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import JobConfig
from sazs.pipeline.ray_plan import RayConfig
from sazs.pipeline.spectral import SpectralConfig

PRIORS = {
    "--dataset": (DatasetConfig, "name"),
    "--split": (DatasetConfig, "split"),
    "--limit": (DatasetConfig, "limit"),
    "--extractor": (ExtractorConfig, "name"),
    "--weights": (ExtractorConfig, "weights"),
    "--facet": (ExtractorConfig, "facet"),
    "--short-side": (ExtractorConfig, "short_side"),
    "--max-long-side": (ExtractorConfig, "max_long_side"),
    "--device": (ExtractorConfig, "device"),
    "--batch-size": (ExtractorConfig, "batch_size"),
    "--precision": (ExtractorConfig, "precision"),
    "--knn": (GraphConfig, "k"),
    "--graph-backend": (GraphConfig, "backend"),
    "--threshold": (GraphConfig, "threshold"),
    "--color-weight": (GraphConfig, "color_weight"),
    "--global-weight": (GraphConfig, "global_weight"),
    "--global-rank": (GraphConfig, "global_rank"),
    "--global-kernel": (GraphConfig, "global_kernel"),
    "--graph": (GraphConfig, "kind"),
    "--num-eigs": (SpectralConfig, "num_eigs"),
    "--solver": (SpectralConfig, "solver"),
    "--shard-size": (JobConfig, "shard_size"),
    "--overwrite": (JobConfig, "overwrite"),
    "--part": (JobConfig, "part"),
    "--retry-failed": (JobConfig, "retry_failed"),
    "--take-over-lock": (JobConfig, "take_over_lock"),
    "--preview": (JobConfig, "preview"),
    "--decode-workers": (JobConfig, "decode_workers"),
    "--ray-address": (RayConfig, "address"),
    "--ray-num-cpus": (RayConfig, "num_cpus"),
    "--ray-num-gpus": (RayConfig, "num_gpus"),
    "--ray-actors": (RayConfig, "actors"),
    "--ray-solve-on": (RayConfig, "solve_on"),
    "--ray-max-in-flight": (RayConfig, "max_in_flight"),
    "--ray-max-retries": (RayConfig, "max_retries"),
}

RESOLVED = {
    # flag: why the CLI's default is not the config's
    ("sazs-priors", "--graph-backend"): "auto: batched on a GPU, certified on a CPU (compute.resolve_auto)",
    ("sazs-priors", "--solver"): "auto: batched on a GPU with CuPy, eigsh on a CPU (compute.resolve_auto)",
}

CLIS = {"sazs-priors": (priors_parser, PRIORS)}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def _default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise AssertionError(f"{cls.__name__}.{name} has no default")


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_flag_defaults_are_the_configs(cli):
    build, mapping = CLIS[cli]
    flags = _flags(build())
    assert not set(mapping) - set(flags), f"{cli}: mapped flags that do not exist: {set(mapping) - set(flags)}"
    wrong = []
    for flag, (cls, name) in mapping.items():
        if (cli, flag) in RESOLVED:
            assert flags[flag].default == "auto", f"{cli} {flag}: listed as resolved at run time but not 'auto'"
            continue
        if flags[flag].default != _default(cls, name):
            wrong.append(f"{flag} = {flags[flag].default!r} but {cls.__name__}.{name} = {_default(cls, name)!r}")
    assert not wrong, f"{cli}: flag defaults that disagree with their configs:\n" + "\n".join(wrong)


def test_the_check_sees_a_disagreement():
    parser = argparse.ArgumentParser()
    parser.add_argument("--knn", type=int, default=11)
    flags = _flags(parser)
    assert flags["--knn"].default != _default(GraphConfig, "k")
