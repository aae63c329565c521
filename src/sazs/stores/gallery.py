"""A static HTML gallery of a prior store: look at it before downloading or training on it.

``build_gallery(store, out_dir, ...)`` writes ``out_dir/index.html`` and its thumbnails
(``out_dir/thumbs/*.png``); it needs no server (open the file from disk) and loads nothing
from the network: its CSS and JavaScript are inline. The page shows

* the manifest summarised (dataset, extractor, graph, solver, counts, fingerprint);
* a card per image: the image (when the caller can load it), the heat maps of the first
  non-trivial eigenvectors and the eigen-segments (signs of those vectors, stores/preview.py);
* a search by id (``index.html?q=ID`` fills it in), and sorting by the **eigengap**
  ``λ2 − λ1`` or by the **residual**;
* the failed images with their reasons.

Eigenvalues are counted from 0, so λ0 ≈ 0 is the trivial one and λ1 the Fiedler value: the
eigengap λ2 − λ1 is the gap after the first non-trivial eigenvalue. A large gap means the
bipartition of eigenvector 1 is well separated (it changes little under small changes of the
graph); a gap near 0 means eigenvectors 1 and 2 can mix. The residual of an image is its
largest ``‖Lv − λv‖`` over the K vectors: how well the solver converged.

Thumbnails are made in parallel threads (decoding and PNG encoding release the GIL).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sazs.core.files import write_atomic
from sazs.core.limits import MAX_THUMB_SIZE

from .format import StoreError
from .preview import heatmap_rgb, segment_labels, segments_rgb
from .reader import Prior, PriorStore

log = logging.getLogger(__name__)

MARKER = '<meta name="generator" content="sazs-store gallery">'  # how a gallery folder is recognised


@dataclass(frozen=True)
class GalleryConfig:
    num_vectors: int = 3  # eigenvectors 1..num_vectors drawn, and their signs make the segments
    thumb_size: int = 160  # longer side of every thumbnail, in pixels
    limit: int | None = 500  # the first N done images (None: all of them)
    workers: int = 4  # threads making thumbnails

    def __post_init__(self) -> None:
        if self.num_vectors < 1 or self.thumb_size < 16 or self.workers < 1:
            raise ValueError(
                f"gallery: num_vectors >= 1, thumb_size >= 16 and workers >= 1 are needed, got "
                f"{self.num_vectors}, {self.thumb_size} and {self.workers}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"gallery: --limit must be >= 1 (or 0 for all images), got {self.limit}")
        if self.thumb_size > MAX_THUMB_SIZE:
            raise ValueError(
                f"gallery: --thumb-size {self.thumb_size} is over {MAX_THUMB_SIZE} pixels (raise the bound with "
                "$SAZS_MAX_THUMB_SIZE; each card holds several thumbnails)"
            )


def eigengap(eigvals: np.ndarray) -> float:
    """λ2 − λ1 (0-based: the gap after the Fiedler value); NaN if K < 3."""
    return float(eigvals[2] - eigvals[1]) if len(eigvals) > 2 else math.nan


def _thumb_shape(height: int, width: int, side: int) -> tuple[int, int]:
    scale = side / max(height, width, 1)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, optimize=False)


def _thumbnails(prior: Prior, image: np.ndarray | None, index: int, thumbs: Path, cfg: GalleryConfig) -> dict:
    """Write the thumbnails of one image; returns the names of its files (relative to the gallery)."""
    from PIL import Image

    height, width = image.shape[:2] if image is not None else prior.image_size
    size = _thumb_shape(height, width, cfg.thumb_size)
    stem = f"{index:06d}"
    files: dict[str, str | list[str] | None] = {"image": None}
    small = None
    if image is not None:
        small = np.asarray(Image.fromarray(image[..., :3]).resize(size[::-1], Image.BILINEAR))
        _save_png(small, thumbs / f"{stem}-image.png")
        files["image"] = f"thumbs/{stem}-image.png"
    num = min(cfg.num_vectors, prior.eigvecs.shape[0] - 1)
    files["vectors"] = []
    for v in range(1, num + 1):
        _save_png(heatmap_rgb(prior.eigvecs[v], size), thumbs / f"{stem}-vec{v}.png")
        files["vectors"].append(f"thumbs/{stem}-vec{v}.png")
    _save_png(segments_rgb(segment_labels(prior.eigvecs, num), size, small), thumbs / f"{stem}-seg.png")
    files["segments"] = f"thumbs/{stem}-seg.png"
    return files


def _check_out_dir(out: Path) -> None:
    if out.is_file():
        raise StoreError(f"{out} is a file; give --out a new or empty directory (or a previous gallery)")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        if not (index.is_file() and MARKER in index.read_text(errors="replace")[:4096]):
            raise StoreError(
                f"{out} is not empty and does not hold a sazs gallery; give --out a new or empty directory"
            )


def build_gallery(
    store: PriorStore,
    out_dir: str | Path,
    *,
    load_image: Callable[[str], np.ndarray | None] | None,
    cfg: GalleryConfig = GalleryConfig(),
    images_note: str = "",
    progress: bool = True,
) -> Path:
    """Write the gallery of ``store`` to ``out_dir``; returns the path of ``index.html``.

    ``load_image(id)`` returns the image (H, W, 3) uint8, or None where it cannot (the card
    shows the eigen-maps only); ``load_image=None``: no images at all. ``images_note`` says
    on the page where the images came from. A previous gallery in ``out_dir`` is replaced.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    _check_out_dir(out)
    thumbs = out / "thumbs"
    if thumbs.is_symlink() or (thumbs.exists() and not thumbs.is_dir()):
        raise StoreError(
            f"{thumbs} is a symbolic link or a file, not the gallery's thumbnail folder; refusing to write "
            "or delete through it: remove it or give --out a new directory"
        )
    thumbs.mkdir(parents=True, exist_ok=True)
    for old in thumbs.glob("*.png"):
        old.unlink()
    done = store.done_ids()
    shown = done if cfg.limit is None else done[: cfg.limit]

    def one(index: int, id_: str) -> dict:
        prior = store.get(id_)
        image, note = None, ""
        if load_image is not None:
            try:
                image = load_image(id_)
            except (OSError, ValueError, KeyError) as exc:  # an unreadable or missing image: maps only
                note = f"image not loaded: {type(exc).__name__}: {exc}"
            if image is not None and tuple(image.shape[:2]) != tuple(prior.image_size):
                note = (
                    f"image is {image.shape[1]}x{image.shape[0]} but the priors were computed at "
                    f"{prior.image_size[1]}x{prior.image_size[0]}"
                )
        residual = float(np.nanmax(prior.residuals)) if np.isfinite(prior.residuals).any() else math.nan
        return {
            "id": id_,
            "order": index,
            "grid": list(prior.grid),
            "size": list(prior.image_size),
            "eigvals": [round(float(x), 6) for x in prior.eigvals[: cfg.num_vectors + 2]],
            "gap": eigengap(prior.eigvals),
            "residual": residual,
            "note": note,
            **_thumbnails(prior, image, index, thumbs, cfg),
        }

    cards: list[dict] = [None] * len(shown)  # type: ignore[list-item]
    with (
        ThreadPoolExecutor(max_workers=cfg.workers) as pool,
        tqdm(total=len(shown), unit="img", desc="thumbnails", disable=not progress, leave=False) as bar,
    ):
        futures = {pool.submit(one, i, id_): i for i, id_ in enumerate(shown)}
        for fut in as_completed(futures):
            cards[futures[fut]] = fut.result()
            bar.update()
    page = render_page(store, cards, total_done=len(done), images_note=images_note, cfg=cfg)
    index = out / "index.html"
    write_atomic(index, page.encode("utf-8"))  # last: a gallery folder with an index.html is complete
    log.info("gallery of %s: %d image(s) in %s", store.url, len(cards), index)
    return index


# -- the page -------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _summary_rows(store: PriorStore, shown: int, total_done: int, images_note: str) -> list[tuple[str, str]]:
    m = store.manifest
    ds, ex, graph, solver = m["dataset"], m["extractor"], m["graph"], m["solver"]
    counts = store.counts()
    rows = [
        ("store", store.url),
        ("dataset", f"{ds.get('name')} / {ds.get('split')} ({ds.get('num_images')} images, root {ds.get('root')})"),
        (
            "images",
            f"{counts['done']} done, {counts['failed']} failed, {counts['pending']} pending; "
            f"{shown} shown" + (f" (the first {shown} of {total_done} done)" if shown < total_done else ""),
        ),
        (
            "extractor",
            f"{ex.get('name')} ({ex.get('architecture', '—')}, facet {ex.get('facet', '—')}), weights "
            f"sha256 {str(ex.get('weights_sha256') or '—')[:16]}",
        ),
        ("graph", ", ".join(f"{k}={v}" for k, v in graph.items() if not isinstance(v, dict | list))),
        ("solver", ", ".join(f"{k}={v}" for k, v in solver.items() if not isinstance(v, dict | list))),
        ("spectrum", f"K = {store.num_eigs}, max grid {store.max_grid[0]}×{store.max_grid[1]}"),
        ("created", f"{m.get('created', '—')} by {m.get('created_by', '—')} with sazs {m.get('code_version', '—')}"),
        ("fingerprint", store.fingerprint),
    ]
    if "imported" in m:
        rows.insert(3, ("imported", json.dumps(m["imported"])[:300]))
    if images_note:
        rows.append(("pictures", images_note))
    return rows


def _card(c: dict, labels: list[str]) -> str:
    e = html.escape
    pics = []
    if c["image"]:
        pics.append(f'<figure><img src="{e(c["image"])}" alt="{e(c["id"])}"><figcaption>image</figcaption></figure>')
    else:
        pics.append('<figure class="none"><div>no image</div><figcaption>image</figcaption></figure>')
    for label, src in zip(labels, c["vectors"]):
        pics.append(f'<figure><img src="{e(src)}" alt="{e(label)}"><figcaption>{e(label)}</figcaption></figure>')
    pics.append(f'<figure><img src="{e(c["segments"])}" alt="segments"><figcaption>segments</figcaption></figure>')
    vals = ", ".join(f"{x:.3f}" for x in c["eigvals"])
    note = f'<p class="note">{e(c["note"])}</p>' if c["note"] else ""
    gap = c["gap"] if math.isfinite(c["gap"]) else -1
    res = c["residual"] if math.isfinite(c["residual"]) else -1
    return (
        f'<article class="card" data-id="{e(c["id"])}" data-order="{c["order"]}" data-gap="{gap:.6g}" '
        f'data-residual="{res:.6g}"><h3>{e(c["id"])}</h3><div class="pics">{"".join(pics)}</div>'
        f'<p class="stats">gap λ2−λ1 <b>{_fmt(c["gap"], 3)}</b> · residual <b>{_fmt(c["residual"], 2)}</b> · '
        f"grid {c['grid'][0]}×{c['grid'][1]} · image {c['size'][1]}×{c['size'][0]}</p>"
        f'<p class="vals">λ0.. = {vals}</p>{note}</article>'
    )


def render_page(store: PriorStore, cards: list[dict], *, total_done: int, images_note: str, cfg: GalleryConfig) -> str:
    e = html.escape
    m = store.manifest
    title = f"{m['dataset'].get('name')} / {m['dataset'].get('split')} · {m['extractor'].get('name')}"
    summary = "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"
        for k, v in _summary_rows(store, len(cards), total_done, images_note)
    )
    labels = [f"eigvec {v}" for v in range(1, cfg.num_vectors + 1)]
    grid = "".join(_card(c, labels) for c in cards) or '<p class="empty">no image of this store is done yet</p>'
    failures = store.failures()
    fail_rows = "".join(f"<tr><td>{e(i)}</td><td>{e(r)}</td></tr>" for i, r in failures.items())
    fail_html = f"<table><tr><th>id</th><th>reason</th></tr>{fail_rows}</table>" if failures else "<p>none</p>"
    return _PAGE.format(
        marker=MARKER,
        title=e(title),
        summary=summary,
        grid=grid,
        shown=len(cards),
        num_failed=len(failures),
        failures=fail_html,
        css=_CSS,
        js=_JS,
    )


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: .8em 0 .4em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table.summary th { text-align: left; padding-right: 1em; color: #555; font-weight: 600; vertical-align: top; }
table.summary td { font-family: ui-monospace, monospace; font-size: 12.5px; word-break: break-all; }
.controls { position: sticky; top: 0; background: #fafafa; padding: .6em 0; border-bottom: 1px solid #ddd;
  display: flex; gap: 1em; align-items: center; flex-wrap: wrap; z-index: 1; }
.controls input { font-size: 14px; padding: .25em .5em; width: 16em; }
.controls select { font-size: 14px; padding: .2em; }
#grid { display: flex; flex-wrap: wrap; gap: .8em; margin-top: .8em; align-items: flex-start; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; width: fit-content; }
.card h3 { margin: 0 0 .3em; font-size: 1em; font-family: ui-monospace, monospace; }
.pics { display: flex; gap: .5em; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figure img { display: block; max-width: 160px; max-height: 160px; border: 1px solid #eee; }
figure.none div { width: 120px; height: 90px; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #888; font-size: 12px; }
figcaption { font-size: 11px; color: #666; }
.stats, .vals { margin: .3em 0 0; font-size: 12.5px; }
.vals { color: #666; font-family: ui-monospace, monospace; }
.note { margin: .2em 0 0; color: #a40; font-size: 12px; }
.hidden { display: none; }
#failures table { border-collapse: collapse; }
#failures td, #failures th { border: 1px solid #ddd; padding: .2em .6em; text-align: left; font-size: 13px; }
"""

# Search: substring of the id, case-insensitive; ?q=ID on the URL fills the box, ?sort=gap|residual picks
# the order. Sorting moves the cards; NaN values were written as -1, so they sort last when descending.
_JS = """
(function () {
  const grid = document.getElementById("grid");
  const cards = Array.from(grid.querySelectorAll(".card"));
  const q = document.getElementById("q"), sort = document.getElementById("sort");
  const count = document.getElementById("count");
  function apply() {
    const needle = q.value.trim().toLowerCase();
    let n = 0;
    for (const c of cards) {
      const hit = !needle || c.dataset.id.toLowerCase().includes(needle);
      c.classList.toggle("hidden", !hit);
      n += hit;
    }
    count.textContent = n + " of " + cards.length + " shown";
  }
  function reorder() {
    const [key, dir] = sort.value.split(":");
    const sign = dir === "desc" ? -1 : 1;
    cards.slice().sort((a, b) => sign * (Number(a.dataset[key]) - Number(b.dataset[key]))
                                 || Number(a.dataset.order) - Number(b.dataset.order))
         .forEach((c) => grid.appendChild(c));
  }
  const params = new URLSearchParams(window.location.search);
  if (params.has("q")) q.value = params.get("q");
  const wanted = params.get("sort");
  if (wanted) {
    const option = Array.from(sort.options).find((o) => o.value.startsWith(wanted + ":"));
    if (option) sort.value = option.value;
  }
  q.addEventListener("input", apply);
  sort.addEventListener("change", reorder);
  reorder();
  apply();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{marker}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · prior gallery</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
<table class="summary">{summary}</table>
<div class="controls">
  <label>search id <input id="q" type="search" placeholder="image id" autocomplete="off"></label>
  <label>sort by <select id="sort">
    <option value="order:asc">store order</option>
    <option value="gap:desc">eigengap λ2−λ1, largest first</option>
    <option value="gap:asc">eigengap λ2−λ1, smallest first</option>
    <option value="residual:desc">residual, largest first</option>
    <option value="residual:asc">residual, smallest first</option>
  </select></label>
  <span id="count">{shown} shown</span>
  <a href="#failures">failures ({num_failed})</a>
</div>
<section id="grid">{grid}</section>
<section id="failures"><h2>failures ({num_failed})</h2>{failures}</section>
<script>{js}</script>
</body>
</html>
"""
