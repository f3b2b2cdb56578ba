"""The viewer (``deconvnet serve``): its JSON API on a real uvicorn server (bad uploads, 20 concurrent
requests, predictions equal to the model's, the top-k cache) and the page in headless Chromium."""
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")

from deconvnet.cli import main  # noqa: E402
from deconvnet.data import load_image  # noqa: E402
from deconvnet.probe import activations  # noqa: E402
from deconvnet.serve import K, STRONGEST, Viewer, create_app  # noqa: E402
from deconvnet.subject import from_checkpoint  # noqa: E402
from deconvnet.topk import topk_pass  # noqa: E402

DATA, LIMIT = "fashion-mnist:test", 300
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Requests run in several threads at once on 28 px images: one intra-op thread each is faster
    than oversubscribing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """The app over the tiny checkpoint, served by uvicorn on a free port in a background thread."""
    cache = tmp_path_factory.mktemp("serve-cache")
    saved_cache = os.environ.get("DECONVNET_CACHE")
    os.environ["DECONVNET_CACHE"] = str(cache)  # the runner's cache of this module's tests, empty at first
    atlas = tmp_path_factory.mktemp("atlas")  # stands in for a `deconvnet atlas` site
    (atlas / "index.html").write_text("<html>atlas</html>")
    (atlas / "conv1.html").write_text('<html><div id="3">conv1 map 3</div></html>')
    viewer = Viewer(from_checkpoint(tiny_checkpoint), DATA, LIMIT, atlas=atlas)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(viewer), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "viewer": viewer, "cache": cache}
    uv.should_exit = True
    thread.join(10)
    os.environ["DECONVNET_CACHE"] = saved_cache  # the session's (conftest.py)


def call(server, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """GET ``path``, or POST ``body`` to it: (status, JSON answer)."""
    request = urllib.request.Request(server["url"] + path, data=body)
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def encoded(image: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


def dataset_png(server, index: int) -> bytes:
    return encoded(server["viewer"].source.get([index])[0, 0].numpy())


def expected_probabilities(viewer, raw: torch.Tensor) -> torch.Tensor:
    """The model's softmax on uint8 (C, S, S), evaluated here, outside the server."""
    with torch.no_grad():
        return torch.softmax(viewer.model(viewer.preprocess.eval(raw[None]))[0], 0)


def wait_for_topk(server, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, state = call(server, "/api/topk")
        if state["state"] != "running":
            return state
        time.sleep(0.2)
    raise AssertionError(f"top-k still running after {timeout} s: {state}")


def test_page_and_info(server):
    with urllib.request.urlopen(server["url"] + "/", timeout=30) as response:
        assert b"deconvnet viewer" in response.read()
    status, info = call(server, "/api/info")
    assert status == 200
    assert [layer["name"] for layer in info["layers"]] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert info["topk_images"] == LIMIT and info["k"] == K and info["rules"] == ["deconvnet", "guided", "gradient"]


def test_bad_uploads_get_a_clear_error_and_the_server_keeps_serving(server):
    rng = np.random.default_rng(0)
    jpeg = encoded(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "JPEG")
    png = dataset_png(server, 0)
    cases = [
        (b"this is a text file, whatever its name says\n" * 10, 400, "not a PNG or JPEG"),
        (bytes(50 * 2**20), 413, "the limit is 10 MB"),
        (jpeg[:len(jpeg) // 2], 400, "cannot be decoded"),
        (png[:len(png) - 40], 400, "cannot be decoded"),
        (encoded(rng.integers(0, 256, (16, 16), dtype=np.uint8), "GIF"), 400, "only PNG and JPEG"),
        (b"", 400, "empty"),
        (encoded(np.zeros((6000, 8000), dtype=np.uint8)), 400, "at most 40 megapixels"),  # 48 MP in 50 kB
    ]
    for body, code, message in cases:
        status, answer = call(server, "/api/upload", body)
        assert status == code and message in answer["error"], (len(body), status, answer)
    assert call(server, "/api/info")[0] == 200
    status, answer = call(server, "/api/upload", png)
    assert status == 200 and answer["prediction"]


def test_other_bad_requests_get_json_errors(server):
    assert call(server, "/api/images/100000") == (400, {"error": f"image 100000 is outside {DATA}'s 10000 images"})
    assert call(server, "/api/images?offset=x")[0] == 400
    wait_for_topk(server)
    assert "unknown layer" in call(server, "/api/topk/fc6/0")[1]["error"]
    assert call(server, "/api/topk/conv1/100000")[0] == 400
    assert call(server, "/api/nothing")[0] == 404


def test_randomisation_strip_of_a_units_panel(server):
    """The sanity checks of image 3's strongest conv2 unit: the strip and each rule's correlation once
    every layer from conv2 down is re-initialised, as deconvnet.sanity computes them directly."""
    from deconvnet.sanity import sanity, sanity_to_json

    status, result = call(server, "/api/sanity/3/conv2")
    assert status == 200 and result["strip"].startswith("data:image/png;base64,")
    viewer = server["viewer"]
    direct = sanity(viewer.subject, viewer.source.get([3]), layers=["conv2"], steps=2)
    spearman = sanity_to_json(direct)["per_layer"]["conv2"]["cascade"]["spearman"]
    assert result["all_randomised"] == {rule: steps[-1][0][0] for rule, steps in spearman.items()}
    assert call(server, "/api/sanity/3/fc6")[0] == 400


def test_analysis_matches_direct_evaluation(server):
    viewer = server["viewer"]
    status, result = call(server, "/api/images/5")
    assert status == 200
    raw = viewer.source.get([5])[0]
    expected = expected_probabilities(viewer, raw)
    assert np.allclose(result["probabilities"], expected.numpy(), atol=1e-5)
    assert result["prediction"][0]["name"] == viewer.subject.classes[int(expected.argmax())]
    assert result["image"]["label"] == viewer.source.classes[int(viewer.source.labels[5])]
    with torch.no_grad():
        acts = activations(viewer.model, viewer.preprocess.eval(raw[None]), viewer.layers)
    for layer in result["layers"]:
        peaks = acts[layer["layer"]][0].flatten(1).amax(1)
        assert len(layer["features"]) == STRONGEST
        assert [f["feature"] for f in layer["features"]] == peaks.argsort(descending=True)[:STRONGEST].tolist()
        assert all(set(f["projections"]) == {"deconvnet", "guided", "gradient"} for f in layer["features"])
    occlusion = result["occlusion"]
    assert occlusion["target"] == int(viewer.source.labels[5])  # data set images follow their true class
    assert occlusion["grid"] == [13, 13] and occlusion["layer"] == "conv5"
    # Fig. 7e as the figure colours it: every cell of the label map has its label's legend colour
    labels = np.array(Image.open(io.BytesIO(base64.b64decode(occlusion["label"].split(",")[1]))).convert("RGB"))
    colors = {tuple(int(entry["color"][i:i + 2], 16) for i in (1, 3, 5)): entry["class"] for entry in occlusion["legend"]}
    assert labels.shape[:2] == (13, 13) and {tuple(c) for c in labels.reshape(-1, 3)} == set(colors)
    assert len(colors) == len(occlusion["legend"])  # distinct

    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # resized, grey, cropped
    status, result = call(server, "/api/upload", encoded(rgb, "JPEG"))
    assert status == 200
    raw = load_image(io.BytesIO(encoded(rgb, "JPEG")), viewer.preprocess.stored_size, viewer.preprocess.channels)
    expected = expected_probabilities(viewer, raw)
    assert np.allclose(result["probabilities"], expected.numpy(), atol=1e-5)
    assert result["occlusion"]["target"] == int(expected.argmax())  # uploads follow the prediction


def test_twenty_concurrent_requests_complete_correctly(server):
    viewer = server["viewer"]
    wait_for_topk(server)
    jobs = [("upload", i) for i in range(8)] + [("image", i) for i in range(10, 18)] + \
           [("topk", ("conv3", m)) for m in (1, 1, 2, 3)]

    def run(job):
        kind, arg = job
        if kind == "upload":
            return call(server, "/api/upload", dataset_png(server, arg))
        if kind == "image":
            return call(server, f"/api/images/{arg}")
        return call(server, f"/api/topk/{arg[0]}/{arg[1]}")

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    assert len(jobs) == 20 and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200]
    table = viewer.topk.tables["conv3"]
    for (kind, arg), (_, answer) in zip(jobs, answers):
        if kind == "topk":
            layer, m = arg
            assert [e["image"] for e in answer["entries"]] == table.images[m].tolist()
            assert [e["value"] for e in answer["entries"]] == pytest.approx(table.values[m].tolist())
        else:
            raw = viewer.source.get([arg])[0]
            assert np.allclose(answer["probabilities"], expected_probabilities(viewer, raw).numpy(), atol=1e-5)


def test_topk_is_computed_once_and_cached_on_disk(server, tiny_checkpoint):
    viewer = server["viewer"]
    assert wait_for_topk(server) == {"state": "done", "done": LIMIT, "total": LIMIT, "error": None}
    direct = topk_pass(viewer.model, viewer.source, viewer.preprocess, viewer.layers, k=K, indices=range(LIMIT))
    for layer, table in direct.items():
        served = viewer.topk.tables[layer]
        assert torch.equal(served.images, table.images) and torch.allclose(served.values, table.values)
        assert torch.equal(served.boxes, table.boxes)
    files = list((server["cache"] / "topk").glob("*.pt"))
    assert len(files) == 1 and not list((server["cache"] / "topk").glob(".*.tmp"))  # written atomically

    again = Viewer(from_checkpoint(tiny_checkpoint), DATA, LIMIT)  # same checkpoint, data and limit
    again.topk.thread.join(30)
    assert again.topk.source.read == 0  # read from the cache, no image went through the model
    assert torch.equal(again.topk.tables["conv5"].images, viewer.topk.tables["conv5"].images)
    other = Viewer(from_checkpoint(tiny_checkpoint), DATA, LIMIT - 100)  # another limit: another key
    other.topk.thread.join(30)
    assert other.topk.source.read == LIMIT - 100 and len(list((server["cache"] / "topk").glob("*.pt"))) == 2


def test_serve_reads_the_tables_deconvnet_topk_wrote(server, tiny_checkpoint, tmp_path):
    """one cache. `deconvnet topk` over the whole data set (its default) leaves its tables where
    the viewer finds them: the viewer then passes no image through the model, and shows the same tables."""
    data = "fashion-mnist:test"
    assert main(["topk", "--checkpoint", str(tiny_checkpoint), "--data", data, "--maps", "1",
                 "--out", str(tmp_path / "fig2")]) == 0
    viewer = Viewer(from_checkpoint(tiny_checkpoint), data, LIMIT)
    viewer.topk.thread.join(60)
    assert viewer.topk.source.read == 0 and viewer.topk.state["total"] == 10000
    written = json.loads((tmp_path / "fig2" / "topk.json").read_text())["layers"]
    for layer, table in viewer.topk.tables.items():
        assert table.images.tolist() == [[e["image"] for e in m["top"]] for m in written[layer]["maps"]]


def test_cli_serves_on_localhost(tiny_checkpoint, tmp_path):
    with socket.socket() as sock:  # a port free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "deconvnet.cli", "serve", "--checkpoint", str(tiny_checkpoint),
               "--data", DATA, "--limit", "50", "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "DECONVNET_CACHE": str(tmp_path)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in process.stdout.readline()
        deadline = time.time() + 30
        while True:
            try:
                state = call({"url": f"http://127.0.0.1:{port}"}, "/api/topk")[1]
                if state["state"] == "done":
                    break
            except urllib.error.URLError:
                pass
            assert time.time() < deadline, "the server did not answer in 30 s"
            time.sleep(0.2)
        assert len(list((tmp_path / "topk").glob("*.pt"))) == 1
    finally:
        process.terminate()
        process.wait(10)


# ----------------------------------------------------------------------------- the page in Chromium

@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """A page of Debian's Chromium (headless, fresh profile) driven by Playwright, at the viewer."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it when run as root with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.set_default_timeout(60_000)
        page.goto(server["url"] + "/")
        yield page
        context.close()


def loaded_images(page, selector: str) -> int:
    """How many images under ``selector`` have decoded."""
    return page.eval_on_selector_all(selector, "nodes => nodes.filter(n => n.complete && n.naturalWidth > 0).length")


def test_browser_pick_a_unit_and_see_its_top_9(page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_selector("#topk-text:has-text('ready')")
    page.select_option("#layer", "conv2")
    page.click("#feature-next")
    page.click("#feature-next")
    page.wait_for_selector("#feature-status:has-text('conv2 map 2: top 9')")
    assert loaded_images(page, "#gallery-projections img") == 9
    assert loaded_images(page, "#gallery-patches img") == 9
    assert page.get_attribute("#atlas-link", "href") == "/atlas/conv2.html#2"  # the atlas's address of this map
    page.screenshot(path=str(ARTIFACTS / "serve-topk.png"))
    assert page.errors == []


def test_browser_pick_and_upload_images_and_see_the_maps(page, server):
    ARTIFACTS.mkdir(exist_ok=True)
    page.click("#thumbs img[data-index='3']")
    page.wait_for_selector("#picture-caption:has-text('data set image 3')")
    page.wait_for_function("document.querySelectorAll('#layers .feature').length === 20")
    assert loaded_images(page, "#layers img") == 20 * 5
    page.screenshot(path=str(ARTIFACTS / "serve-image.png"), full_page=True)

    page.set_input_files("#upload", files=[{"name": "mine.png", "mimeType": "image/png",
                                            "buffer": dataset_png(server, 7)}])
    page.wait_for_selector("#picture-caption:has-text('upload mine.png')")
    page.wait_for_function("document.querySelector('#analysis-status').textContent === ''")
    assert page.locator("#prediction tr").count() == 5
    assert loaded_images(page, "#occlusion img") == 5
    assert page.locator("#occlusion figcaption:has-text('(e) most probable label')").count() == 1
    page.screenshot(path=str(ARTIFACTS / "serve-upload.png"), full_page=True)

    page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just text\n"}])
    page.wait_for_selector("#analysis-status.error:has-text('not a PNG or JPEG')")
    page.screenshot(path=str(ARTIFACTS / "serve-bad-upload.png"))

    page.click("#layers .layer:nth-child(5) .feature:nth-child(1)")  # conv5's strongest map
    feature = page.eval_on_selector("#layers .layer:nth-child(5) .feature:nth-child(1) .title", "n => n.textContent")
    page.wait_for_selector(f"#feature-status:has-text('conv5 map {feature.split(':')[0].split()[1]}: top')")
    assert loaded_images(page, "#gallery-projections img") == 9
    assert page.errors == []


def test_maps_link_to_the_atlas(server):
    status, info = call(server, "/api/info")
    assert status == 200 and info["atlas"] == "/atlas/"
    with urllib.request.urlopen(server["url"] + "/atlas/conv1.html", timeout=30) as response:
        assert 'id="3"' in response.read().decode()
    with pytest.raises(Exception, match="no atlas there"):
        Viewer(server["viewer"].subject, DATA, LIMIT, atlas=server["cache"])
