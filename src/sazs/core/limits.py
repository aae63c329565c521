"""Every size and time bound of sazs, in one place.

Everything sazs reads may come from someone else (a store pulled from a web server, a
checkpoint, a dataset's list files), so each read is bounded before anything is allocated
or waited for. The bounds sit far above any real input and far below what would exhaust a
machine (the aim: no hostile input of 20 MB makes a command use more than 1.5 GB or run
longer than a minute).

A user raises a bound with the environment variable ``SAZS_<NAME>`` (e.g.
``SAZS_HTTP_TIMEOUT_S=120 sazs-store pull https://...``), read once at import; where a
command-line flag exists for one (``--max-megapixels``), the flag overrides it for that
run. Library code that a test shrinks (the HTTP timeouts) reads ``limits.NAME`` when it
runs, not at import.
"""

from __future__ import annotations

import os


def _env(name: str, default: int | float) -> int | float:
    """``default``, or the positive number in ``$SAZS_<name>`` (a bad value is an error naming it)."""
    text = os.environ.get(f"SAZS_{name}")
    if text is None or not text.strip():
        return default
    try:
        value = type(default)(float(text)) if isinstance(default, int) else float(text)
    except ValueError:
        raise ValueError(f"$SAZS_{name}={text!r} is not a number (default {default})") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"$SAZS_{name}={text!r} must be a positive finite number (default {default})")
    return value


# -- metadata and side files -------------------------------------------------------------------
# A zarr.json or side JSON file (a real root zarr.json is a few KiB).
MAX_JSON_BYTES = _env("MAX_JSON_BYTES", 16 << 20)
# Nesting of JSON objects/arrays (a real manifest nests 5 deep; Python's parser recurses).
MAX_JSON_DEPTH = _env("MAX_JSON_DEPTH", 64)
# A split list file (VOC ImageSets); the biggest real one (SBD trainaug, 10,582 ids) is ~130 KB.
MAX_LIST_BYTES = _env("MAX_LIST_BYTES", 16 << 20)
# HSNet's split lists (few-shot benchmarks): the largest (COCO-20i training) is a few MB with
# some 10^5 entries.
MAX_SPLIT_LIST_BYTES = _env("MAX_SPLIT_LIST_BYTES", 16 << 20)
MAX_SPLIT_LIST_ENTRIES = _env("MAX_SPLIT_LIST_ENTRIES", 2_000_000)
MAX_IMAGE_NAME = _env("MAX_IMAGE_NAME", 1024)  # characters of one image name in a list

# -- what a prior store may claim (checked on its metadata before Zarr decodes anything) ---------
# Far above any real dataset (COCO train: 118k images, grids under 100x100, K = 8..32);
# ImageNet-1k train (1.28M) fits. The reader keeps every id as a Python string and in an index
# (~150 bytes each), so 2 million ids take ~300 MB.
MAX_IMAGES = _env("MAX_IMAGES", 2_000_000)
MAX_EIGS = _env("MAX_EIGS", 1024)
MAX_GRID_SIDE = _env("MAX_GRID_SIDE", 4096)
# One image's eigenvectors, K * Hmax * Wmax * 2 bytes (float16): the largest inner chunk
# (K = 64 on a 1400 x 1400 patch grid; a real one is about 1 MB).
MAX_CHUNK_BYTES = _env("MAX_CHUNK_BYTES", 256 << 20)
# One stored object before compression (a shard: what a writer, merge or verify holds at once
# per thread; a real one is 10..100 MB). Every chunk decodes to at most this.
MAX_SHARD_BYTES = _env("MAX_SHARD_BYTES", 1 << 30)
# One string of the ids and errors arrays, in UTF-8 bytes (a failure reason is cut to this).
MAX_STRING_BYTES = _env("MAX_STRING_BYTES", 4 << 10)
# A per-image table the reader holds whole (eigenvalues, residuals: N x K float32): ImageNet's
# 1.28M images at K = 32 take 164 MB.
MAX_TABLE_BYTES = _env("MAX_TABLE_BYTES", 256 << 20)
# Memory the threads of verify and merge may hold at once (a shard each): fewer threads when
# shards are large.
MAX_PARALLEL_BYTES = _env("MAX_PARALLEL_BYTES", 1 << 30)
# A compressed chunk must declare (zstd frame header, blosc header) or decode to at most the
# size its array's metadata fixes for it; these bytes of slack cover codec framing.
CHUNK_SLACK_BYTES = 4096
# A DSM eigenvector file (.pth, float32 on disk): twice the largest image a store holds.
MAX_DSM_FILE_BYTES = 2 * MAX_CHUNK_BYTES

# -- images ---------------------------------------------------------------------------------------
# Largest image decoded, in pixels (H x W), checked from the header before decoding. Pillow's
# own bomb limit (~179 MP) lets a 13000x13000 PNG through (~5 GB decoded); every extractor
# resizes to a short side of a few hundred pixels. `sazs-priors run --max-megapixels` too.
MAX_PIXELS = _env("MAX_PIXELS", 40_000_000)
# Side of one gallery thumbnail in pixels (a card holds a few: 1024 draws them at 4x the
# default 160 and keeps a 500-image gallery's memory under 1 GB).
MAX_THUMB_SIZE = _env("MAX_THUMB_SIZE", 1024)

# -- reading over HTTP(S) (a store served as static files) -------------------------------------------
# One response body. The reader asks for byte ranges of a shard (one image's chunk); pull and
# verify read whole objects, a shard (a real one is a few MB to a few hundred MB).
MAX_HTTP_BYTES = _env("MAX_HTTP_BYTES", 512 << 20)
# Seconds to open a connection, to wait for any byte (headers or body) and for a whole request.
# A request slower than HTTP_TIMEOUT_S (a server that trickles bytes) fails; a slow link that
# pulls big shards raises it.
HTTP_CONNECT_TIMEOUT_S = _env("HTTP_CONNECT_TIMEOUT_S", 10.0)
HTTP_READ_TIMEOUT_S = _env("HTTP_READ_TIMEOUT_S", 15.0)
HTTP_TIMEOUT_S = _env("HTTP_TIMEOUT_S", 30.0)
# Objects of a finalised store read over HTTP are fetched whole and checked against its checksum
# file (stores/verified.py); this many bytes of them are kept per open store.
HTTP_CACHE_BYTES = _env("HTTP_CACHE_BYTES", 256 << 20)

# -- torch files (checkpoints, DSM eigenvector files, ViT weights; core/torchfiles.py) ------------
# torch.save writes a zip whose entries are stored, never compressed; a hand-made file may
# deflate them, and deflated zeros expand ~1000x (a 12 MB file holding a 2 GiB tensor). The
# sizes are read from the zip's directory before anything is decompressed: a deflated entry
# may unpack to at most this many times its packed size (real float data deflates ~1.1x).
MAX_UNPACK_RATIO = _env("MAX_UNPACK_RATIO", 4)
# Unpacked total of one torch file: DINOv2 ViT-L/14 weights are 1.2 GB, a fine-tuned ViT-B
# checkpoint with its optimiser state ~1.1 GB. (DSM files: MAX_DSM_FILE_BYTES.)
MAX_TORCH_FILE_BYTES = _env("MAX_TORCH_FILE_BYTES", 8 << 30)
# A torch file's pickle (data.pkl: the structure, not the tensors). A checkpoint's is ~6 KB
# (plus ~100 bytes per image it skipped), ViT weights' ~20 KB; a hostile one builds ~130 bytes
# of Python objects per byte, at ~0.4 MB/s (8 MiB of empty lists: 1.1 GB and 21 s).
MAX_TORCH_PICKLE_BYTES = _env("MAX_TORCH_PICKLE_BYTES", 2 << 20)

# -- a checkpoint's config (the model is rebuilt from it: model/checkpoint.py) ---------------------
# Channels of the dense head (default 256; head_dim^2 weights per 3x3 conv).
MAX_HEAD_DIM = _env("MAX_HEAD_DIM", 4096)
# Input side in pixels: the training crop, which is also the default inference short side
# (default 384-512; the backbone's tokens and attention grow with its square and fourth power).
MAX_INPUT_SIDE = _env("MAX_INPUT_SIDE", 2048)

# -- numbers on the command line (core/argtypes.py) -------------------------------------------------
# Weights of the terms of a prior graph (--global-weight, --color-weight): at 100 the term
# outweighs the kNN graph by two orders already; much larger values overflow the degrees.
MAX_GRAPH_WEIGHT = _env("MAX_GRAPH_WEIGHT", 1000.0)
# Learning rates (--lr): the paper's are 1e-3 / 2e-4; 10 diverges within a step anyway.
MAX_LEARNING_RATE = _env("MAX_LEARNING_RATE", 10.0)

# -- dataset annotation files (datasets/coco.py) ----------------------------------------------------
# A COCO instances JSON: the largest real one (instances_train2017.json) is 448 MB. Decoding
# costs ~10x the text in Python objects; nesting is bounded by the parser's recursion limit,
# and each image's height x width by MAX_PIXELS before its mask is allocated.
MAX_ANNOTATION_JSON_BYTES = _env("MAX_ANNOTATION_JSON_BYTES", 1 << 30)
