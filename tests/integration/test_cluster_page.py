"""The live cluster page (GET /ui on the tracker's admin listener) in Debian's headless Chromium, against a real
tracker and three real daemons moving an artifact: the token form, node rows by zone with NAT type, the
artifact's holders with progress, the throughput chart with points, and a live update when the fetches finish.
A PNG screenshot is saved to $P2PD_TEST_ARTIFACTS (CI: test-artifacts/ in the checkout), else the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.cluster import HOST, LocalCluster

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "cluster-page-test-token"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


def cluster_json(port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{HOST}:{port}/v1/cluster", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def wait_for(what: str, pred: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the pip package selenium (test extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("P2PD_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_cluster_page_renders_live_data_in_headless_chromium(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def texts(css: str) -> list[str]:
        # one script reads every match at once: the page re-renders live, so elements found in one call
        # and read in later ones can be gone by then (StaleElementReferenceException)
        got: list[str] = browser.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " e => (e.innerText ?? e.textContent).replace(/\\s+/g, ' ').trim())",
            css,
        )
        return got

    def attr(css: str, name: str) -> str | None:
        got: str | None = browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])", css, name
        )
        return got

    with LocalCluster(tmp_path / "c") as c:
        t = c.start_tracker("--admin-listen", f"{HOST}:0", "--admin-token", TOKEN, interval=0.5)
        assert t.admin_port
        port = t.admin_port
        # a slow seed, so the transfer spans several heartbeats and the chart sees it
        seed = c.start_node("seed", "--label", "zone=eu", "--egress-limit", "6MB/s")
        a = c.start_node("a", "--label", "zone=eu")
        b = c.start_node("b", "--label", "zone=us")
        src = tmp_path / "model.bin"
        src.write_bytes(os.urandom(24 * MiB))
        aid = c.publish(seed, src, "model:v1")
        fetches = [subprocess.Popen(c.cli_argv(n, "fetch", "model:v1"), stdout=subprocess.DEVNULL) for n in (a, b)]
        try:
            # the page's HTML is public and carries no data; the data needs the token
            with urllib.request.urlopen(f"http://{HOST}:{port}/ui", timeout=10) as r:
                html = r.read().decode()
                assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
            assert aid not in html and "model:v1" not in html and "http://" not in html and "https://" not in html
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://{HOST}:{port}/v1/cluster", timeout=10)
            assert e.value.code == 401

            browser.get(f"http://{HOST}:{port}/ui")
            assert browser.find_element(By.ID, "login").is_displayed()
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.ID, "login-button").click()
            assert "token" not in browser.current_url.lower()

            wait_for("three node rows", lambda: len(texts("#nodes tr.node")) == 3)
            rows = texts("#nodes tr.node")
            assert sum(r.startswith("eu ") for r in rows) == 2 and sum(r.startswith("us ") for r in rows) == 1, rows
            assert all(" ok " in r and " s ago" in r for r in rows), rows
            zones = texts("#zones tr.zone")
            assert [z.split()[:2] for z in zones] == [["eu", "2"], ["us", "1"]], zones
            wait_for("the artifact with holders", lambda: len(texts(f'[data-artifact-id="{aid}"] tr.holder')) >= 2)
            assert any("model:v1" in h for h in texts(f'[data-artifact-id="{aid}"] h3'))
            for p in fetches:
                assert p.wait(timeout=120) == 0
        finally:
            for p in fetches:
                if p.poll() is None:
                    p.kill()
                    p.wait()

        # it updates live: the finished fetches show as three complete holders
        holders = f'[data-artifact-id="{aid}"] tr.holder'
        wait_for("three complete holders", lambda: sum(h.endswith("100.0%") for h in texts(holders)) == 3)
        # the chart: a point per heartbeat interval, and the transfer's rate above zero in them
        assert max(s[1] for s in cluster_json(port)["throughput"]) > 0
        wait_for("chart points", lambda: int(attr("#chart", "data-samples") or 0) >= 3)
        points = (attr("#throughput-line", "points") or "").split()
        assert len(points) >= 3 and len({p.split(",")[1] for p in points}) > 1, points  # not a flat line
        assert texts("#chart-max")[0].endswith("B/s")
        use = texts("#budgets tbody tr")
        assert use[0].startswith("total none"), use
        shot = artifacts_dir(tmp_path) / "cluster-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # a wrong token sends the page back to its form
        browser.execute_script("sessionStorage.setItem('p2pd-admin-token', 'wrong')")
        wait_for("the token form again", lambda: browser.find_element(By.ID, "login").is_displayed(), timeout=10)
        assert not browser.execute_script("return sessionStorage.getItem('p2pd-admin-token')")
