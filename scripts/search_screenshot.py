"""Screenshot of the search page for the docs: serves an index, types a query in headless Chromium, saves a PNG.

    python scripts/search_screenshot.py --index outputs/search/synthetic_test \
        "a yellow circle drifts upward over a brown backdrop" --normalization dualis --out docs/results/search_page.png

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver) and selenium.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--window-size=1100,760", "--autoplay-policy=no-user-gesture-required",
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True)
    p.add_argument("query")
    p.add_argument("--normalization", default="none")
    p.add_argument("--out", default="docs/results/search_page.png")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from neighborretr_train.search import open_searcher, parser
    from neighborretr_train.search_web import create_app

    searcher = open_searcher(parser().parse_args(["serve", "--index", args.index, "--device", args.device]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
        try:
            driver.get(f"http://127.0.0.1:{port}")
            driver.find_element(By.ID, "q").send_keys(args.query)
            Select(driver.find_element(By.ID, "normalization")).select_by_value(args.normalization)
            driver.find_element(By.ID, "go").click()
            WebDriverWait(driver, 60).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".hit")))
            time.sleep(2)  # let the clips start playing
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            server.should_exit = True
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
