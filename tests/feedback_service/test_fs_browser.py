"""The labeler web page end to end in headless Chromium (Debian's package) driven by Playwright:
sign in with a token, read the guidelines, rank by click, keyboard and drag, tie, submit, next,
skip, progress; the stored rankings are checked through the admin API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fs_helpers import item

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing on CI: `make browser` (apt-get install chromium) must run first")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium); CI is not set, so skipping")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_labeler_page_end_to_end(browser, admin, live, tmp_path) -> None:
    from playwright.sync_api import expect

    c = admin.create_campaign("web", guidelines="Prefer the answer that is correct and kind.", overlap=1)
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "tell a joke"}], "answers": item("j", n=2)["answers"]}
    admin.add_items(c["id"], [item("first prompt"), item("second prompt"), chat])
    bob = admin.create_labeler("bob")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)  # generous: CI machines are shared; nothing here waits on a clock
    expect.set_options(timeout=30_000)
    page.goto(live.url + "/")

    # a wrong token is refused with a message
    page.fill("#token", "alf_wrong")
    page.click("#signin")
    expect(page.locator("#error")).to_contain_text("invalid or revoked token")
    page.fill("#token", bob["token"])
    page.click("#signin")
    expect(page.locator("#whoami")).to_have_text("Signed in as bob (labeler)")
    expect(page.locator("#guidelines")).to_have_text("Prefer the answer that is correct and kind.")
    expect(page.locator("#progress")).to_contain_text("You: 0 ranked")
    expect(page.locator("#prompt")).to_have_text("first prompt")

    # answers side by side: three cards on one row
    cards = page.locator(".answer")
    expect(cards).to_have_count(3)
    boxes = [cards.nth(k).bounding_box() for k in range(3)]
    assert len({round(b["y"]) for b in boxes}) == 1 and boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"]
    page.screenshot(path=str(tmp_path / "item.png"))

    # item 1, by click: 3 > 1 > 2; submit is enabled only once every answer is ranked
    first = admin.get_item(1)
    a1, a2, a3 = [x["id"] for x in first["answers"]]
    cards.nth(2).click()
    cards.nth(0).click()
    expect(page.locator("#submit")).to_be_disabled()
    cards.nth(1).click()
    expect(cards.nth(2).locator(".badge")).to_have_text("#1")
    page.fill("#rationale", "3 is correct")
    page.click("#submit")
    expect(page.locator("#status")).to_contain_text("Saved ranking")
    expect(page.locator("#prompt")).to_have_text("second prompt")
    expect(page.locator("#progress")).to_contain_text("You: 1 ranked")

    # item 2, by keyboard and drag: 2, then T+1 (tie with 2), then 3; drag 3 to the top
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("2")
    page.keyboard.press("t")
    page.keyboard.press("1")
    page.keyboard.press("3")
    items = page.locator("#ranking li")
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_contain_text("Answer 2 = Answer 1")
    items.nth(1).drag_to(items.nth(0))
    expect(items.nth(0)).to_contain_text("Answer 3")
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_contain_text("tell a joke")
    expect(page.locator("#prompt .turn")).to_have_count(3)

    # item 3: skip with S; then nothing is left
    page.keyboard.press("s")
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#progress")).to_contain_text("You: 2 ranked, 1 skipped")
    expect(page.locator("#progress")).to_contain_text("2 of 3 items complete")
    page.screenshot(path=str(tmp_path / "done.png"))

    stored = {r["item_id"]: r for r in admin.list_rankings(campaign_id=c["id"])}
    assert stored[1]["ranking"] == [[a3], [a1], [a2]] and stored[1]["rationale"] == "3 is correct"
    b1, b2, b3 = [x["id"] for x in admin.get_item(2)["answers"]]
    assert stored[2]["ranking"] == [[b3], sorted([b1, b2])]

    # a revoked token is refused at once: the page falls back to the sign-in form
    admin.revoke_token(bob["token_id"])
    page.reload()
    expect(page.locator("#signin-panel")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("invalid or revoked token")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_labeler_page_moves_on_when_the_lease_was_lost(browser, admin, live, app) -> None:
    from datetime import datetime, timedelta

    from playwright.sync_api import expect

    from feedback_service.client import FeedbackClient

    now = [datetime(2026, 1, 1, 12, 0, 0)]
    app.state.clock = lambda: now[0]
    c = admin.create_campaign("lease", overlap=1, lease_seconds=60)
    admin.add_items(c["id"], [item("only prompt", n=2)])
    ann, ben = admin.create_labeler("ann"), admin.create_labeler("ben")

    page = browser.new_page()
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)
    page.goto(live.url + "/")
    page.fill("#token", ann["token"])
    page.click("#signin")
    expect(page.locator("#prompt")).to_have_text("only prompt")

    now[0] += timedelta(seconds=61)  # ann's lease expires; ben takes and ranks the item
    with FeedbackClient(live.url, ben["token"]) as b:
        a = b.next_item(c["id"])
        b.submit_ranking(a["item"]["id"], [x["id"] for x in a["item"]["answers"]])

    page.locator(".answer").nth(0).click()
    page.locator(".answer").nth(1).click()
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("expired")
    expect(page.locator("#done")).to_be_visible()
    assert [r["labeler_id"] for r in admin.list_rankings(campaign_id=c["id"])] == [ben["labeler"]["id"]]
