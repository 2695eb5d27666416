"""Bad requests cannot hurt the query service: real HTTP over loopback to a real uvicorn.

Oversized bodies (chunked ones with no length, ones that stall) get 413 as soon as they pass
the limit, and a client streaming one reads that 413 (no reset); JSON bodies have a smaller
limit sized to --max-batch and are parsed off the event loop; images whose headers claim too
many pixels get 413 before any decode, thumbnails' too, and concurrent thumbnails of one
huge image cost one bounded decode; ragged or non-finite vectors and ids of unreadable rows
get 4xx; a set without an index is searched exactly and says so; and good queries keep
their latency while bad ones pour in.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image, ImageFile

import bob_cache.pipelines.serve as serve_module
from bob_cache.data.thumbnails import Thumbnails
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app, json_body_limit
from tests.loadtest import interference_test, serve_in_thread
from tests.pipelines.conftest import BROKEN_ID

LIMIT_MB = 1.0
LIMIT = int(LIMIT_MB * 2**20)


@pytest.fixture(scope="module")
def service(unindexed_store: Path) -> Iterator[tuple[str, Searcher]]:
    """The service over the unindexed set (1 MB bodies, 8 queries a request, default pixel
    limits); no backbone is loaded: every image below is refused before it would embed."""
    searcher = Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet"))
    app = create_app(searcher, max_upload_mb=LIMIT_MB, max_batch=8, load_model=False)
    with serve_in_thread(app) as url:
        yield url, searcher


# --- raw HTTP/1.1 over a socket (httpx cannot send a body that never ends) ----------------
class RawRequest:
    """A request whose body a thread sends as chunks while the main thread reads the answer."""

    def __init__(self, url: str, head: bytes) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        self.sock.sendall(head)
        self.sent = 0
        self.passed_limit_at: float | None = None
        self.send_error: str | None = None

    def send_chunks(self, *, stop_after: int, chunk: int = 64 * 1024) -> threading.Thread:
        """Send ``stop_after`` body bytes in chunks (no terminating chunk), then stall."""
        block = f"{chunk:x}\r\n".encode() + b"1," * (chunk // 2) + b"\r\n"

        def run() -> None:
            try:
                while self.sent < stop_after:
                    self.sock.sendall(block)
                    self.sent += chunk
                    if self.sent > LIMIT and self.passed_limit_at is None:
                        self.passed_limit_at = time.perf_counter()
            except OSError as exc:  # the server answered and closed: expected
                self.send_error = repr(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def response(self, timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of the answer (read until the server closes)."""
        self.sock.settimeout(timeout)
        data = b""
        try:
            while True:
                piece = self.sock.recv(65536)
                if not piece:
                    break
                data += piece
                if _complete(data):
                    break
        except ConnectionResetError:  # a reset after the answer arrived
            pass
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split()[1]), headers, json.loads(body)

    def close(self) -> None:
        self.sock.close()


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.decode("latin1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return len(body) >= int(value)
    return False


PART = (b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n")  # fmt: skip


def chunked_head(path: str = "/query/image") -> bytes:
    """The head of a chunked POST: an upload to /query/image (the upload limit; its first
    chunk opens the file's part), or JSON."""
    if path != "/query/image":
        kind, first = "application/json", b""
    else:
        kind, first = "multipart/form-data; boundary=XX", b"%x\r\n%s\r\n" % (len(PART), PART)
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + first


def good_vector(searcher: Searcher, row: int = 0) -> list[float]:
    return searcher.fs.features[row].astype(float).tolist()


def assert_still_serving(url: str, searcher: Searcher) -> None:
    answer = httpx.post(f"{url}/query/vector", json={"vectors": [good_vector(searcher)], "k": 1})
    assert answer.status_code == 200 and answer.json()["results"][0][0]["row"] == 0


# --- 1. bodies over the limit -----------------------------------------------------------------
def test_a_chunked_body_that_never_ends_gets_413_as_soon_as_it_passes_the_limit(
    service,
) -> None:
    url, searcher = service
    request = RawRequest(url, chunked_head())
    sender = request.send_chunks(stop_after=1 << 40)  # never finishes by itself
    status, headers, body = request.response()
    answered = time.perf_counter()
    sender.join(10)
    request.close()
    assert status == 413, body
    assert "over the 1 MB limit (--max-upload-mb)" in body["detail"]
    assert headers.get("connection") == "close"
    assert request.passed_limit_at is not None
    assert answered - request.passed_limit_at < 2.0
    assert not sender.is_alive() and request.send_error  # the server stopped reading it
    assert request.sent < 64 * LIMIT  # cut off, not read to an end that never comes
    assert_still_serving(url, searcher)


def test_a_chunked_body_that_passes_the_limit_then_stalls_gets_413(service) -> None:
    url, searcher = service
    request = RawRequest(url, chunked_head())
    request.send_chunks(stop_after=int(1.5 * LIMIT)).join(10)  # then silence, socket open
    assert request.passed_limit_at is not None
    status, _, body = request.response(timeout=5)
    waited = time.perf_counter() - request.passed_limit_at
    request.close()
    assert status == 413 and "1 MB limit (--max-upload-mb)" in body["detail"]
    assert waited < 2.0
    assert_still_serving(url, searcher)


def test_a_declared_length_over_the_limit_is_refused_before_the_body(service) -> None:
    url, searcher = service
    head = (
        "POST /query/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {10 * LIMIT}\r\n\r\n"
    ).encode()
    request = RawRequest(url, head)  # no body byte is ever sent
    status, headers, body = request.response(timeout=5)
    request.close()
    assert status == 413 and f"{10 * LIMIT} bytes is over the 1 MB limit" in body["detail"]
    assert headers.get("connection") == "close"
    chunked_small = httpx.post(  # a chunked body under the limit still gets through
        f"{url}/query/vector",
        content=iter([b'{"vectors": [', json.dumps(good_vector(searcher)).encode(), b'], "k": 1}']),
        headers={"content-type": "application/json"},
    )
    assert chunked_small.status_code == 200, chunked_small.text


def test_a_chunked_upload_over_the_limit_gets_413(service) -> None:
    url, searcher = service

    def body() -> Iterator[bytes]:  # a multipart upload streamed without a length
        yield (b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")  # fmt: skip
        for _ in range(40):
            yield b"\0" * 65536
        yield b"\r\n--XX--\r\n"

    answer = httpx.post(
        f"{url}/query/image",
        content=body(),
        headers={"content-type": "multipart/form-data; boundary=XX"},
    )
    assert answer.status_code == 413, answer.text
    assert "over the 1 MB limit (--max-upload-mb)" in answer.json()["detail"]
    assert_still_serving(url, searcher)


def multipart(total: int) -> Iterator[bytes]:
    """A multipart upload of ``total`` bytes of one file, streamed without a length."""
    yield PART
    for _ in range(total // 65536):
        yield b"\0" * 65536
    yield b"\r\n--XX--\r\n"


@pytest.mark.parametrize(
    ("path", "streamed"),
    [("/query/image", True), ("/query/image", False), ("/query/vector", True)],
)
def test_a_client_sending_a_body_over_the_limit_reads_the_413_not_a_reset(
    service, path: str, streamed: bool
) -> None:
    """A plain client (the standard library's) sends the whole body before it reads the
    answer: the server must answer, then read and drop the rest (up to its drain bounds)
    instead of closing on the sender, which then sees a broken pipe or a reset (as it did
    before the drain, for 12 MB over a 1 MB limit, chunked or not)."""
    url, searcher = service
    size = 12 * LIMIT  # twelve times the upload limit, many more the JSON one
    if path == "/query/image":
        kind, option = "multipart/form-data; boundary=XX", "(--max-upload-mb)"
        body: Any = multipart(size)
    else:
        kind, option = "application/json", "(--max-batch 8 queries of"
        body = iter([b'{"vectors": [', *[b" " * 65536] * (size // 65536), b"]}"])
    data = body if streamed else b"".join(body)  # chunked, or with a Content-Length
    request = urllib.request.Request(f"{url}{path}", data=data, method="POST",
                                     headers={"content-type": kind})  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert option in json.loads(refused.value.read())["detail"]
    assert refused.value.headers["connection"] == "close"
    assert time.perf_counter() - started < 5.0
    assert_still_serving(url, searcher)


# --- 1b. JSON bodies: a limit sized to --max-batch, parsed off the event loop ------------------
def test_json_bodies_are_limited_to_what_max_batch_vectors_need_and_such_batches_fit(
    service,
) -> None:
    url, searcher = service
    dim, limit = searcher.fs.dim, json_body_limit(8, searcher.fs.dim)
    assert limit < LIMIT and httpx.get(f"{url}/health").json()["max_json_bytes"] == limit
    widest = (-np.random.default_rng(0).random((8, dim)) * 1e-5 - 1e-6).tolist()
    body = json.dumps({"vectors": widest, "k": 1}, indent=2).encode()  # the longest numbers
    assert len(body) > 0.9 * 8 * dim * serve_module.BYTES_PER_VALUE  # what the limit allows
    answer = httpx.post(f"{url}/query/vector", content=body,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 200 and len(answer.json()["results"]) == 8
    padded = b'{"vectors": [' + b" " * limit + b"[1]]}"
    over = httpx.post(f"{url}/query/id", content=padded,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert over.status_code == 413, over.text
    detail = over.json()["detail"]
    assert f"{len(padded)} bytes is over the" in detail
    assert f"limit for JSON queries (--max-batch 8 queries of {dim} values)" in detail
    bad = {  # the body is parsed by hand: its errors still say what was expected
        b'{"vectors": [[1,': (400, "not JSON"),
        b'{"vectors": "x"}': (422, "'vectors' a list"),
        b'{"ids": ["a"], "k": "3"}': (422, "'k' must be an integer"),
    }
    for content, (status, message) in bad.items():
        path = "/query/id" if b"ids" in content else "/query/vector"
        answer = httpx.post(f"{url}{path}", content=content)
        assert answer.status_code == status and message in answer.json()["detail"], answer.text


def test_a_slow_json_parse_does_not_stall_other_requests(service, monkeypatch) -> None:
    """Parsing runs on a worker thread: while one body takes 1.5 s to parse, other requests
    (the event loop) answer at once."""
    url, searcher = service
    parse = serve_module.parse_json_query

    def slow(body: bytes, field: str) -> Any:
        time.sleep(1.5)
        return parse(body, field)

    monkeypatch.setattr(serve_module, "parse_json_query", slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/query/vector", timeout=10,
                              json={"vectors": [good_vector(searcher)], "k": 1})  # fmt: skip
        time.sleep(0.2)
        waits = []
        for _ in range(5):
            started = time.perf_counter()
            assert httpx.get(f"{url}/health").status_code == 200
            waits.append(time.perf_counter() - started)
        assert not pending.done() and max(waits) < 0.5, waits
        assert pending.result().status_code == 200


# --- 2. decompression bombs ---------------------------------------------------------------------
@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of every image PIL decodes meanwhile (the server runs in this process)."""
    seen: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        seen.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


def upload(url: str, *images: bytes) -> httpx.Response:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/query/image", files=files, params={"k": 1}, timeout=30)


def test_image_bombs_get_413_before_any_pixel_is_decoded(service, blank_png, decodes) -> None:
    url, searcher = service
    huge = blank_png(20_000, 20_000)  # 400 MP (1.2 GB as RGB) in ~50 KB
    assert len(huge) < 100_000
    started = time.perf_counter()
    answer = upload(url, huge)
    assert answer.status_code == 413, answer.text
    assert "too large to decode" in answer.json()["detail"]
    assert "over the 40 MP per-image limit (--max-image-mp)" in answer.json()["detail"]
    assert time.perf_counter() - started < 2.0
    over = upload(url, blank_png(8000, 6000))  # 48 MP: under PIL's own ceiling, over ours
    assert over.status_code == 413, over.text
    assert "8000 × 6000 = 48.0 MP, over the 40 MP per-image limit" in over.json()["detail"]
    batch = upload(url, *[blank_png(6000, 6000)] * 6)  # 36 MP each, 216 MP together
    assert batch.status_code == 413, batch.text
    assert "216.0 MP together, over the 200 MP per-request limit" in batch.json()["detail"]
    assert decodes == []  # refused from the headers alone
    broken = upload(url, b"\x89PNG\r\n\x1a\n but then garbage")
    assert broken.status_code == 400 and "Cannot decode" in broken.json()["detail"]
    assert_still_serving(url, searcher)


# --- 3. bad vectors and ids ---------------------------------------------------------------------
def test_ragged_non_finite_and_misshapen_vectors_get_4xx(service) -> None:
    url, searcher = service
    dim = searcher.fs.dim
    row = ",".join(["0.5"] * dim)
    cases = {  # raw JSON: NaN and Infinity are what a careless client sends
        '{"vectors": [[1, 2], [1]]}': "rows of different lengths (1, 2)",
        f'{{"vectors": [[{row}], [1]]}}': "rows of different lengths",
        f'{{"vectors": [[{row[:-3]}NaN]]}}': "contain NaN or inf",
        f'{{"vectors": [[{row}], [{row[:-3]}Infinity]]}}': "Query vector(s) 1 contain NaN",
        f'{{"vectors": [[{row[:-3]}1e39]]}}': "beyond float32's range",
        f'{{"vectors": [[{row}, 1]]}}': f"Pass (N, {dim}) vectors",
        '{"vectors": [[]]}': f"Pass (N, {dim}) vectors",
    }
    for body, message in cases.items():
        answer = httpx.post(
            f"{url}/query/vector", content=body, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, (body[:40], answer.text)
        assert message in answer.json()["detail"], (body[:40], answer.text)
    assert_still_serving(url, searcher)


def test_an_id_of_an_unreadable_row_gets_400_saying_why(service) -> None:
    url, _ = service
    answer = httpx.post(f"{url}/query/id", json={"ids": [BROKEN_ID], "k": 2})
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert f"Row '{BROKEN_ID}'" in detail and "has no features" in detail
    assert "could not be read when the set was extracted" in detail
    assert "UnidentifiedImageError" in detail or "Error" in detail  # the recorded reason
    good = httpx.post(f"{url}/query/id", json={"ids": ["cat/cat_00.png"], "k": 2})
    assert good.status_code == 200, good.text


# --- 6. no index: exact search, and said so -----------------------------------------------------
def test_a_set_without_an_index_is_searched_exactly_and_says_so(service) -> None:
    url, searcher = service
    health = httpx.get(f"{url}/health").json()
    assert health["index"] is None and health["kind"] == "exact (no index built)"
    assert "No index is built" in health["note"] and health["rows"] == 9  # 10 less the broken
    x = searcher.fs.features[:].astype(np.float32)
    valid = searcher.valid
    assert valid.sum() == 9 and not np.isfinite(x[~valid]).all()
    unit = x[valid] / np.linalg.norm(x[valid], axis=1, keepdims=True)
    rows = np.flatnonzero(valid)
    query = x[rows[3]] + 0.1 * np.sin(np.arange(x.shape[1]))
    truth = rows[np.argsort(-(unit @ (query / np.linalg.norm(query))))][:5]
    answer = httpx.post(f"{url}/query/vector", json={"vectors": [query.tolist()], "k": 5})
    assert answer.status_code == 200, answer.text
    assert [r["row"] for r in answer.json()["results"][0]] == truth.tolist()
    assert "No index is built" in answer.json()["note"]


# --- 5. load: bad requests do not slow good ones -----------------------------------------------
def bad_requests(url: str, searcher: Searcher, blank_png: Callable[[int, int], bytes]) -> Any:
    """A function sending the next of a cycle of bad requests; it raises if one is not
    refused as it should be (the background load records that)."""
    dim = searcher.fs.dim
    bombs = {"400 MP": blank_png(20_000, 20_000), "48 MP": blank_png(8000, 6000)}
    client = httpx.Client(base_url=url, timeout=30)

    def oversized() -> int:
        request = RawRequest(url, chunked_head())
        request.send_chunks(stop_after=2 * LIMIT)
        status = request.response()[0]
        request.close()
        return status

    def post(path: str, **kw: Any) -> Callable[[], httpx.Response]:
        return lambda: client.post(path, **kw)

    def image_post(image: bytes) -> Callable[[], httpx.Response]:
        return post("/query/image", files=[("files", ("b.png", image))], params={"k": 1})

    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("oversized chunked body", oversized, 413),
        ("ragged vectors", post("/query/vector", json={"vectors": [[1, 2], [1]]}), 400),
        ("wrong dimension", post("/query/vector", json={"vectors": [[1.0] * (dim + 1)]}), 400),
        ("unreadable row", post("/query/id", json={"ids": [BROKEN_ID]}), 400),
        ("unknown id", post("/query/id", json={"ids": ["no/such.png"]}), 404),
        *[(f"{size} image", image_post(image), 413) for size, image in bombs.items()],
    ]
    turn = iter(range(1 << 62))

    def send() -> None:
        name, run, expected = cases[next(turn) % len(cases)]
        answer = run()
        status = answer if isinstance(answer, int) else answer.status_code
        if status != expected:
            text = "" if isinstance(answer, int) else answer.text[:200]
            raise AssertionError(f"{name} answered {status}, expected {expected}: {text}")

    return send


def test_bad_requests_do_not_slow_good_ones(service, blank_png) -> None:
    """Good p99 beside back-to-back bad requests stays within 2× the clean p99 (floor 5 ms).

    Clean and loaded rounds alternate, so drift on this shared 2-core machine falls on both;
    a measurement that a burst of outside load spoils is retried (at most 3 tries): a real
    regression (a bad request that reads, decodes or searches) fails every try.
    """
    url, searcher = service
    vector = good_vector(searcher, 2)

    def good(client: httpx.Client) -> httpx.Response:
        return client.post("/query/vector", json={"vectors": [vector], "k": 5})

    noise = bad_requests(url, searcher, blank_png)
    tries = []
    for _ in range(3):
        result = interference_test(url, good, noise, requests=800, rounds=4)
        tries.append(result)
        clean, mixed, bad = result.clean, result.loaded, result.background
        print(f"\nclean p50/p99 {clean.p50_ms:.2f}/{clean.p99_ms:.2f} ms; beside {bad.calls} "
              f"bad requests: {mixed.p50_ms:.2f}/{mixed.p99_ms:.2f} ms")  # fmt: skip
        assert clean.errors == 0 and mixed.errors == 0
        assert bad.failures == [] and bad.calls >= 60  # every bad request refused as it should
        if mixed.p99_ms <= 2 * max(clean.p99_ms, 5.0):
            break
    else:
        pytest.fail(f"good p99 over 2× the clean p99 in every try: {[t.to_dict() for t in tries]}")
    assert_still_serving(url, searcher)


# --- 4. thumbnails: a pixel budget from the header, one bounded decode, a cache ----------------
@pytest.fixture(scope="module")
def huge_images(unindexed_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The set's images, moved, with two rows' files replaced by 8000-pixel-wide ones: an
    8000 × 8000 one-colour RGB PNG (~200 KB on disk, 256 MB decoded) and an 8000 × 6000 JPEG."""
    root = tmp_path_factory.mktemp("huge-images") / "photos"
    shutil.copytree(unindexed_store.parent / "photos", root)
    Image.new("RGB", (8000, 8000), (200, 120, 40)).save(root / "cat/cat_00.png")
    Image.new("RGB", (8000, 6000), (40, 120, 200)).save(root / "cat/cat_01.jpg", quality=80)
    return root


class PeakRss:
    """This process's resident memory growth, sampled every millisecond while the block runs
    (the server runs in this process)."""

    def __enter__(self) -> PeakRss:
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def six_at_once(url: str, path: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(lambda _: httpx.get(f"{url}{path}", timeout=60), range(6)))


def test_a_huge_thumbnail_is_refused_from_its_header(
    unindexed_store: Path, huge_images: Path, decodes
) -> None:
    """Six concurrent thumbnails of a 64 MP PNG (over the 40 MP budget): 413 without a decode,
    and the server's memory does not grow (it took 3.7 GB before the budget)."""
    searcher = Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet"))
    app = create_app(searcher, load_model=False, images_root=huge_images)
    with serve_in_thread(app) as url, PeakRss() as rss:
        answers = six_at_once(url, "/thumb/cat/cat_00.png")
        jpeg = httpx.get(f"{url}/thumb/cat/cat_01.jpg")  # 48 MP, decoded at 1/8 scale
    assert [a.status_code for a in answers] == [413] * 6, answers[0].text
    detail = answers[0].json()["detail"]
    assert "8000 × 8000 = 64.0 MP, over the 40 MP thumbnail budget (--max-image-mp)" in detail
    assert (8000, 8000) not in decodes
    assert jpeg.status_code == 200 and Image.open(io.BytesIO(jpeg.content)).size == (160, 120)
    assert (1000, 750) in decodes and (8000, 6000) not in decodes  # the draft: 1/8 a side
    print(f"\nsix refused thumbnails: peak RSS growth {rss.growth_mb:.0f} MB")
    assert rss.growth_mb < 100, rss.growth_mb


def test_concurrent_thumbnails_of_one_huge_image_decode_it_once(
    unindexed_store: Path, huge_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget that admits the 64 MP PNG, six concurrent requests share one decode
    (256 MB, as PIL holds RGB in 4 bytes a pixel) and later ones come from the cache."""
    renders: list[str] = []
    render = Thumbnails._render

    def counted(self: Thumbnails, id_: str) -> bytes:
        renders.append(id_)
        return render(self, id_)

    monkeypatch.setattr(Thumbnails, "_render", counted)
    searcher = Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet"))
    app = create_app(searcher, load_model=False, images_root=huge_images, max_image_mp=70)
    with serve_in_thread(app) as url, PeakRss() as rss:
        answers = six_at_once(url, "/thumb/cat/cat_00.png")
        again = httpx.get(f"{url}/thumb/cat/cat_00.png")
    assert [a.status_code for a in answers] == [200] * 6, answers[0].text
    assert {a.content for a in answers} == {again.content}
    assert Image.open(io.BytesIO(again.content)).size == (160, 160)
    assert renders == ["cat/cat_00.png"]  # once, for all seven requests
    print(f"\nsix thumbnails, one decode: peak RSS growth {rss.growth_mb:.0f} MB")
    assert rss.growth_mb < 450, rss.growth_mb  # one decode, not six (3.7 GB before)
