"""lverse serve's HTTP API (lverse.serve) with FastAPI's test client, on the shipped Shapes bundle:
each direction and round trip gives what the inference API gives for the same settings and seed,
bad input gets the messages the CLI prints, and the queue orders, shows and cancels requests."""
from __future__ import annotations

import dataclasses
import io
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="lverse serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lverse.cli import sample as sample_cli  # noqa: E402
from lverse.cli import serve as serve_cli  # noqa: E402
from lverse.data.images import read_image  # noqa: E402
from lverse.inference import LVersePipeline, image_to_text, load_reranker, text_to_image  # noqa: E402
from lverse.inference.sampling import generate_images  # noqa: E402
from lverse.serve.app import create_app  # noqa: E402
from lverse.serve.jobs import Job, JobQueue  # noqa: E402
from lverse.serve.work import PREVIEW_STEPS, PREVIEWS, ImageWatch, Limits, Model  # noqa: E402
from lverse.shapes.scenes import render, sample_scene  # noqa: E402

PROMPT = "a small red circle above a large blue square"


@pytest.fixture(scope="module")
def model() -> Model:
    # The shipped bundle without its CLIP (loading it takes seconds; the browser test uses it):
    # the defaults' reranker is then BiART's own reverse direction.
    shipped = LVersePipeline.load(device="cpu")
    return Model(LVersePipeline(shipped.augvae, shipped.biart, shipped.tokenizer, sampling=shipped.sampling))


@pytest.fixture(scope="module")
def client(model: Model):
    with TestClient(create_app(model)) as c:
        yield c


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    render(sample_scene(random.Random(3)), 64).save(path)
    return path


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as an 8-bit PNG holds it."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_text_to_image_gives_the_inference_api_result(client: TestClient, model: Model) -> None:
    body = {"prompt": PROMPT, "candidates": 4, "keep": 2, "rerank": "cycle", "seed": 3, "temperature": 0.9}
    r = client.post("/api/text-to-image?wait=1", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "done" and job["tokens"] == job["total"] == 2 * 4 * model.pipe.image_len
    res = job["result"]
    s = model.pipe.defaults("text_to_image", candidates=4, rerank="cycle", temperature=0.9)
    assert res["settings"] == {**dataclasses.asdict(s), "seed": 3, "keep": 2}
    ref = text_to_image(model.pipe, [PROMPT], s, keep=2, seed=3)[0]
    for got, want in zip(res["images"], ref["images"]):
        assert (got["seed"], got["candidate"]) == (want["seed"], want["candidate"])
        assert got["score"] == pytest.approx(want["score"])
        assert np.array_equal(pixels(client.get(got["url"]).content), as_uint8(want["image"]))
    # every candidate on request, best first, each the draw generate_images makes with that seed
    text_ids, _ = model.pipe.encode_prompts([PROMPT])
    codes = generate_images(model.pipe.biart, text_ids, 4, params=s.params(), seed=4)[0]
    second = res["candidates"][1]
    assert [c["score"] for c in second] == sorted((c["score"] for c in second), reverse=True)
    assert second[0]["candidate"] == res["images"][1]["candidate"]
    for c in second:
        want = model.pipe.decode_images(codes[c["candidate"]][None])[0]
        assert np.array_equal(pixels(client.get(c["url"]).content), as_uint8(want))
    # the previews: the first candidates every token row (8 per round here); the last is the finished grid
    assert job["preview"].endswith(f"v={2 * PREVIEW_STEPS}")
    preview = pixels(client.get(job["preview"]).content)
    h = w = model.pipe.resolution
    first = model.pipe.decode_images(codes[:PREVIEWS])  # decoded together, as the preview is
    for i in range(PREVIEWS):
        assert np.array_equal(preview[2 : 2 + h, 2 + i * (w + 2) : 2 + i * (w + 2) + w], as_uint8(first[i]))


def test_previews_show_the_rows_drawn_so_far(model: Model) -> None:
    pipe = model.pipe
    (h, w), r = model.grid, pipe.resolution
    codes = generate_images(pipe.biart, pipe.encode_prompts([PROMPT])[0], 2, seed=0)[0]
    job = Job("text-to-image", run=lambda j: {})
    watch = ImageWatch(model, job, n_draw=2, stage="drawing images")
    for t in range(1, pipe.image_len + 1):  # what the sampler hands over after each step
        watch.partial(codes[:, :t] + pipe.vocab.image_start)
        if t % w == 0:
            shown = pixels(job.preview)
            filled = torch.cat([codes[:, :t], model.filler[t:].expand(2, -1)], 1)
            want = pipe.decode_images(filled)
            want[:, :, (t // w) * r // h :] = 0.0  # undrawn rows grey (128 in the PNG)
            for i in range(2):
                assert np.array_equal(shown[2 : 2 + r, 2 + i * (r + 2) : 2 + i * (r + 2) + r], as_uint8(want[i]))
    assert job.preview_version == h and len(watch.codes) == 1 and torch.equal(watch.codes[0], codes)
    assert job.stage == "reranking"  # all candidates drawn: the reranker's turn


def test_image_to_text_gives_the_inference_api_result(client: TestClient, model: Model, scene_png: Path) -> None:
    r = client.post("/api/image-to-text?wait=1", files={"image": ("scene.png", scene_png.read_bytes(), "image/png")},
                    data={"candidates": "6", "rerank": "cycle", "seed": "2"})
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    s = model.pipe.defaults("image_to_text", candidates=6, rerank="cycle")
    ref = image_to_text(model.pipe, read_image(scene_png, 64)[None], s, seed=2)[0]
    assert res["caption"] == ref["caption"] and res["caption"]
    assert [c["caption"] for c in res["candidates"]] == [c["caption"] for c in ref["candidates"]]
    assert [c["score"] for c in res["candidates"]] == pytest.approx([c["score"] for c in ref["candidates"]])
    assert np.array_equal(pixels(client.get(res["input"]).content), as_uint8(read_image(scene_png, 64)))


def test_round_trips_chain_the_two_directions(client: TestClient, model: Model, scene_png: Path) -> None:
    pipe = model.pipe
    t2i = pipe.defaults("text_to_image", candidates=3, rerank="cycle")
    i2t = pipe.defaults("image_to_text", candidates=3, rerank="cycle")
    r = client.post("/api/round-trip/text?wait=1", json={"prompt": PROMPT, "candidates": 3, "rerank": "cycle"})
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    image = text_to_image(pipe, [PROMPT], t2i)[0]["images"][0]["image"]
    assert np.array_equal(pixels(client.get(res["image"]["url"]).content), as_uint8(image))
    assert res["caption"] == image_to_text(pipe, image[None], i2t)[0]["caption"]

    upload = {"image": ("scene.png", scene_png.read_bytes(), "image/png")}
    r = client.post("/api/round-trip/image?wait=1", files=upload, data={"candidates": "3", "rerank": "cycle"})
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    caption = image_to_text(pipe, read_image(scene_png, 64)[None], i2t)[0]["caption"]
    assert res["caption"] == caption
    back = text_to_image(pipe, [caption], t2i)[0]["images"][0]["image"]
    assert np.array_equal(pixels(client.get(res["image"]["url"]).content), as_uint8(back))


def test_bad_input_gets_the_cli_messages(client: TestClient, model: Model, tmp_path: Path, monkeypatch,
                                         capsys) -> None:
    # a file that is no image: the message `lverse sample --image bad.png` prints
    monkeypatch.chdir(tmp_path)
    Path("bad.png").write_bytes(b"this is not a PNG")
    assert sample_cli.main(["--image", "bad.png", "--candidates", "1", "--no-progress", "--out", "o"]) == 1
    cli = capsys.readouterr().err.strip()
    r = client.post("/api/image-to-text", files={"image": ("bad.png", b"this is not a PNG", "image/png")})
    assert r.status_code == 400 and cli == f"error: {r.json()['error']}"
    assert r.json()["error"].startswith("cannot read image bad.png: ")
    # settings: the library's messages (what the CLI prints for what argparse lets through)
    with pytest.raises(ValueError) as e:
        model.pipe.defaults("text_to_image", top_p=1.5)
    cases = [
        ({"prompt": PROMPT, "top_p": 1.5}, str(e.value)),
        ({"prompt": "   "}, "empty prompt"),
        ({"prompt": PROMPT, "candidates": "many"}, "candidates must be an integer, got 'many'"),
        ({"prompt": PROMPT, "candidates": 0}, "candidates must be an integer >= 1, got 0"),
        ({"prompt": PROMPT, "candidates": 129}, "candidates must be at most 128 on this server, got 129"),
        ({"prompt": PROMPT, "keep": 9}, "keep must be at most 8 on this server, got 9"),
        ({"prompt": PROMPT, "tmperature": 1}, "unknown field(s) ['tmperature']; known: ['candidates', 'guidance', "
                                              "'keep', 'prompt', 'rerank', 'seed', 'temperature', 'top_k', 'top_p']"),
    ]
    for body, message in cases:
        r = client.post("/api/text-to-image", json=body)
        assert (r.status_code, r.json()) == (400, {"error": message}), body
    r = client.post("/api/image-to-text", files={"image": ("x.png", b"", "image/png")}, data={"guidance": "2"})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown field(s) ['guidance']")
    assert client.post("/api/image-to-text", data={"candidates": "2"}).json()["error"].startswith("no image")
    assert client.post("/api/text-to-image", content=b"{not json").status_code == 400
    assert client.get("/api/jobs/nope").status_code == 404


def test_limits_on_uploads_and_a_reranker_without_clip(client: TestClient, model: Model, scene_png: Path) -> None:
    small = Model.__new__(Model)
    small.__dict__.update(model.__dict__, limits=Limits(max_upload_mb=0.0001))  # 104 bytes
    client = TestClient(create_app(small))  # not started: nothing runs
    data = scene_png.read_bytes()
    assert len(data) > 104
    r = client.post("/api/image-to-text", files={"image": ("scene.png", data, "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "scene.png is over 0.0001 MB, this server's limit"
    # a body far over the limit is refused on its Content-Length, before it is read
    r = client.post("/api/image-to-text", files={"image": ("big.png", bytes(200_000), "image/png")})
    assert r.status_code == 413 and r.json()["error"].startswith("the upload is 0.2 MB; this server takes images")
    # a bundle without a CLIP: asking for the CLIP reranker gets load_reranker's message, as in the CLI
    suggested = model.info()["rerankers"]
    assert not model.pipe.has_clip and {"cycle", "none"} <= set(suggested)
    assert not any("clip" in r for r in suggested)
    for r in suggested:  # every suggestion is a reranker the settings accept
        model.pipe.defaults("text_to_image", rerank=r)
    with pytest.raises(ValueError) as e:
        load_reranker(model.pipe, "clip")
    r = client.post("/api/text-to-image", json={"prompt": PROMPT, "rerank": "clip"})
    assert r.json() == {"error": " ".join(str(e.value).split())}


def test_the_queue_shows_places_and_cancels_waiting_requests(model: Model) -> None:
    queue = JobQueue(max_waiting=3)
    client = TestClient(create_app(model, queue))  # without `with`: the worker has not started
    body = {"prompt": PROMPT, "candidates": 2, "rerank": "cycle"}
    ids = [client.post("/api/text-to-image", json=body).json()["id"] for _ in range(3)]
    assert [client.get(f"/api/jobs/{i}").json()["position"] for i in ids] == [0, 1, 2]
    r = client.post("/api/text-to-image", json=body)
    assert r.status_code == 503 and "queue is full" in r.json()["error"]
    cancelled = client.delete(f"/api/jobs/{ids[1]}").json()
    assert (cancelled["state"], cancelled["position"]) == ("cancelled", None)
    assert client.get(f"/api/jobs/{ids[2]}").json()["position"] == 1
    queue.start()
    try:
        for i in (ids[0], ids[2]):
            queue.get(i).finished.wait(30)
        first, last = (client.get(f"/api/jobs/{i}").json() for i in (ids[0], ids[2]))
        assert first["state"] == last["state"] == "done"
        assert queue.get(ids[0]).ended <= queue.get(ids[2]).started  # one at a time, in order
        assert queue.get(ids[1]).started is None
    finally:
        queue.stop()


def test_a_running_request_stops_at_its_next_token(client: TestClient) -> None:
    big = {"prompt": PROMPT, "candidates": 128, "keep": 8, "rerank": "cycle"}
    job = client.post("/api/text-to-image", json=big).json()
    small = client.post("/api/text-to-image", json={"prompt": PROMPT, "candidates": 1, "rerank": "none"}).json()
    deadline = time.time() + 20
    while (s := client.get(f"/api/jobs/{job['id']}").json())["tokens"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert s["state"] == "running" and client.get(f"/api/jobs/{small['id']}").json()["position"] == 1
    client.delete(f"/api/jobs/{job['id']}")
    while (s := client.get(f"/api/jobs/{job['id']}").json())["state"] == "running" and time.time() < deadline:
        time.sleep(0.02)
    assert s["state"] == "cancelled" and 0 < s["tokens"] < s["total"]
    while (t := client.get(f"/api/jobs/{small['id']}").json())["state"] != "done" and time.time() < deadline:
        time.sleep(0.02)
    assert t["state"] == "done"  # the worker goes on with the next request


def test_the_page_and_info_ship_offline(client: TestClient, model: Model) -> None:
    info = client.get("/api/info").json()
    for d in ("text_to_image", "image_to_text"):
        assert info["defaults"][d] == dataclasses.asdict(model.pipe.defaults(d))
    page = client.get("/")
    assert page.status_code == 200 and 'id="t2i-prompt"' in page.text
    static = Path(serve_cli.__file__).parents[1] / "serve" / "static"
    for f in ("app.js", "style.css"):
        assert client.get(f"/static/{f}").status_code == 200
    for f in static.iterdir():  # nothing fetched from elsewhere: every URL is the server's own
        text = f.read_text(encoding="utf-8")
        assert "//cdn" not in text and 'src="http' not in text and "@import" not in text, f


def test_cli_help_and_one_line_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--help"])
    assert e.value.code == 0 and "--max-candidates" in capsys.readouterr().out
    assert serve_cli.main(["--checkpoint", str(tmp_path / "none"), "--port", "0"]) == 1
    assert capsys.readouterr().err.strip() == f"error: checkpoint directory not found: {tmp_path / 'none'}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_cli.main(["--port", str(port)]) == 1
    assert capsys.readouterr().err.startswith(f"error: port {port} on 127.0.0.1 is already in use")
