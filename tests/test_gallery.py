"""sazs-store gallery: the static page, its thumbnails, and the page in a real headless Chromium.

The browser test drives Debian's chromium through the DevTools protocol (a websocket, here
aiohttp's client): console errors, failed loads, the search (``?q=ID``), the sort and the
images' decoded sizes are read from the live page. It is skipped when chromium is not
installed (``apt-get install chromium``; .ci/run installs it).
"""

import asyncio
import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from storecheck import toy_manifest

from sazs.stores import cli
from sazs.stores.gallery import MARKER, eigengap
from sazs.stores.integrity import finalize
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 5
IDS = ["cat", "dog&bird", "img02", "img03", "boat", "img05", "tree"]
FAILED = {"img03": "solver did not converge after 300 iterations (synthetic)"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_store(path, images: Path | None = None):
    """A toy store whose eigenvectors follow each image's two halves, and the images as <id>.png."""
    with StoreWriter.open(path, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K, max_grid=(8, 10))) as w:
        for shard in range(w.num_shards):
            results = []
            for i in w.shard_range(shard):
                if IDS[i] in FAILED:
                    results.append(ImageResult(index=i, error=FAILED[IDS[i]]))
                    continue
                rng = np.random.default_rng(i)
                h, w_ = 5 + i % 3, 6 + i % 4
                yy, xx = np.mgrid[0:h, 0:w_]
                vecs = np.stack([np.ones((h, w_)), xx - w_ / 2, yy - h / 2, xx * yy - 3, rng.standard_normal((h, w_))])
                eigvals = np.array([0.0, 0.1, 0.1 + 0.05 * i, 0.8, 0.9], np.float32)
                results.append(
                    ImageResult(
                        index=i,
                        image_size=(h * 16, w_ * 16),
                        grid=(h, w_),
                        eigvals=eigvals,
                        eigvecs=vecs.astype(np.float32),
                        residuals=np.full(K, 1e-6 * (i + 1), np.float32),
                    )
                )
                if images is not None:
                    images.mkdir(exist_ok=True)
                    pixels = np.zeros((h * 16, w_ * 16, 3), np.uint8)
                    pixels[:, : w_ * 8] = (200, 60 + 20 * i, 40)
                    pixels[:, w_ * 8 :] = (30, 90, 200)
                    Image.fromarray(pixels).save(images / f"{IDS[i]}.png")
            w.write_shard(shard, results)
    finalize(str(path))
    return path


@pytest.fixture
def gallery(tmp_path):
    """(store, images folder, gallery folder) with the gallery written through the CLI."""
    store = make_store(tmp_path / "x.zarr", tmp_path / "images")
    out = tmp_path / "gallery"
    assert (
        cli.main(
            [
                "gallery",
                str(store),
                "--out",
                str(out),
                "--images",
                str(tmp_path / "images"),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    return store, tmp_path / "images", out


def _srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_the_page_and_its_thumbnails(gallery):
    store, _, out = gallery
    page = (out / "index.html").read_text()
    s = open_store(store)
    done = s.done_ids()
    assert MARKER in page and page.count('class="card"') == len(done) == 6
    # self-contained: no external script, style sheet or picture
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "<link" not in page
    srcs = _srcs(page)
    assert len(srcs) == len(done) * (1 + 3 + 1)  # image, eigvec 1..3, segments
    for src in srcs:
        assert (out / src).is_file() and not Path(src).is_absolute()
    with Image.open(out / "thumbs" / "000000-image.png") as im:  # cat: 80 x 96 pixels -> longer side 160
        assert max(im.size) == 160 and im.size == (160, round(80 * 160 / 96))
    # ids escaped, the manifest summarised, the failures listed with their reasons
    assert 'data-id="dog&amp;bird"' in page and s.fingerprint in page and "toy / val" in page
    assert "img03" in page and FAILED["img03"] in page and "failures (1)" in page
    # the sort keys: eigengap λ2 − λ1 and the largest residual of each image
    for id_ in done:
        prior = s.get(id_)
        card = re.search(rf'data-id="{re.escape(id_.replace("&", "&amp;"))}"[^>]*>', page)[0]
        assert float(re.search(r'data-gap="([^"]+)"', card)[1]) == pytest.approx(eigengap(prior.eigvals), rel=1e-5)
        assert float(re.search(r'data-residual="([^"]+)"', card)[1]) == pytest.approx(prior.residuals.max(), rel=1e-5)


def test_without_images_the_cards_show_the_eigen_maps(tmp_path, capsys):
    store = make_store(tmp_path / "x.zarr")
    out = tmp_path / "g"
    # the manifest's dataset ("toy" at /nowhere) is not readable here: maps only, and the page says why
    assert cli.main(["gallery", str(store), "--out", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    assert page.count("no image</div>") == 6 and "not readable here" in page and "--images ROOT" in page
    assert not any("-image.png" in s for s in _srcs(page)) and len(_srcs(page)) == 6 * 4
    assert f"file://{(out / 'index.html').resolve()}" in capsys.readouterr().out


def test_the_output_folder(tmp_path, gallery, capsys):
    store, images, out = gallery
    (out / "thumbs" / "stale.png").write_bytes(b"x")
    assert cli.main(["gallery", str(store), "--out", str(out), "--no-images", "--limit", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == sorted(
        f"{i:06d}-{k}.png" for i in range(2) for k in ("vec1", "vec2", "vec3", "seg")
    )
    assert "2 shown (the first 2 of 6 done)" in (out / "index.html").read_text()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert cli.main(["gallery", str(store), "--out", str(busy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty and does not hold a sazs gallery" in err and len(err.strip().splitlines()) == 1
    assert (
        cli.main(
            ["gallery", str(store), "--out", str(tmp_path / "g2"), "--images", str(tmp_path / "none"), "--no-progress"]
        )
        == 2
    )
    assert "--images" in capsys.readouterr().err


# -- in a real browser ---------------------------------------------------------------------------


class DevTools:
    """The least of the Chrome DevTools protocol: commands by id, events collected by name."""

    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []
        self.arrived = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                self.arrived.set()

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        reply = await fut
        assert "error" not in reply, reply
        return reply.get("result", {})

    async def until(self, method: str) -> dict:
        while True:
            hit = next((e for e in self.events if e["method"] == method), None)
            if hit:
                self.events.remove(hit)
                return hit
            self.arrived.clear()
            await self.arrived.wait()

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out


async def _browse(index: Path, profile: Path, screenshot: Path, queries: dict[str, str]) -> dict:
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--disable-extensions",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    drain = None
    try:
        while True:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            line = (await proc.stderr.readline()).decode()
            assert line, "chromium exited before opening its DevTools port"
            if m := re.search(r"ws://127\.0\.0\.1:(\d+)/", line):
                break
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling up
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{m[1]}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                for domain in ("Page", "Runtime", "Log"):
                    await dt.send(f"{domain}.enable")
                out = {}
                for name, query in queries.items():
                    dt.events.clear()
                    await dt.send("Page.navigate", url=index.as_uri() + query)
                    await dt.until("Page.loadEventFired")  # after every <img> has loaded or failed
                    out[name] = {
                        "errors": dt.errors(),
                        "visible": await dt.evaluate(
                            "Array.from(document.querySelectorAll('.card:not(.hidden)')).map(c => c.dataset.id)"
                        ),
                        "box": await dt.evaluate("document.getElementById('q').value"),
                        "count": await dt.evaluate("document.getElementById('count').textContent"),
                        "images": await dt.evaluate(
                            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                            "i.naturalWidth, i.naturalHeight])"
                        ),
                    }
                    if name == "all":
                        shot = await dt.send("Page.captureScreenshot", format="png")
                        screenshot.write_bytes(base64.b64decode(shot["data"]))
                    # typing in the box filters without reloading
                    out[name]["typed"] = await dt.evaluate(
                        "(() => { const q = document.getElementById('q'); q.value = 'IMG0'; "
                        "q.dispatchEvent(new Event('input')); return Array.from("
                        "document.querySelectorAll('.card:not(.hidden)')).map(c => c.dataset.id); })()"
                    )
                dt.reader.cancel()
                return out
    finally:
        proc.terminate()
        await proc.wait()
        if drain is not None:
            await drain


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium): the gallery's "
    "browser test needs a real headless browser",
)
def test_the_gallery_in_a_headless_browser(gallery, tmp_path):
    store, _, out = gallery
    s = open_store(store)
    by_gap = sorted(s.done_ids(), key=lambda i: (-eigengap(s.get(i).eigvals), s.index(i)))
    pages = asyncio.run(
        asyncio.wait_for(
            _browse(
                out / "index.html",
                tmp_path / "profile",
                tmp_path / "gallery.png",
                {"all": "", "search": "?q=boat", "sorted": "?sort=gap"},
            ),
            timeout=120,
        )
    )
    for name, page in pages.items():
        assert page["errors"] == [], (name, page["errors"])
        assert page["images"] and all(complete and w > 0 and h > 0 for _, complete, w, h in page["images"]), name
        assert sorted(page["typed"]) == ["img02", "img05"]  # case-insensitive substring
    assert pages["all"]["visible"] == s.done_ids() and pages["all"]["count"] == "6 of 6 shown"
    assert pages["search"]["visible"] == ["boat"] and pages["search"]["box"] == "boat"
    assert pages["search"]["count"] == "1 of 6 shown"
    assert pages["sorted"]["visible"] == by_gap != s.done_ids()
    with Image.open(tmp_path / "gallery.png") as shot:
        assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # drawn, not blank


def test_a_pipeline_store_shows_the_images_of_its_dataset(tmp_path):
    """A store made by sazs-priors: without --images the gallery reads the dataset its manifest names."""
    from sazs.pipeline import cli as priors_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("left", "right"):
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[:, :32] = rng.integers(0, 255, 3)
        pixels[:, 32:] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(photos / f"{name}.png")
    store = tmp_path / "p.zarr"
    assert (
        priors_cli.main(
            [
                "run",
                "--dataset",
                "folder",
                "--data",
                str(photos),
                "--extractor",
                "color",
                "--short-side",
                "32",
                "--out",
                str(store),
                "--no-progress",
                "--preview",
                "0",
            ]
        )
        == 0
    )
    out = tmp_path / "g"
    assert cli.main(["gallery", str(store), "--out", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    assert page.count('class="card"') == 2 and "no image</div>" not in page
    assert "from the dataset folder" in page
    with Image.open(out / "thumbs" / "000000-image.png") as im:
        assert im.size == (160, 120)
