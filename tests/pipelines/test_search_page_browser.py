"""The search page in a real browser (headless chromium driven by selenium): search by id,
by clicking a thumbnail and by uploading an image; API errors shown on the page.

Skipped when selenium, chromium or chromedriver is missing (``make test`` installs the
browser with apt-get where it can). Selenium is pointed at the installed chromedriver, so
Selenium Manager never downloads anything.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from tests.loadtest import serve_in_thread

QUERY = "astronaut/astronaut_00.png"
K = 5
WAIT_S = 60
BINARY = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
DRIVER = shutil.which("chromedriver")


def why_no_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install 'selenium>=4.20' (the dev extra)"
    if BINARY is None or DRIVER is None:
        return "no chromium/chromedriver: apt-get install chromium chromium-driver"
    return None


pytestmark = pytest.mark.skipif(why_no_browser() is not None, reason=str(why_no_browser()))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = BINARY
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=DRIVER)
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def url(photo_store: tuple[Path, Path]) -> Iterator[str]:
    searcher = Searcher.open(QueryConfig(str(photo_store[0]), "photos", "test_resnet"))
    with serve_in_thread(create_app(searcher)) as base:
        yield base


def wait(driver: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def results(driver: Any) -> list[dict[str, str]]:
    """The rendered results: rank, score, id and class text of each."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .result')].map((li) => ({"
        "rank: li.querySelector('.rank').textContent, score: li.querySelector('.score')"
        ".textContent, id: li.querySelector('.id').textContent,"
        "cls: li.querySelector('.class').textContent}));"
    )


def search(driver: Any, status: str, *, click: str | None = None) -> list[dict[str, str]]:
    """Click ``click`` (a button id), wait for a status line holding ``status``; the results."""
    if click is not None:
        driver.find_element("id", click).click()
    wait(driver, lambda d: status in d.find_element("id", "status").text)
    return results(driver)


def thumbnails_loaded(driver: Any) -> bool:
    """Every result shows its thumbnail, decoded (a failed one is replaced by text)."""
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .thumb img')];"
        "return imgs.length === arguments[0]"
        "  && imgs.every((img) => img.complete && img.naturalWidth > 0);",
        K,
    )


def test_search_by_id_click_and_upload_in_a_browser(
    browser: Any, url: str, photo_store: tuple[Path, Path]
) -> None:
    browser.get(f"{url}/")
    wait(browser, lambda d: "15 rows" in d.find_element("id", "info").text)
    browser.find_element("id", "k").clear()
    browser.find_element("id", "k").send_keys(str(K))
    browser.find_element("id", "query-id").send_keys(QUERY)

    shown = search(browser, f"Neighbours of {QUERY}: {K} results", click="search-id")
    expected = httpx.post(f"{url}/query/id", json={"ids": [QUERY], "k": K}).json()["results"][0]
    assert len(shown) == K
    assert [r["id"] for r in shown] == [r["id"] for r in expected]  # its own row is left out
    assert shown[0] == {"rank": "#1", "score": f"{expected[0]['score']:.3f}",
                        "id": expected[0]["id"], "cls": expected[0]["class"]}  # fmt: skip
    wait(browser, thumbnails_loaded)

    browser.find_elements("css selector", "#results .thumb")[1].click()  # search by a result
    clicked = shown[1]["id"]
    again = search(browser, f"Neighbours of {clicked}: {K} results")
    assert len(again) == K and clicked not in [r["id"] for r in again]
    assert browser.find_element("id", "query-id").get_attribute("value") == clicked

    image = (photo_store[1] / QUERY).resolve()
    browser.find_element("id", "query-image").send_keys(str(image))
    uploaded = search(browser, f"Neighbours of {image.name}: {K} results", click="search-image")
    assert len(uploaded) == K and uploaded[0]["id"] == QUERY  # a stored image finds itself
    assert uploaded[0]["rank"] == "#1" and uploaded[0]["cls"] == "astronaut"
    wait(browser, thumbnails_loaded)


def test_api_errors_are_shown_on_the_page(browser: Any, url: str) -> None:
    browser.get(f"{url}/")
    browser.find_element("id", "query-id").send_keys("no/such/id.png")
    browser.find_element("id", "search-id").click()
    error = wait(browser, lambda d: d.find_element("id", "error").is_displayed()
                 and d.find_element("id", "error"))  # fmt: skip
    assert "No row with id 'no/such/id.png'" in error.text
    assert results(browser) == []
