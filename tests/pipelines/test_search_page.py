"""The query service's search page and thumbnails over real HTTP: the page, small JPEGs from
under the images root, 404 for every way out of that root, and ``--images-root``."""

from __future__ import annotations

import http.client
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from bob_cache.data.thumbnails import THUMB_SIZE, Thumbnails
from bob_cache.errors import ThumbnailNotFoundError
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from tests.loadtest import serve_in_thread

VALID = "astronaut/astronaut_00.png"


@pytest.fixture(scope="module")
def searcher(photo_store: tuple[Path, Path]) -> Searcher:
    return Searcher.open(QueryConfig(str(photo_store[0]), "photos", "test_resnet"))


@pytest.fixture(scope="module")
def server(searcher: Searcher, photo_store: tuple[Path, Path]) -> Iterator[tuple[str, Path]]:
    with serve_in_thread(create_app(searcher, load_model=False)) as url:
        yield url, photo_store[1]


def raw_get(url: str, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` sent byte for byte (httpx would normalize ``..`` and ``%2e``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        image.load()
        return image.size


def test_the_page_holds_the_search_forms_and_loads_nothing_from_elsewhere(server) -> None:
    url, _ = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="query-id"', 'id="k"', 'type="file"', 'id="query-image"',
                    'id="results"', 'id="error"'):  # fmt: skip
        assert element in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text  # works offline


def test_a_thumbnail_is_a_small_cached_jpeg(server) -> None:
    url, photos = server
    answer = httpx.get(f"{url}/thumb/{VALID}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert "max-age" in answer.headers["cache-control"]
    with Image.open(photos / VALID) as original:
        assert jpeg_size(answer.content) == original.size  # 96 px: small already, kept
    health = httpx.get(f"{url}/health").json()
    assert health["thumbnails"] is True and "thumbnails_note" not in health


@pytest.mark.parametrize(
    "path",
    [
        "/thumb/../../../../../../etc/passwd",
        "/thumb/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumb/astronaut/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/thumb//etc/passwd",
        "/thumb/%2Fetc%2Fpasswd",
        "/thumb/astronaut/../astronaut/astronaut_00.png",  # inside the root, but not an id
        "/thumb/astronaut/nope.png",
        "/thumb/",
    ],
)
def test_paths_out_of_the_root_or_not_ids_get_404(server, path: str) -> None:
    url, _ = server
    status, kind, body = raw_get(url, path)
    assert status == 404 and kind == "application/json", body
    assert b"root:" not in body


def test_an_absolute_path_of_a_real_image_gets_404(server) -> None:
    url, photos = server
    assert raw_get(url, f"/thumb/{VALID}")[0] == 200  # the raw client reaches real ids
    assert raw_get(url, f"/thumb{(photos / VALID).resolve()}")[0] == 404
    assert raw_get(url, f"/thumb/{(photos / VALID).resolve()}")[0] == 404


def test_images_root_serves_a_moved_copy_and_refuses_symlinks_out_of_it(
    searcher: Searcher, photo_store: tuple[Path, Path], tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(photo_store[1], moved)
    Image.new("RGB", (400, 300), "red").save(moved / "coffee" / "coffee_00.png")
    outside = tmp_path / "outside"
    shutil.copytree(moved / "cat", outside)
    (moved / "cat" / "cat_00.png").unlink()
    (moved / "cat" / "cat_00.png").symlink_to(outside / "cat_00.png")  # file link out
    (moved / "cat" / "cat_02.png").unlink()
    (moved / "cat" / "cat_02.png").symlink_to(moved / "coffee" / "coffee_02.png")  # stays in
    shutil.rmtree(moved / "astronaut")
    (moved / "astronaut").symlink_to(photo_store[1] / "astronaut")  # folder link out
    app = create_app(searcher, load_model=False, images_root=moved)
    with serve_in_thread(app) as url:
        big = httpx.get(f"{url}/thumb/coffee/coffee_00.png")
        assert big.status_code == 200 and jpeg_size(big.content) == (THUMB_SIZE, 120)
        assert httpx.get(f"{url}/thumb/cat/cat_02.png").status_code == 200
        assert httpx.get(f"{url}/thumb/cat/cat_00.png").status_code == 404
        assert httpx.get(f"{url}/thumb/{VALID}").status_code == 404
        assert "not under the images root" in httpx.get(f"{url}/thumb/{VALID}").json()["detail"]
        for way_out in ("/thumb/../outside/cat_01.jpg", "/thumb/%2e%2e%2foutside%2fcat_01.jpg",
                        f"/thumb/{outside / 'cat_01.jpg'}"):  # fmt: skip
            assert raw_get(url, way_out)[0] == 404, way_out  # a real image beside the root


def test_ids_that_point_out_of_the_root_are_refused_even_when_listed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "x.png")
    Image.new("RGB", (20, 20)).save(root / "ok.png")
    ids = {"ok.png", "../outside/x.png", str(outside / "x.png"), "sub/../../outside/x.png"}
    thumbs = Thumbnails({"kind": "folder", "origin": str(root)}, ids)
    assert jpeg_size(thumbs.jpeg("ok.png")) == (20, 20)
    for id_ in sorted(ids - {"ok.png"}):
        with pytest.raises(ThumbnailNotFoundError, match="not under the images root"):
            thumbs.jpeg(id_)


def test_a_missing_images_root_leaves_the_page_up_and_says_why(
    searcher: Searcher, tmp_path: Path
) -> None:
    with serve_in_thread(create_app(searcher, load_model=False, images_root=tmp_path / "x")) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["thumbnails"] is False and "--images-root DIR" in health["thumbnails_note"]
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/thumb/{VALID}").status_code == 404


def test_builtin_thumbnails_are_rendered_and_other_ids_refused() -> None:
    thumbs = Thumbnails({"kind": "builtin", "origin": "builtin:digits"}, {"digits/00011"})
    assert thumbs.available and jpeg_size(thumbs.jpeg("digits/00011")) == (8, 8)
    with pytest.raises(ThumbnailNotFoundError, match="No row with id 'digits/00012'"):
        thumbs.jpeg("digits/00012")


def test_manifest_thumbnails_follow_its_paths_and_images_root(tmp_path: Path) -> None:
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    Image.new("RGB", (300, 200), "blue").save(tmp_path / "data" / "imgs" / "a.png")
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("path,label,id\nimgs/a.png,x,first\n")
    dataset = {"kind": "manifest", "origin": str(manifest)}
    assert jpeg_size(Thumbnails(dataset, {"first"}, size=60).jpeg("first")) == (60, 40)
    moved = tmp_path / "moved"
    moved.mkdir()
    Image.new("RGB", (30, 20), "blue").save(moved / "a.png")
    assert jpeg_size(Thumbnails(dataset, {"first"}, images_root=moved).jpeg("first")) == (30, 20)


def test_other_kinds_are_read_through_their_source(tmp_path: Path) -> None:
    """A kind without an images root (here a segmentation folder) is listed again from its
    recorded --data value and served through the source; a source that no longer lists says so."""
    root = tmp_path / "seg"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (200, 100), "red").save(root / "images" / "a.png")
    Image.new("L", (200, 100), 0).save(root / "masks" / "a.png")
    (root / "classes.json").write_text('{"classes": ["background", "thing"]}')
    thumbs = Thumbnails({"kind": "segfolder", "origin": str(root)}, {"a.png"}, size=50)
    assert thumbs.available and jpeg_size(thumbs.jpeg("a.png")) == (50, 25)
    gone = Thumbnails({"kind": "segfolder", "origin": str(tmp_path / "gone")}, {"a.png"})
    with pytest.raises(ThumbnailNotFoundError, match="cannot be listed from"):
        gone.jpeg("a.png")


def test_serve_help_names_the_page_and_images_root(cli) -> None:
    result = cli("serve", "--help")
    assert result.exit_code == 0 and "--images-root" in result.output
    assert "search page" in result.output
