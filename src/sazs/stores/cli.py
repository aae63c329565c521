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
import sys

from sazs.core.argtypes import at_least
from sazs.core.console import run_command, setup_logging
from sazs.core.faults import arm_from_environment
from sazs.segments.refine import list_refiners

from .commands import (
    cmd_export,
    cmd_finalize,
    cmd_gallery,
    cmd_import_dsm,
    cmd_info,
    cmd_merge,
    cmd_publish,
    cmd_pull,
    cmd_show,
    cmd_unlock,
    cmd_verify,
)
from .export import FORMATS
from .format import StoreError


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r} is not HxW, e.g. 32x48") from None
    return h, w


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
        "{'eigenvalues', 'eigenvectors'} (generalised v, their sign rule). npz: OUT/{id}.npz. segments: "
        "OUT/{id}.png, a GT-free segment map at the image's size (mode L, or I;16 above 256 segments). Ids "
        "with '/' become subfolders. Exit 1 when some image could not be exported. "
        "Example: sazs-store export priors/x.zarr eigs/ --format sazs-png --num-vectors 5",
    )
    p.add_argument("store")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=FORMATS.names(), required=True, help=FORMATS.help("format"))
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
    p.add_argument(
        "--refine",
        default=None,
        choices=list_refiners(),
        help="object-masks, segments: refine each mask or segment map with its image (read from --images, "
        "else the manifest's dataset)",
    )
    p.add_argument("--images", default=None, help="with --refine: folder of <id>.<ext> images")
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
    p.add_argument("--patch-size", type=at_least(1), default=16, help="DSM's patch size P (default 16, dino_vits16)")
    p.add_argument("--grid", type=_grid, default=None, metavar="HxW", help="one patch grid for every image")
    p.add_argument(
        "--keep-eigs",
        type=int,
        default=None,
        dest="num_eigs",
        metavar="K",
        help="import the first K eigenvectors of each file (default: the files' K)",
    )
    p.add_argument("--shard-size", type=at_least(1), default=64, help="images per store shard (default 64)")
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
