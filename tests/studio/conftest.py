"""The Studio's fixtures: one real workspace (session), a running Studio guarded by a key, a headless Chromium."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from studio_workspace import build_workspace

KEY = "studio-test-key"
DRIVERS: list[Any] = []  # the session's browser, once started: a failing test's screenshot is taken with it


@pytest.fixture(scope="session")
def studio_ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Built once per session. While working on the Studio, $MICROTUNE_STUDIO_TEST_ROOT keeps one across sessions (built
    there the first time, reused after; the tests leave the champion as they found it)."""
    kept = os.environ.get("MICROTUNE_STUDIO_TEST_ROOT")
    if kept and (Path(kept) / "ws" / "mlflow.db").is_file():
        return {"root": Path(kept), "ws": Path(kept) / "ws", "recipe": Path(kept) / "recipe.yaml"}
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        model = Path(kept) / "tiny-model"
        shutil.copytree(tiny_model_dir, model, dirs_exist_ok=True)
        return build_workspace(Path(kept), model)
    return build_workspace(tmp_path_factory.mktemp("studio"), tiny_model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studio_url(studio_ws: dict[str, Path]) -> Any:
    import uvicorn

    from microtune.studio import create_app

    port = _free_port()
    app = create_app(studio_ws["ws"], [KEY], max_jobs=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # a loaded machine: wait for the condition, not a fixed time
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the Studio's uvicorn server did not start (its error is above)"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A browser test that fails (or whose fixture does) leaves a screenshot of where the browser was, named after it."""
    outcome = yield
    report = outcome.get_result()
    driver = DRIVERS[-1] if DRIVERS and item.get_closest_marker("browser") else None
    if report.failed and report.when in ("setup", "call") and driver is not None:
        path = driver.shots / f"FAILED-{item.name}.png"
        try:
            driver.save_screenshot(str(path))
            report.sections.append(("screenshot", f"{path} (at {driver.current_url})"))
        except Exception as exc:  # a browser that died cannot take one: say so, keep the test's own error
            report.sections.append(("screenshot", f"none: {exc}"))


def chromium_paths() -> tuple[str, str]:
    """Chromium and its driver, or a failure that says which is missing and how to install it: never a skip, so a machine
    without a browser cannot pass `make test` without these tests."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None)
    missing = [name for name, found in (("chromium", browser), ("chromedriver", driver)) if not found]
    if missing:
        pytest.fail(f"the Studio's browser tests need Debian's chromium and chromium-driver; not found: {', '.join(missing)}. Run "
                    "`make browser` (apt-get install -y chromium chromium-driver, as root or through sudo; `make test` runs it), or "
                    "without apt-get install Chromium and its matching chromedriver with this system's package manager", pytrace=False)
    return browser, driver


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Headless Chromium, started before the workspace is built: a machine without one fails at once, with the fix."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = binary
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.shots = tmp_path_factory.mktemp("screenshots")  # every page's screenshot lands here
    DRIVERS.append(driver)
    yield driver
    DRIVERS.remove(driver)
    driver.quit()
