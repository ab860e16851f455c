"""lverse serve end to end in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium with the system chromedriver; nothing downloaded): the server runs on a free loopback
port, the test types a prompt and waits for the image, uploads a file and reads the caption, and
takes screenshots into its temporary directory. What the page shows is checked against the
inference API on the same bundle, settings and seed.

Run it alone:  python -m pytest tests/test_serve_browser.py -q
Needs:         apt-get install chromium chromium-driver   (scripts/env.sh installs them when missing)
LVERSE_SCREENSHOT=docs/serve.png also writes the text -> image screenshot there (the README's).
"""
from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="lverse serve needs the serve extra: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lverse.cli.serve import listen  # noqa: E402
from lverse.data.images import read_image  # noqa: E402
from lverse.inference import LVersePipeline, image_to_text, text_to_image  # noqa: E402
from lverse.serve.app import create_app  # noqa: E402
from lverse.serve.work import Model  # noqa: E402
from lverse.shapes.scenes import render, sample_scene  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that would reach the network (this machine's is closed) or need a GPU.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")
PROMPT = "a small red circle above a large blue square"


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"Chromium is not installed ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver (scripts/env.sh does it when apt-get is there)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='lverse-chromium-')}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _pixels(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def _uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def server():
    """The shipped bundle, CLIP included, served on a free loopback port from a thread."""
    model = Model(LVersePipeline.load(device="cpu"))
    sock = listen("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(model), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield model, f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)


def test_the_page_draws_and_captions_in_chromium(server, tmp_path: Path) -> None:
    model, url = server
    scene = tmp_path / "scene.png"
    render(sample_scene(random.Random(3)), 64).save(scene)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image in here")
    browser = _browser()
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        # the settings are the bundle's defaults
        def field(tab: str, name: str):
            return browser.find_element(By.CSS_SELECTOR, f"{tab} .settings input[name={name}]")

        t2i = model.pipe.defaults("text_to_image")
        assert field("#t2i", "rerank").get_attribute("value") == t2i.rerank == "clip+cycle"
        assert int(field("#t2i", "candidates").get_attribute("value")) == t2i.candidates

        # text -> image: type a prompt, wait for the kept image
        browser.find_element(By.ID, "t2i-prompt").send_keys(PROMPT)
        field("#t2i", "candidates").clear()
        field("#t2i", "candidates").send_keys("8")
        browser.find_element(By.ID, "t2i-go").click()
        kept = wait.until(lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#t2i-results img.kept")
                                     if b.execute_script("return arguments[0].naturalWidth", i) > 0])
        assert "/preview.png" in browser.find_element(By.CSS_SELECTOR, "#t2i-job img.preview").get_attribute("src")
        want = text_to_image(model.pipe, [PROMPT], t2i.override(candidates=8))[0]["images"][0]["image"]
        assert np.array_equal(_pixels(kept[0].get_attribute("src")), _uint8(want))
        browser.find_element(By.CSS_SELECTOR, "button.show-candidates").click()
        wait.until(lambda b: len([i for i in b.find_elements(By.CSS_SELECTOR, "#t2i-results .candidates img")
                                  if b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)])
                   == 8)
        browser.save_screenshot(str(tmp_path / "text-to-image.png"))
        if os.environ.get("LVERSE_SCREENSHOT"):
            browser.save_screenshot(os.environ["LVERSE_SCREENSHOT"])

        # a setting out of bounds is refused by the server, whose message the page shows
        field("#t2i", "keep").clear()
        field("#t2i", "keep").send_keys("20")
        browser.find_element(By.ID, "t2i-go").click()
        error = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#t2i-job .error").text)
        assert error == f"keep must be at most {model.limits.max_keep} on this server, got 20"

        # image -> text: a bad file gets the loader's message, a good one its caption
        browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=i2t]").click()
        browser.find_element(By.ID, "i2t-file").send_keys(str(bad))
        browser.find_element(By.ID, "i2t-go").click()
        error = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#i2t-job .error").text)
        assert error.startswith("cannot read image bad.png: ")
        browser.find_element(By.ID, "i2t-file").send_keys(str(scene))
        field("#i2t", "candidates").clear()
        field("#i2t", "candidates").send_keys("8")
        browser.find_element(By.ID, "i2t-go").click()
        caption = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#i2t-results .caption").text)
        i2t = model.pipe.defaults("image_to_text", candidates=8)
        assert caption == image_to_text(model.pipe, read_image(scene, 64)[None], i2t)[0]["caption"]
        browser.save_screenshot(str(tmp_path / "image-to-text.png"))
        assert (tmp_path / "text-to-image.png").stat().st_size > 0
    finally:
        browser.quit()
