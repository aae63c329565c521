"""The evaluation report: tables (terminal and Markdown) and JSON.

One table per protocol: rows are the folds and their mean, columns are mIoU, FB-IoU and
boundary F (%) for each fusion mode. The headline is a ground-truth-free fusion mode
(:func:`sazs.eval.fusion.check_headline`); the oracle is always printed as
``oracle (upper bound: uses the ground truth)`` and saved under ``oracle_upper_bound``.
The generalised setting gets its own table (seen / unseen mIoU, harmonic mean). The
picture of episodes is drawn by :mod:`sazs.eval.pictures`.

Pure: dicts and arrays in, text and files out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sazs.datasets.zeroshot import benchmark_named

from .fusion import UPPER_BOUND_TAG, UPPER_BOUNDS, check_headline, fusion_key, fusion_label

METRICS = (("miou", "mIoU"), ("fb_iou", "FB-IoU"), ("boundary_f", "BF"))
GENERALISED_METRICS = (
    ("seen_miou", "seen"),
    ("unseen_miou", "unseen"),
    ("harmonic_miou", "hIoU"),
    ("boundary_f_unseen", "BF unseen"),
)
REPORT_FORMAT = 1


def _generalised_rows(gen: dict) -> list[list[str]]:
    """Table rows (one per fold, then the mean) of the generalised setting, for text and Markdown."""
    folds = list(next(iter(gen["fusion"].values()))["folds"]) if gen["fusion"] else []
    rows = []
    for fold in folds + ["mean"]:
        row = [fold.removeprefix("fold") if fold != "mean" else "mean"]
        for e in gen["fusion"].values():
            src = e["mean"] if fold == "mean" else e["folds"][fold]
            row += [_pct(src[k]) for k, _ in GENERALISED_METRICS]
        rows.append(row)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _clean(x):
    """NaN -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def build_report(
    protocols: dict[str, list[dict]],
    *,
    headline: str,
    generalised: dict[str, list[dict]] | None = None,
    meta: dict | None = None,
) -> dict:
    """JSON-able report from the per-fold results of :func:`sazs.eval.evaluate.evaluate_episodes`.

    ``protocols``: benchmark name -> fold results; ``generalised``: benchmark -> results of
    ``evaluate_generalised``. Fusion modes are keyed by :func:`fusion_key` (the oracle as
    ``oracle_upper_bound``) and every oracle entry carries ``"upper_bound": true``.
    """
    check_headline(headline)
    out: dict = {"format": REPORT_FORMAT, "headline": None, "protocols": {}, "generalised": {}, **(meta or {})}
    for bench, folds in protocols.items():
        modes = list(folds[0]["modes"]) if folds else []
        table = {}
        for mode in modes:
            per_fold = {f"fold{r['fold']}": {k: r["modes"][mode][k] for k, _ in METRICS} for r in folds}
            mean = {k: _mean([r["modes"][mode][k] for r in folds]) for k, _ in METRICS}
            entry = {
                "label": fusion_label(mode),
                "upper_bound": mode in UPPER_BOUNDS,
                "folds": per_fold,
                "mean": mean,
                "per_class": {
                    f"fold{r['fold']}": {
                        "iou": r["modes"][mode]["iou"],
                        "boundary_f": r["modes"][mode]["boundary_f_per_class"],
                    }
                    for r in folds
                },
                "segment_rate": {f"fold{r['fold']}": r["modes"][mode].get("segment_rate") for r in folds},
                "fallbacks": sum(r["modes"][mode].get("fallbacks", 0) for r in folds),
            }
            table[fusion_key(mode)] = entry
        out["protocols"][bench] = {
            "title": benchmark_named(bench).title,
            "folds": [r["fold"] for r in folds],
            "episodes": {f"fold{r['fold']}": r["protocol"] for r in folds},
            "fusion": table,
            "seconds": sum(r.get("seconds", 0.0) for r in folds),
        }
        if all("chance" in r for r in folds):  # every pixel of every episode marked foreground
            out["protocols"][bench]["chance"] = {
                "folds": {f"fold{r['fold']}": r["chance"] for r in folds},
                "mean": {k: _mean([r["chance"][k] for r in folds]) for k in folds[0]["chance"]} if folds else {},
            }
        if out["headline"] is None and headline in modes:
            out["headline"] = {
                "protocol": bench,
                "fusion": headline,
                "ground_truth_free": True,
                "folds": [r["fold"] for r in folds],
                **table[fusion_key(headline)]["mean"],
            }
    for bench, folds in (generalised or {}).items():
        modes = list(folds[0]["modes"]) if folds else []
        table = {}
        for mode in modes:
            per_fold = {f"fold{r['fold']}": {k: r["modes"][mode][k] for k, _ in GENERALISED_METRICS} for r in folds}
            mean = {k: _mean([r["modes"][mode][k] for r in folds]) for k, _ in GENERALISED_METRICS}
            table[fusion_key(mode)] = {
                "label": fusion_label(mode),
                "upper_bound": mode in UPPER_BOUNDS,
                "folds": per_fold,
                "mean": mean,
                "per_class": {f"fold{r['fold']}": r["modes"][mode]["iou"] for r in folds},
            }
        out["generalised"][bench] = {
            "title": benchmark_named(bench).title,
            "images": {f"fold{r['fold']}": r["images"] for r in folds},
            "fusion": table,
        }
    return _clean(out)


# ----------------------------------------------------------------------------- tables


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _mode_title(key: str, entry: dict, headline_key: str | None) -> str:
    title = entry["label"]
    if key == headline_key:
        title += " [headline]"
    return title


def protocol_rows(proto: dict, headline_key: str | None) -> tuple[list[str], list[list[str]]]:
    """(column headers, rows) of one protocol table: folds + mean x metrics of each fusion mode."""
    headers = ["fold"]
    for key, entry in proto["fusion"].items():
        title = _mode_title(key, entry, headline_key)
        headers += [f"{title} · {name}" for _, name in METRICS]
    rows = []
    for fold in proto["folds"]:
        row = [str(fold)]
        for entry in proto["fusion"].values():
            row += [_pct(entry["folds"][f"fold{fold}"][k]) for k, _ in METRICS]
        rows.append(row)
    mean = [f"mean ({len(proto['folds'])} fold{'s' if len(proto['folds']) != 1 else ''})"]
    for entry in proto["fusion"].values():
        mean += [_pct(entry["mean"][k]) for k, _ in METRICS]
    rows.append(mean)
    return headers, rows


def markdown_rows(proto: dict, headline_key: str | None) -> tuple[list[str], list[list[str]]]:
    """Markdown layout (narrower): one row per fusion mode, cells 'mIoU / FB-IoU / BF' per fold and mean."""
    folds = proto["folds"]
    headers = ["fusion"] + [f"fold {f}" for f in folds] + [f"mean ({len(folds)} fold{'s' if len(folds) != 1 else ''})"]
    rows = []
    for key, entry in proto["fusion"].items():
        cells = [" / ".join(_pct(entry["folds"][f"fold{f}"][k]) for k, _ in METRICS) for f in folds]
        mean = " / ".join(_pct(entry["mean"][k]) for k, _ in METRICS)
        title = _mode_title(key, entry, headline_key)
        if key == headline_key:
            title, mean = f"**{title}**", f"**{mean}**"
        rows.append([title, *cells, mean])
    return headers, rows


def _episode_note(proto: dict) -> str:
    eps = list(proto["episodes"].values())
    n = sorted({e["episodes"] for e in eps})
    sources = sorted(
        {"HSNet list" if not e["source"].startswith("generated") else "lists generated by rule" for e in eps}
    )
    return f"{'/'.join(map(str, n))} episodes per fold ({', '.join(sources)}; rule {eps[0]['rule']})"


def _text_table(first_header: str, groups: list[str], subheaders: Sequence[str], rows: list[list[str]]) -> list[str]:
    """Fixed-width table: a first column, then one column group per title with ``subheaders``."""
    first = max([len(first_header)] + [len(r[0]) for r in rows]) + 1
    n = len(subheaders)
    cell = max([6] + [len(h) for h in subheaders] + [len(v) for r in rows for v in r[1:]])
    widths = [max(len(t), n * cell + 2 * (n - 1)) for t in groups]

    def group_cells(values: Sequence[str], w: int) -> str:
        return f"{'  '.join(f'{v:>{cell}}' for v in values):<{w}}"

    head1 = " " * first + "".join(f" | {t:<{w}}" for t, w in zip(groups, widths))
    head2 = f"{first_header:<{first}}" + "".join(f" | {group_cells(subheaders, w)}" for w in widths)
    out = [head1.rstrip(), head2.rstrip(), "-" * len(head2.rstrip())]
    for r in rows:
        out.append(
            (
                f"{r[0]:<{first}}"
                + "".join(f" | {group_cells(r[1 + g * n : 1 + (g + 1) * n], w)}" for g, w in enumerate(widths))
            ).rstrip()
        )
    return out


def format_text(report: dict) -> str:
    """The terminal tables: one per protocol, fusion modes as column groups, then the generalised table."""
    lines: list[str] = []
    headline = report.get("headline")
    hkey = fusion_key(headline["fusion"]) if headline else None
    for _bench, proto in report["protocols"].items():
        lines.append(f"{proto['title']} · zero-shot episodes · {_episode_note(proto)}")
        lines.append("mIoU / FB-IoU / boundary F (BF) over the fold's unseen classes, %")
        groups = [_mode_title(key, e, hkey) for key, e in proto["fusion"].items()]
        _, rows = protocol_rows(proto, hkey)
        lines += _text_table("fold", groups, [name for _, name in METRICS], rows)
        if proto.get("chance"):
            lines.append(_chance_line(proto))
        lines.append("")
    for _bench, gen in report.get("generalised", {}).items():
        lines.append(f"{gen['title']} · generalised setting: background + all classes on whole validation masks")
        lines.append("seen mIoU (background counted as seen) / unseen mIoU / their harmonic mean, %")
        groups = [e["label"] for e in gen["fusion"].values()]
        rows = _generalised_rows(gen)
        lines += _text_table("fold", groups, [name for _, name in GENERALISED_METRICS], rows) + [""]
    lines.append(headline_line(report))
    for w in report.get("warnings", []):
        lines.append(f"WARNING   {w}")
    return "\n".join(lines)


def _chance_line(proto: dict) -> str:
    c = proto["chance"]
    folds = ", ".join(f"{k.removeprefix('fold')}: {_pct(v['miou'])}" for k, v in c["folds"].items())
    return (
        f"chance (every pixel marked foreground): mIoU {_pct(c['mean'].get('miou'))} "
        f"(folds {folds}); FB-IoU {_pct(c['mean'].get('fb_iou'))}"
    )


def headline_line(report: dict) -> str:
    """One line with the headline number: always a ground-truth-free fusion mode."""
    h = report.get("headline")
    if not h:
        return "headline  none (no episode protocol evaluated)"
    check_headline(h["fusion"])
    title = report["protocols"][h["protocol"]]["title"]
    folds = ",".join(map(str, h["folds"]))
    return (
        f"headline  {title} mean mIoU {_pct(h['miou'])} (fusion '{h['fusion']}', ground-truth-free; "
        f"folds {folds}); FB-IoU {_pct(h['fb_iou'])}, boundary F {_pct(h['boundary_f'])}"
    )


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def format_markdown(report: dict) -> str:
    headline = report.get("headline")
    hkey = fusion_key(headline["fusion"]) if headline else None
    lines = ["# sazs evaluation", ""]
    lines += [f"**{headline_line(report)}**", ""]
    for w in report.get("warnings", []):
        lines += [f"> **Warning:** {w}", ""]
    if report.get("checkpoints"):
        lines += ["Checkpoints: " + ", ".join(f"fold {k}: `{v}`" for k, v in report["checkpoints"].items()), ""]
    for _bench, proto in report["protocols"].items():
        lines += [
            f"## {proto['title']}: zero-shot episodes",
            "",
            f"{_episode_note(proto)}. Each cell: mIoU / FB-IoU / boundary F over the fold's unseen classes, %. "
            f"The oracle row is an {UPPER_BOUND_TAG}: it picks masks with the ground truth "
            "(the released SAZS evaluation), so it is never the headline.",
            "",
        ]
        lines += _md_table(*markdown_rows(proto, hkey)) + [""]
        if proto.get("chance"):
            lines += [_chance_line(proto), ""]
        rates = {
            e["label"]: e["segment_rate"]
            for e in proto["fusion"].values()
            if any(v is not None for v in e["segment_rate"].values())
        }
        for label, r in rates.items():
            lines.append(
                f"- {label}: an eigen-segment replaced the prediction in "
                + ", ".join(f"{k} {_pct(v)} %" for k, v in r.items() if v is not None)
                + " of the episodes"
            )
        if rates:
            lines.append("")
    for _bench, gen in report.get("generalised", {}).items():
        lines += [
            f"## {gen['title']}: generalised setting",
            "",
            "Background + every class scored at once on whole validation masks; seen mIoU counts background "
            "as seen; hIoU = harmonic mean of seen and unseen mIoU (%).",
            "",
        ]
        headers = ["fold"] + [f"{e['label']} · {n}" for e in gen["fusion"].values() for _, n in GENERALISED_METRICS]
        rows = _generalised_rows(gen)
        lines += _md_table(headers, rows) + [""]
    if report.get("pictures"):
        lines += ["## Episodes", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["pictures"]] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(format_markdown(report) + "\n")
    return paths
