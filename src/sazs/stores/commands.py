"""The sazs-store subcommands: each takes the parsed arguments, does its work through the
store library, prints what a user reads and returns the exit status (the parser: stores/cli.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sazs.datasets.base import DatasetConfig
from sazs.datasets.images import ImageError, image_size
from sazs.datasets.registry import build_dataset

from .dsm_import import ImportConfig, import_dsm
from .export import ExportConfig, export_store
from .gallery import GalleryConfig, build_gallery
from .integrity import finalize, is_finalized, list_objects, missing_objects, verify
from .lock import break_lock, describe
from .merge import merge
from .preview import draw_priors
from .publish import publish
from .pull import pull
from .reader import open_store

log = logging.getLogger("sazs.store")


def _options(args) -> dict | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        return json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from None


def graph_summary(graph: dict) -> str:
    """One line for a manifest's "graph" section; absent keys mean the behaviour of stores
    written before them (kind knn, no global term, affine kernel; stores/FORMAT.md)."""
    if graph.get("kind", "knn") == "dense":
        return "dense max(F F^T, 0) / max (the Deep Spectral Methods baseline)"
    weight = graph.get("global_weight", 0.0)
    term = (
        f"global term {graph.get('global_kernel', 'affine')} g={weight:g} r={graph.get('global_rank')}"
        if weight
        else "no global term"
    )
    return (
        f"kNN k={graph.get('k')}, threshold={graph.get('threshold')}, colour weight={graph.get('color_weight')}, {term}"
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_info(url: str, storage_options: dict | None = None) -> dict:
    store = open_store(url, storage_options=storage_options)
    m = store.manifest
    objects = list_objects(store.fs, store.root)
    ex = m["extractor"]
    counts = store.counts()
    # Cheap signs of damage (no chunk but status is decoded): done images without their
    # chunk objects, status bytes outside the defined values. `verify` checks the rest.
    damaged = {"missing_data": len(missing_objects(store, objects)), "bad_status": len(store) - sum(counts.values())}
    return {
        "url": store.url,
        "format_version": m["format_version"],
        "fingerprint": store.fingerprint,
        "dataset": {k: m["dataset"].get(k) for k in ("name", "split", "root", "num_images")},
        "extractor": {k: ex.get(k) for k in ("name", "architecture", "weights_sha256", "facet")},
        "graph": m["graph"],
        "solver": {k: m["solver"].get(k) for k in ("solver", "tol", "residual_tol")},
        "num_eigs": m["num_eigs"],
        "counts": counts,
        "damaged": damaged,
        "finalized": is_finalized(url, storage_options),
        "bytes": int(sum(objects.values())),
        "objects": len(objects),
        "created": m.get("created"),
        "created_by": m.get("created_by"),
        "code_version": m.get("code_version"),
        "merged_from": [s.get("url") for s in m.get("merged_from", [])],
        "imported": m.get("imported"),
    }


def cmd_info(args) -> int:
    info = store_info(args.store, _options(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, ds, ex = info["counts"], info["dataset"], info["extractor"]
    finalized = "finalized" if info["finalized"] else "not finalized"
    lines = [
        f"store        {info['url']}  (format {info['format_version']}, {finalized})",
        f"dataset      {ds['name']} / {ds['split']}  ({ds['num_images']} images, root {ds['root']})",
        f"extractor    {ex['name']} ({ex['architecture']}, facet {ex['facet']})",
        f"weights      sha256 {ex['weights_sha256'] or '— (no weights)'}",
        f"graph        {graph_summary(info['graph'])}",
        f"spectrum     K={info['num_eigs']}, solver {info['solver']['solver']} (tol {info['solver']['tol']})",
        f"images       {c['done']} done, {c['failed']} failed, {c['pending']} pending" + _damage_note(info["damaged"]),
        f"size         {_human_bytes(info['bytes'])} in {info['objects']} objects",
        f"created      {info['created']} by {info['created_by']} with sazs {info['code_version']}",
        f"fingerprint  {info['fingerprint']}",
    ]
    if info["merged_from"]:
        lines.append("merged from  " + ", ".join(info["merged_from"]))
    if info["imported"]:
        imp = info["imported"]
        lines.append(
            f"imported     from {imp.get('from')} files in {imp.get('source')} (generalised vectors v, no residuals)"
        )
    print("\n".join(lines))
    return 0


def _damage_note(damaged: dict) -> str:
    parts = []
    if damaged["missing_data"]:
        parts.append(f"{damaged['missing_data']} of the done have missing data objects")
    if damaged["bad_status"]:
        parts.append(f"{damaged['bad_status']} with an undefined status")
    return f"  (DAMAGED: {', '.join(parts)}; run `sazs-store verify` for the list)" if parts else ""


def cmd_verify(args) -> int:
    report = verify(args.store, storage_options=_options(args), progress=not args.no_progress)
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_finalize(args) -> int:
    summary = finalize(
        args.store,
        storage_options=_options(args),
        allow_incomplete=args.allow_incomplete,
        progress=not args.no_progress,
    )
    print(
        f"finalized {args.store}: {summary['num_objects']} objects, {_human_bytes(summary['total_bytes'])}, "
        f"{summary['done']} done / {summary['failed']} failed / {summary['pending']} pending"
    )
    return 0


def cmd_publish(args) -> int:
    url = publish(args.store, args.url, storage_options=_options(args), progress=not args.no_progress)
    print(f"published {args.store} → {url}")
    return 0


def cmd_pull(args) -> int:
    pull(args.url, args.dest, storage_options=_options(args), progress=not args.no_progress)
    print(f"pulled {args.url} → {args.dest} (verified)")
    return 0


def cmd_merge(args) -> int:
    counts = merge(
        args.out, args.inputs, on_conflict=args.on_conflict, overwrite=args.overwrite, storage_options=_options(args)
    )
    print(
        f"merged {len(args.inputs)} stores → {args.out}: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['pending']} pending"
    )
    return 0


def _find_image(images: Path, id_: str):
    from PIL import Image

    for candidate in sorted(images.glob(f"{id_}.*")):
        try:
            with Image.open(candidate) as img:
                return np.asarray(img.convert("RGB"))
        except OSError:
            continue
    return None


def cmd_show(args) -> int:
    store = open_store(args.store, storage_options=_options(args))
    ids = args.ids or store.done_ids()[: args.count]
    rows = []
    for id_ in ids:
        image = _find_image(Path(args.images), id_) if args.images else None
        rows.append((store.get(id_), image))
    out = args.out or Path(str(args.store).rstrip("/")).name.removesuffix(".zarr") + ".show.png"
    print(draw_priors(rows, out, title=f"{store.manifest['dataset']['name']} · {store.manifest['extractor']['name']}"))
    return 0


def _gallery_images(args, store) -> tuple[object, str]:
    """(load_image for the gallery or None, a note on where the pictures come from)."""
    if args.no_images:
        return None, "not shown (--no-images)"
    if args.images:
        root = Path(args.images)
        if not root.is_dir():
            raise FileNotFoundError(f"--images {root}: no such folder; give the folder of <id>.<ext> image files")
        return (lambda id_: _find_image(root, id_)), f"from {root} (<id>.<ext>)"
    # Else the dataset the store was computed from, as its manifest names it.
    ds = store.manifest["dataset"]
    try:
        dataset = build_dataset(DatasetConfig(name=ds.get("name"), root=ds.get("root"), split=ds.get("split")))
    except (ValueError, KeyError, OSError, ImageError) as exc:
        log.warning(
            "the store's dataset %s is not readable here (%s); the gallery shows the eigen-maps only "
            "(pass --images ROOT to show the images)",
            ds.get("name"),
            exc,
        )
        return (
            None,
            f"dataset {ds.get('name')} at {ds.get('root')} not readable here: eigen-maps only (pass --images ROOT)",
        )

    def load(id_: str):
        try:
            return dataset.load_image(id_)
        except ImageError as exc:
            raise ValueError(str(exc)) from None

    return load, f"from the dataset {ds.get('name')} / {ds.get('split')} at {ds.get('root')}"


def cmd_gallery(args) -> int:
    cfg = GalleryConfig(
        num_vectors=args.vectors, thumb_size=args.thumb_size, limit=args.limit or None, workers=args.workers
    )
    store = open_store(args.store, storage_options=_options(args))
    load_image, note = _gallery_images(args, store)
    index = build_gallery(
        store, args.out, load_image=load_image, cfg=cfg, images_note=note, progress=not args.no_progress
    )
    print(f"wrote {index} (open it in a browser: file://{index.resolve()})")
    return 0


def _export_images(args):
    """load_image(id) for ``export --refine``: from --images, else the dataset the store's manifest names."""
    if args.images:
        root = Path(args.images)
        if not root.is_dir():
            raise FileNotFoundError(f"--images {root}: no such folder; give the folder of <id>.<ext> image files")

        def from_folder(id_: str):
            image = _find_image(root, id_)
            if image is None:
                raise ValueError(f"no readable image {root}/{id_}.*")
            return image

        return from_folder
    ds = open_store(args.store, storage_options=_options(args)).manifest["dataset"]
    dataset = build_dataset(DatasetConfig(name=ds.get("name"), root=ds.get("root"), split=ds.get("split")))

    def from_dataset(id_: str):
        try:
            return dataset.load_image(id_)
        except ImageError as exc:
            raise ValueError(str(exc)) from None

    return from_dataset


def cmd_export(args) -> int:
    cfg = ExportConfig(
        format=args.format,
        ids=tuple(args.ids) if args.ids else None,
        limit=args.limit,
        num_vectors=args.num_vectors,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        refine=args.refine,
    )
    load_image = _export_images(args) if args.refine else None
    summary = export_store(args.store, args.out, cfg, storage_options=_options(args), load_image=load_image)
    print(summary.line())
    return 1 if summary.failed else 0


def cmd_import_dsm(args) -> int:
    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.data, split=args.split, limit=args.limit))

    def size(id_: str) -> tuple[int, int]:
        try:
            return image_size(dataset.image_path(id_), dataset.max_pixels, root=dataset.image_root)
        except ImageError as exc:
            raise ValueError(str(exc)) from None

    cfg = ImportConfig(
        patch_size=args.patch_size,
        grid=args.grid,
        num_eigs=args.num_eigs,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    counts = import_dsm(args.eigs_dir, args.out, ids=dataset.ids, image_size=size, dataset=dataset.describe(), cfg=cfg)
    finalize(args.out, progress=not args.no_progress)
    print(f"imported {args.eigs_dir} → {args.out} (finalized): {counts['done']} done, {counts['failed']} failed")
    return 0


def cmd_unlock(args) -> int:
    info = break_lock(args.store)
    print(f"removed the lock of {describe(info)}" if info else f"{args.store} was not locked")
    return 0
