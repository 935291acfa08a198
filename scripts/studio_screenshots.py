"""The README's Studio screenshots (docs/img/studio-*.png) from a real workspace, in headless Chromium.

    python scripts/studio_screenshots.py /tmp/shots-ws --copy-from /work/results-ws --out docs/img

``--copy-from`` first copies a workspace that is still being written to (its MLflow store through SQLite's backup, so a
write in progress is never caught half-way) and moves the copy's recorded paths onto the copy: the registry's tags and
sources and the artifacts' manifests name absolute folders, and the Studio only reads folders inside its own workspace.
The source is never written. Then the Studio runs on 127.0.0.1 without a key and Chromium (Debian's ``chromium`` and
``chromium-driver``) opens the scoreboard, the champion's run page (its top, and scrolled to the embedded eval report),
the data page and the playground (one question to the champion and the prompted base model) at 1280×900. Each PNG is
optimised, cut below a short page, and reduced to 256 colours when still over ``--max-kb``. Prints each file with its size.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

TEXT_FILES = ("*.json", "*.jsonl", "*.yaml", "*.txt", "MLmodel")
QUESTION = "the chip on my card is cracked and the machine keeps rejecting it, can I get a new one"


def copy_workspace(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` (which must not exist), every recorded ``source`` path rewritten to ``target``."""
    if target.exists():
        sys.exit(f"{target} exists: pass a new folder (nothing is overwritten)")
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db*", ".tmp-*"))
    with sqlite3.connect(f"file:{source / 'mlflow.db'}?mode=ro", uri=True) as src, sqlite3.connect(target / "mlflow.db") as dst:
        src.backup(dst)
    old, new = str(source.resolve()), str(target.resolve())
    with sqlite3.connect(target / "mlflow.db") as db:
        for (table,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
            for column in [c[1] for c in db.execute(f"pragma table_info('{table}')") if c[2].upper() in ("TEXT", "VARCHAR") or
                           c[2].upper().startswith("VARCHAR")]:
                db.execute(f'update "{table}" set "{column}" = replace("{column}", ?, ?) where "{column}" like ?', (old, new, f"%{old}%"))
    for pattern in TEXT_FILES:
        for path in target.rglob(pattern):
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8", errors="surrogateescape")


def start_studio(workspace: Path) -> tuple[str, Any]:
    import uvicorn

    from microtune.studio import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(workspace, []), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        sys.exit("the Studio did not start")
    return f"http://127.0.0.1:{port}", server


def browser(width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}", "--disable-gpu",
                "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    # the window size includes the browser's frame: the viewport itself is set to exactly width × height
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def save(driver: Any, path: Path, max_kb: int) -> None:
    """The viewport as PNG: optimised, and palette-reduced (256 colours; flat UI colours survive it) when still too big."""
    from PIL import Image

    driver.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    bottom = driver.execute_script("return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom) + 24")
    if bottom < image.height:  # a short page: no empty band below it
        image = image.crop((0, 0, image.width, bottom))
    image.save(path, optimize=True)
    if path.stat().st_size > max_kb * 1024:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}  {path.stat().st_size // 1024} KB")


def take(url: str, out: Path, width: int, height: int, max_kb: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(width, height)
    wait = WebDriverWait(driver, 600, poll_frequency=0.2)
    drawn = "return [...document.querySelectorAll('canvas[data-chart]')].every(c => c.dataset.drawn)"
    try:
        driver.get(url + "/")
        save(driver, out / "studio-scoreboard.png", max_kb)
        driver.find_element(By.CSS_SELECTOR, "#scoreboard tbody tr a").click()  # the first model's page
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "section.version")))
        driver.find_element(By.PARTIAL_LINK_TEXT, "training run and evaluation").click()
        wait.until(lambda d: d.execute_script(drawn))
        save(driver, out / "studio-run.png", max_kb)
        driver.execute_script("document.querySelector('.eval-report').scrollIntoView()")  # the embedded eval report
        save(driver, out / "studio-eval.png", max_kb)
        recipe = driver.current_url.split("/runs/")[1].split("/")[0]
        driver.get(f"{url}/data/{recipe}")
        wait.until(lambda d: d.execute_script(drawn))
        save(driver, out / "studio-data.png", max_kb)
        driver.get(url + "/playground")
        driver.find_element(By.ID, "text").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) >= 2)
        save(driver, out / "studio-playground.png", max_kb)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path, help="the workspace to show (the copy, with --copy-from)")
    parser.add_argument("--copy-from", type=Path, help="copy this workspace into WORKSPACE first (never written)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--size", default="1280x900", help="window WIDTHxHEIGHT")
    parser.add_argument("--max-kb", type=int, default=200)
    args = parser.parse_args()
    if args.copy_from:
        copy_workspace(args.copy_from, args.workspace)
    width, height = (int(x) for x in args.size.lower().split("x"))
    url, server = start_studio(args.workspace)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        take(url, args.out, width, height, args.max_kb)
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
