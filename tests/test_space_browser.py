"""The Space in a real headless browser: Debian's chromium driven by Python Playwright.

Generates with live previews, moves the forward-process slider, saves screenshots under test-artifacts/ (git-ignored)
and checks that the page asks nothing of any host but 127.0.0.1.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from helpers import REPO_ROOT, running_space

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # .ci/run installs it with apt-get when missing
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"
TIMEOUT_MS = 90_000

# Records every x_t preview and status text the page shows, however briefly: a sample of the DOM could miss them.
RECORD_UPDATES = """() => {
  window.previews = []; window.statuses = [];
  const record = () => {
    const img = document.querySelector('#preview-xt img');
    if (img && img.src && window.previews.at(-1) !== img.src) window.previews.push(img.src);
    const status = document.querySelector('#status [data-testid=markdown]')?.innerText.trim();
    if (status && window.statuses.at(-1) !== status) window.statuses.push(status);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def test_generate_and_forward_process_in_a_browser(tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: apt-get install chromium (.ci/run does)"
    ARTIFACTS.mkdir(exist_ok=True)
    requests: list[str] = []
    with running_space(tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url)
            expect(page.locator("#generate")).to_be_visible()
            expect(page.locator("#model-info")).to_contain_text("bundled digits DDPM")
            expect(page.locator("#model-notice")).to_be_hidden()  # nothing went wrong: no notice

            page.evaluate(RECORD_UPDATES)
            # A bad seed: the message shows next to the seed box, and nothing runs.
            seed = page.locator("#seed input")
            seed.fill("-5")
            page.locator("#generate").click()
            expect(page.locator("#seed")).to_contain_text("Seed must be a whole number from 0 to 4294967295; got -5")
            expect(page.locator("#status")).to_have_text("Press Generate to sample.")
            seed.fill("0")

            # Generate: 30 DDIM steps, 4 images; watch the previews stream, then the gallery fill.
            steps = page.locator("#steps input[data-testid=range-input]")
            steps.fill("30")
            steps.press("Enter")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("Done:", timeout=TIMEOUT_MS)
            expect(page.locator("#gallery img")).to_have_count(4)
            expect(page.locator("#grid-file")).to_contain_text(".png")
            statuses, previews = page.evaluate("window.statuses"), page.evaluate("window.previews")
            assert any(status.startswith("step 0/30") for status in statuses), statuses
            assert any("/30" in status and not status.startswith(("step 0/", "Done")) for status in statuses), statuses
            assert statuses[-1].startswith("Done: 4 images · DDIM, 30 steps"), statuses
            assert len(set(previews)) >= 3, previews  # x_T, at least one step in between, the result
            page.screenshot(path=str(ARTIFACTS / "space-generate.png"), full_page=True)

            # Forward process: moving t changes x_t and the values shown.
            page.get_by_role("tab", name="Forward process").click()
            x_t = page.locator("#forward-xt img")
            expect(x_t).to_be_visible()
            expect(page.locator("#forward-info")).to_contain_text("250 / 999")
            before = x_t.get_attribute("src")
            page.locator("#t input[type=range]").fill("900")  # the slider itself, as a drag would set it
            expect(page.locator("#forward-info")).to_contain_text("900 / 999")
            expect(x_t).not_to_have_attribute("src", before)
            assert page.locator("#forward-info .katex").count() >= 1  # the formula is typeset, from local assets
            page.screenshot(path=str(ARTIFACTS / "space-forward.png"), full_page=True)

            page.get_by_role("tab", name="Schedules").click()
            expect(page.locator("#schedule-plot img")).to_be_visible()
            expect(page.locator("#schedule-table")).to_contain_text("zero terminal SNR")
            page.screenshot(path=str(ARTIFACTS / "space-schedules.png"), full_page=True)
        finally:
            browser.close()
    outside = [u for u in requests if not u.startswith(("data:", "blob:")) and urlparse(u).hostname != "127.0.0.1"]
    assert requests and outside == [], outside
