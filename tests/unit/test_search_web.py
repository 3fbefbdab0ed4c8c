"""The search page: its JSON API and clip route (FastAPI test client), and the page in a real headless Chromium."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from neighborretr.search import Searcher, TextEncoder, build_index, load_index
from tests.search_helpers import SAMPLING, copy_test_videos, eval_features, tiny_model

pytest.importorskip("fastapi", reason="the search page needs the search extra: pip install -e '.[search]'")
from fastapi.testclient import TestClient  # noqa: E402

from neighborretr_train.search_web import create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_synthetic, tmp_path_factory) -> dict:
    """An index of the 8 test clips, its searcher, and the evaluation's best clip for each test caption."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("web") / "videos"
    ids = copy_test_videos(tiny_synthetic, folder)
    out = folder.parent / "index"
    build_index(out, model, folder, SAMPLING, "m", CPU, num_workers=0, progress=False)
    searcher = Searcher(load_index(out, "m"), TextEncoder(model, 16, CPU))
    ref = eval_features(model, tiny_synthetic, "test", ids)
    sim = model.chunked_similarity(ref["text"], ref["text_mask"], ref["video"], ref["video_mask"])
    best = [f"{ref['video_ids'][i]}.mp4" for i in sim.argmax(dim=1).tolist()]
    return {"searcher": searcher, "captions": ref["captions"], "best": best, "folder": folder, "index": out}


def test_api_returns_the_evaluation_best_clip_first_with_clip_urls(setup):
    client = TestClient(create_app(setup["searcher"]))
    for caption, best in list(zip(setup["captions"], setup["best"]))[:4]:
        body = client.get("/api/search", params={"q": caption, "top_k": 3}).json()
        assert body["hits"][0]["path"] == best
        assert [h["rank"] for h in body["hits"]] == [1, 2, 3]
        assert body["hits"][0]["url"] == f"/clip/{body['hits'][0]['item']}"
        assert set(body["timings_ms"]) >= {"encode_text", "first_stage", "rerank", "total"}
    page = client.get("/").text
    assert '<select id="normalization"' in page and '<option value="none">' in page


def test_clips_are_served_by_index_row_only_and_never_outside_the_folder(setup, tmp_path):
    searcher = setup["searcher"]
    client = TestClient(create_app(searcher))
    first = searcher.index.manifest.items[0]["path"]
    response = client.get("/clip/0")
    assert response.status_code == 200 and response.content == (setup["folder"] / first).read_bytes()
    assert client.get("/clip/8").status_code == 404  # no such row
    assert client.get("/clip/-1").status_code == 404
    assert client.get("/clip/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)  # not a row number
    assert client.get("/clip/../manifest.json").status_code == 404
    # a manifest entry that escapes the folder (edited, or a symlink to elsewhere) is refused
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"not yours")
    escaped = Searcher(load_index(setup["index"], "m"), searcher.encoder)
    escaped.index.manifest.items[1] = {"path": f"../../../../../../..{outside}", "duration": 1.0}
    link = setup["folder"] / "link.mp4"
    link.symlink_to(outside)
    escaped.index.manifest.items[2] = {"path": "link.mp4", "duration": 1.0}
    client = TestClient(create_app(escaped))
    assert client.get("/clip/1").status_code == 404
    assert client.get("/clip/2").status_code == 404
    link.unlink()


def test_bad_requests_answer_400_with_the_reason(setup):
    client = TestClient(create_app(setup["searcher"]))
    response = client.get("/api/search", params={"q": "a dog", "normalization": "dis"})
    assert response.status_code == 400 and "no bank statistics" in response.json()["detail"]
    assert client.get("/api/search", params={"q": "   "}).status_code == 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(setup):
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(create_app(setup["searcher"]), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the search server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="the browser test needs Chromium from the system packages: apt-get install chromium chromium-driver",
)
def test_page_in_headless_chromium_shows_the_expected_clip_first(setup, server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the dev extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1100,700", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server)
        caption, best = setup["captions"][2], setup["best"][2]
        box = driver.find_element(By.ID, "q")
        box.send_keys(caption)
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".hit")))
        cards = driver.find_elements(By.CSS_SELECTOR, ".hit")
        assert len(cards) == 8
        assert cards[0].get_attribute("data-path") == best and cards[0].get_attribute("data-rank") == "1"
        assert cards[0].find_element(By.TAG_NAME, "video").get_attribute("src").endswith("/clip/" + str(
            [i["path"] for i in setup["searcher"].index.manifest.items].index(best)
        ))  # fmt: skip
        assert best in cards[0].text and "#1" in cards[0].text
        shot = tmp_path / "search_page.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:4] == b"\x89PNG"
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
