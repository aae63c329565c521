"""sazs-store: inspect, verify, finalize, share and merge prior stores.

Examples:

    sazs-store info priors/sample-all-imgfocus-vits14.zarr            # human summary (--json for tools)
    sazs-store finalize priors/sample-all-imgfocus-vits14.zarr        # checksum every object
    sazs-store verify priors/sample-all-imgfocus-vits14.zarr          # exit 1 if anything is damaged
    sazs-store publish priors/x.zarr s3://team-bucket/priors/x.zarr   # immutable upload
    sazs-store pull s3://team-bucket/priors/x.zarr /data/priors/x.zarr
    sazs-store pull https://example.org/priors/x.zarr priors/x.zarr   # any static web server or public bucket
    sazs-store merge priors/all.zarr priors/part0.zarr priors/part1.zarr
    sazs-store show priors/x.zarr --ids astronaut --images /path/to/images
    sazs-store gallery priors/x.zarr --out gallery/                  # static HTML: open gallery/index.html
    sazs-store export priors/x.zarr eigs/ --format sazs-png          # SAZS eigen masks ({id}_k{i}.png); dsm, npz
    sazs-store import-dsm dsm/eigs --dataset voc --data DATA --split val --out priors/voc-dsm.zarr
    sazs-store unlock priors/x.zarr                                   # remove a dead writer's lock

Object storage goes through fsspec (s3:// needs s3fs, gs:// gcsfs, http(s):// aiohttp,
for a store published as static files); credentials come from the usual environment;
--storage-options passes extra options as JSON, e.g.
'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}'.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sazs.core.console import run_command, setup_logging
from sazs.core.faults import arm_from_environment

from .writer import StoreError

log = logging.getLogger("sazs.store")


def _options(args) -> dict | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        return json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_info(url: str, storage_options: dict | None = None) -> dict:
    from .integrity import is_finalized, list_objects, missing_objects
    from .reader import open_store

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
        f"graph        k={info['graph'].get('k')}, threshold={info['graph'].get('threshold')}, "
        f"colour weight={info['graph'].get('color_weight')}",
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
    from .integrity import verify

    report = verify(args.store, storage_options=_options(args), progress=not args.no_progress)
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_finalize(args) -> int:
    from .integrity import finalize

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
    from .remote import publish

    url = publish(args.store, args.url, storage_options=_options(args), progress=not args.no_progress)
    print(f"published {args.store} → {url}")
    return 0


def cmd_pull(args) -> int:
    from .remote import pull

    pull(args.url, args.dest, storage_options=_options(args), progress=not args.no_progress)
    print(f"pulled {args.url} → {args.dest} (verified)")
    return 0


def cmd_merge(args) -> int:
    from .merge import merge

    counts = merge(
        args.out, args.inputs, on_conflict=args.on_conflict, overwrite=args.overwrite, storage_options=_options(args)
    )
    print(
        f"merged {len(args.inputs)} stores → {args.out}: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['pending']} pending"
    )
    return 0


def _find_image(images: Path, id_: str):
    import numpy as np
    from PIL import Image

    for candidate in sorted(images.glob(f"{id_}.*")):
        try:
            with Image.open(candidate) as img:
                return np.asarray(img.convert("RGB"))
        except OSError:
            continue
    return None


def cmd_show(args) -> int:
    from .preview import draw_priors
    from .reader import open_store

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
    # The dataset the store was computed from, as its manifest names it (readers: sazs.pipeline).
    from sazs.datasets.readers import DatasetConfig, ImageError, build_dataset

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
    from .gallery import GalleryConfig, build_gallery
    from .reader import open_store

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


def cmd_export(args) -> int:
    from .export import ExportConfig, export_store

    cfg = ExportConfig(
        format=args.format,
        ids=tuple(args.ids) if args.ids else None,
        limit=args.limit,
        num_vectors=args.num_vectors,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = export_store(args.store, args.out, cfg, storage_options=_options(args))
    print(summary.line())
    return 1 if summary.failed else 0


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r} is not HxW, e.g. 32x48") from None
    return h, w


def cmd_import_dsm(args) -> int:
    # The image list and sizes come from the dataset's reader (sazs.pipeline), as for sazs-priors run.
    from sazs.datasets.readers import DatasetConfig, ImageError, build_dataset, image_size

    from .dsm import ImportConfig, import_dsm
    from .integrity import finalize

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
    from .lock import break_lock, describe

    info = break_lock(args.store)
    print(f"removed the lock of {describe(info)}" if info else f"{args.store} was not locked")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sazs-store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for URLs, as JSON")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "info", parents=[common], help="summary of a store", description="Example: sazs-store info priors/x.zarr --json"
    )
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="recompute checksums and check the content",
        description="Exit status 0 when intact, 1 when damaged. Example: sazs-store verify priors/x.zarr",
    )
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "finalize",
        parents=[common],
        help="write checksums and summary (makes the store immutable)",
        description="Example: sazs-store finalize priors/x.zarr",
    )
    p.add_argument("store")
    p.add_argument("--allow-incomplete", action="store_true", help="finalize even with pending images")
    p.set_defaults(func=cmd_finalize)
    p = sub.add_parser(
        "publish",
        parents=[common],
        help="upload a finalized store (immutable, idempotent)",
        description="Example: sazs-store publish priors/x.zarr s3://bucket/priors/x.zarr",
    )
    p.add_argument("store")
    p.add_argument("url")
    p.set_defaults(func=cmd_publish)
    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download a published store and verify it",
        description="Example: sazs-store pull s3://bucket/priors/x.zarr priors/x.zarr",
    )
    p.add_argument("url")
    p.add_argument("dest")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser(
        "merge",
        parents=[common],
        help="combine stores computed on disjoint parts of one dataset",
        description="Inputs must share one fingerprint. Per image: done beats failed beats pending; an image done "
        "in several inputs must be identical in each (else --on-conflict first takes the first input's). "
        "Example: sazs-store merge priors/all.zarr priors/part0.zarr priors/part1.zarr",
    )
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--on-conflict", choices=["error", "first"], default="error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser(
        "show",
        parents=[common],
        help="draw the priors of chosen images to a PNG",
        description="Example: sazs-store show priors/x.zarr --ids astronaut --images ./imgs --out x.png",
    )
    p.add_argument("store")
    p.add_argument("--ids", nargs="*", default=None)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--images", default=None, help="folder with the images as <id>.<ext> (optional)")
    p.add_argument("--out", default=None, help="PNG path (default ./<store>.show.png)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "gallery",
        parents=[common],
        help="a static HTML page of the store's priors (opens from disk)",
        description="Writes OUT/index.html and OUT/thumbs/*.png: the manifest summarised, a card per done image "
        "(image, eigenvector heat maps, eigen-segments), a search by id (index.html?q=ID), sorting by "
        "eigengap λ2−λ1 (0-based: the gap after the Fiedler value) or by residual (the largest "
        "|Lv − λv| of the image), and the failed images with their reasons. Images come from --images, "
        "else from the dataset the manifest names; without them the cards show the eigen-maps only. "
        "Example: sazs-store gallery priors/x.zarr --out gallery/ --images ./imgs",
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous gallery: replaced)")
    p.add_argument(
        "--images", default=None, help="folder with the images as <id>.<ext> (default: the manifest's dataset)"
    )
    p.add_argument("--no-images", action="store_true", help="eigen-maps only, no images")
    p.add_argument("--limit", type=int, default=500, help="the first N done images (default 500; 0: all)")
    p.add_argument("--vectors", type=int, default=3, help="eigenvectors drawn per image (default 3)")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail size in pixels (default 160)")
    p.add_argument("--workers", type=int, default=4, help="threads making thumbnails (default 4)")
    p.set_defaults(func=cmd_gallery)
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write the priors as SAZS eigen-mask PNGs, DSM .pth or .npz files",
        description="One image at a time, resumable (complete files are skipped). sazs-png: OUT/{id}_k{i}.png, "
        "i = 0..n-1 for the non-trivial eigenvectors 1..n (default n = 5), 255 where the vector, "
        "upsampled bilinearly to the image's size, is > 0. dsm: OUT/{id}.pth, Deep Spectral Methods' "
        "{'eigenvalues', 'eigenvectors'} (generalised v, their sign rule). npz: OUT/{id}.npz. Ids "
        "with '/' become subfolders. Exit 1 when some image could not be exported. "
        "Example: sazs-store export priors/x.zarr eigs/ --format sazs-png --num-vectors 5",
    )
    p.add_argument("store")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=["sazs-png", "dsm", "npz"], required=True)
    p.add_argument("--ids", nargs="+", default=None, help="only these image ids")
    p.add_argument("--limit", type=int, default=None, help="only the first N images that have priors")
    p.add_argument(
        "--num-vectors",
        type=int,
        default=None,
        metavar="N",
        help="non-trivial eigenvectors to write (default 5 for sazs-png, all for dsm/npz, "
        "which also keep the trivial one)",
    )
    p.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "import-dsm",
        parents=[common],
        help="turn a folder of Deep Spectral Methods eigenvector files into a store",
        description="Reads EIGS_DIR/{id}.pth for every image of the dataset (torch.load weights_only=True: "
        "nothing in a file is executed); a missing file, one of the wrong shape, or one that is not "
        "plain tensors is a failed image with its reason. Grid per image: --grid, else the file's "
        "'grid' (files written by sazs-store export), else (H // P, W // P) with P = --patch-size "
        "(DSM's default dino_vits16: 16). The store is finalized and marked imported. Example: "
        "sazs-store import-dsm data/VOC2012/eigs/laplacian --dataset voc --data data/VOCdevkit/VOC2012 "
        "--split trainaug --out priors/voc-dsm.zarr",
    )
    p.add_argument("eigs_dir")
    p.add_argument("--dataset", required=True, help="dataset reader (as for sazs-priors run), e.g. voc, coco, folder")
    p.add_argument("--data", default=None, help="dataset root (default: the reader's)")
    p.add_argument("--split", default=None, help="split, e.g. val, train (default: the dataset's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the dataset")
    p.add_argument("--out", required=True, help="the store to write")
    p.add_argument("--patch-size", type=int, default=16, help="DSM's patch size P (default 16, dino_vits16)")
    p.add_argument("--grid", type=_grid, default=None, metavar="HxW", help="one patch grid for every image")
    p.add_argument("--num-eigs", type=int, default=None, help="keep the first K eigenvectors (default: the files' K)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--retry-failed", action="store_true", help="on resume, retry the images that failed")
    p.set_defaults(func=cmd_import_dsm)
    p = sub.add_parser(
        "unlock",
        help="remove the lock a dead writer left behind",
        description="Example: sazs-store unlock priors/x.zarr",
    )
    p.add_argument("store")
    p.set_defaults(func=cmd_unlock)

    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    arm_from_environment()

    return run_command("sazs-store", args, user_errors=(StoreError,))


if __name__ == "__main__":
    sys.exit(main())
