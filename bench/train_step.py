"""Training-step benchmark: what streaming the priors (and the spectral loss) costs per step.

Example:
    python bench/train_step.py                      # CPU defaults: ViT-S-16, crop 224, batch 8
    python bench/train_step.py --device cuda --arch ViT-B-16 --crop-size 512 --workers 8

A synthetic VOC-layout dataset and its priors (``color`` extractor, short side 224: a
28x39-ish patch grid, the size a ViT-S/14 store at 448 px has) are written once under
``--workdir``. The same model (random weights, frozen backbone, the trainer's dense head),
the same images and the same augmentation draws are then timed in three modes:

- ``no priors``: images + masks only, cross-entropy (the CE-only baseline);
- ``priors, no loss``: the priors are read from the store and warped with the images, but
  the loss is still CE only (the cost of streaming alone);
- ``priors + spectral``: streamed priors and the spectral shape loss (the real setting).

The modes take turns step by step (A B C A B C ...), so that load from other processes on a
shared machine hits all of them alike, and the overhead of a mode is the median over cycles of
its step time divided by the baseline's step time in the same cycle (paired, so that slow
phases of the machine cancel); step times are medians over steps. A step is one
optimiser step: the wait for the next batch from the DataLoader ("data"), forward,
losses, backward and the optimiser update. Also reported: the data share of the step, the
throughput, and the per-sample cost of ``__getitem__`` in one process, median (min): what a
DataLoader worker pays per image, hidden behind compute while the workers keep up. The store
read goes through Zarr's I/O thread, so on a machine whose cores are all busy its latency
(not its CPU cost) grows; the min is the unloaded cost.

Target: streaming priors adds <= 5% to the step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sazs.core.devices import resolve_device
from sazs.datasets.synthetic import make_voc
from sazs.model.model import ModelConfig, build_model
from sazs.pipeline import cli as priors_cli
from sazs.train.config import TrainConfig
from sazs.train.data import AugmentConfig, DataConfig, PriorSegDataset, build_loader
from sazs.train.loop import build_optimizer, forward_losses, to_device
from sazs.train.losses import LossConfig

TARGET_OVERHEAD = 0.05
MODES = ("no priors", "priors, no loss", "priors + spectral")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("training-step benchmark", add_help=add_help)
    p.add_argument("--arch", default="ViT-S-16")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per mode")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per mode = steps x rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--images", type=int, default=48, help="synthetic training images")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    p.add_argument("--workdir", default=None, help="where the dataset and store go (default: a temp dir)")
    p.add_argument("--out", default="bench/results/train_step.json")
    return p


def prepare(workdir: Path, num_images: int) -> tuple[str, str]:
    voc = workdir / "voc" / "VOCdevkit" / "VOC2012"
    if not (voc / "ImageSets" / "Segmentation" / "train.txt").is_file():
        make_voc(workdir / "voc", num_train=num_images, num_val=2, size=(375, 500), seed=0)
    store = workdir / "train-color.zarr"
    rc = priors_cli.main(
        [
            "run",
            "--dataset",
            "voc",
            "--data",
            str(voc),
            "--split",
            "train",
            "--extractor",
            "color",
            "--short-side",
            "224",
            "--out",
            str(store),
            "--no-progress",
            "--preview",
            "0",
        ]
    )
    if rc:
        raise SystemExit(f"computing the benchmark priors failed (exit code {rc})")
    return str(voc), str(store)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        voc, store = prepare(workdir, args.images)
        torch.manual_seed(0)
        model, text = build_model(ModelConfig(arch=args.arch, templates="single"), device)
        data = DataConfig(
            dataset="voc",
            root=voc,
            fold=0,
            priors=store,
            prior_stride=model.output_stride,
            augment=AugmentConfig(crop_size=args.crop_size),
        )
        datasets = {"no priors": PriorSegDataset(data, with_priors=False), "priors": PriorSegDataset(data)}
        emb = text(datasets["priors"].split.train_names()).to(device)
        losses = {
            "no priors": LossConfig(spectral_weight=0),
            "priors, no loss": LossConfig(spectral_weight=0),
            "priors + spectral": LossConfig(spectral_weight=1.0),
        }
        opt = build_optimizer(model, TrainConfig(lr=1e-4))
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        # Per-sample cost of __getitem__ in this process (what one worker pays per image).
        getitem = {name: [] for name in datasets}
        for _ in range(2):  # alternate, for the same reason the modes alternate below
            for name, ds in datasets.items():
                for i in range(min(len(ds), 24)):
                    t0 = time.perf_counter()
                    ds[(0, i)]
                    getitem[name].append(time.perf_counter() - t0)

        samples = {m: {"step": [], "data": []} for m in MODES}
        loaders = {
            m: iter(
                build_loader(
                    datasets["no priors" if m == "no priors" else "priors"],
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                    pin_memory=device.type == "cuda",
                )
            )
            for m in MODES
        }  # same seed and start: the same images and augmentation draws
        model.train()
        total = args.warmup + args.steps * args.rounds
        for k in range(total):
            for mode in MODES:
                sync()
                t0 = time.perf_counter()
                batch = to_device(next(loaders[mode]), device)
                sync()
                t_data = time.perf_counter() - t0
                opt.zero_grad(set_to_none=True)
                forward_losses(model, batch, emb, losses[mode], autocast)["loss"].backward()
                opt.step()
                sync()
                if k >= args.warmup:
                    samples[mode]["step"].append(time.perf_counter() - t0)
                    samples[mode]["data"].append(t_data)
            if (k + 1) % 10 == 0:
                print(f"cycle {k + 1}/{total}", file=sys.stderr)
        del loaders

    base = samples["no priors"]["step"]
    rows = []
    for mode in MODES:
        steps = samples[mode]["step"]
        step = statistics.median(steps)
        data_t = statistics.median(samples[mode]["data"])
        rows.append(
            {
                "mode": mode,
                "step_s": step,
                "step_min_s": min(steps),
                "data_s": data_t,
                "data_share": data_t / step,
                "images_per_s": args.batch_size / step,
                "overhead_vs_no_priors": statistics.median(a / b for a, b in zip(steps, base)) - 1,
                "getitem_ms": 1000 * statistics.median(getitem["no priors" if mode == "no priors" else "priors"]),
                "getitem_min_ms": 1000 * min(getitem["no priors" if mode == "no priors" else "priors"]),
            }
        )
    header = (
        f"{'mode':<20} {'step s':>8} {'min s':>7} {'data s':>8} {'data %':>7} {'img/s':>7} {'vs base':>8} "
        f"{'getitem ms (min)':>17}"
    )
    print(
        f"\ntraining step: {args.arch}, crop {args.crop_size}, batch {args.batch_size}, frozen backbone, "
        f"{args.workers} worker(s) per mode, device {device}, {args.rounds * args.steps} steps per mode, interleaved"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:<20} {r['step_s']:>8.3f} {r['step_min_s']:>7.3f} {r['data_s']:>8.3f} "
            f"{100 * r['data_share']:>6.1f}% "
            f"{r['images_per_s']:>7.1f} {100 * r['overhead_vs_no_priors']:>+7.1f}% "
            f"{r['getitem_ms']:>9.1f} ({r['getitem_min_ms']:.1f})"
        )
    overhead = rows[-1]["overhead_vs_no_priors"]
    verdict = "meets" if overhead <= TARGET_OVERHEAD else "MISSES"
    print(
        f"\nstreaming priors + spectral loss add {100 * overhead:+.1f}% to the step: {verdict} the "
        f"<= {100 * TARGET_OVERHEAD:.0f}% target"
    )
    result = {
        "config": vars(args),
        "device": str(device),
        "torch": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "rows": rows,
        "samples": samples,
        "target_overhead": TARGET_OVERHEAD,
        "meets_target": overhead <= TARGET_OVERHEAD,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
