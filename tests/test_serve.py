"""`peftlab serve`: the real server process on 127.0.0.1, called over HTTP with httpx, and its page in a real browser.

The run folders are test_predict's one-step MiniLM (one layer) text run and tiny-ViT image run. Server tests are
slow-marked (training the runs and starting a server process take tens of seconds on 2 cores); the micro-batcher and
the command line's checks are fast.
"""

import asyncio
import base64
import copy
import io
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import strategies as st
from PIL import Image

from peftlab.microbatch import MicroBatcher, ModelWorker
from peftlab.backbones import portable_name
from peftlab.loading import load
from peftlab.serve import TOKEN_ENV, server_process
from tests import bad_images
from tests.browser import headless_browser, needs_chromium
from tests.test_predict import train_runs

TOKEN = "test-token-7"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a gripping, beautifully shot film", "two hours I will not get back", "fine.",
         "the cast is wonderful but the script is a mess from start to finish"]
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def text_server(runs):
    """The text run served without a token, small limits so the limit cases stay small."""
    with server_process(runs["text"], "--no-access-log", "--max-items", "8", "--max-text-chars", "500",
                        "--max-body-mb", "1") as server:
        yield server


@pytest.fixture(scope="module")
def image_server(runs):
    """The image run served with the token from the environment variable."""
    env = {**os.environ, TOKEN_ENV: TOKEN}
    with server_process(runs["image"], "--no-access-log", "--max-items", "4", "--max-image-mb", "0.5",
                        "--max-pixels", "250000", env=env) as server:
        yield server


def png_bytes(size=(20, 20), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_matches(predictions: list[dict], probabilities, label_names: list[str]) -> None:
    """The server's predictions equal peftlab.load's probabilities (to float32 rounding) and argmax labels."""
    assert len(predictions) == len(probabilities)
    for prediction, row in zip(predictions, probabilities.tolist()):
        assert list(prediction["probabilities"]) == label_names
        assert list(prediction["probabilities"].values()) == pytest.approx(row, abs=1e-5)
        assert prediction["label"] == label_names[max(range(len(row)), key=row.__getitem__)]


@slow
def test_text_predictions_equal_peftlab_loads(runs, text_server):
    predictor = load(runs["text"])
    response = httpx.post(text_server.url + "/predict", json={"inputs": TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    assert_matches(response.json()["predictions"], predictor.probabilities(TEXTS), predictor.label_names)
    # Concurrent requests of one text each are batched together by the server; each still gets its own answer.
    async def one_each():
        async with httpx.AsyncClient(base_url=text_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", json={"inputs": [text]}) for text in TEXTS))

    for text, response in zip(TEXTS, asyncio.run(one_each())):
        assert response.status_code == 200, response.text
        assert_matches(response.json()["predictions"], predictor.probabilities([text]), predictor.label_names)


@slow
def test_image_predictions_equal_peftlab_loads(runs, image_server, tmp_path):
    predictor = load(runs["image"])
    red, wide = png_bytes(), png_bytes((40, 16), (10, 200, 90))
    bad_images.write_16bit_png(tmp_path / "gray16.png")
    gray16 = (tmp_path / "gray16.png").read_bytes()
    expected = predictor.probabilities([Image.open(io.BytesIO(data)) for data in (red, wide, gray16)])
    as_json = httpx.post(image_server.url + "/predict", headers=AUTH, timeout=60,
                         json={"images": [b64(red), "data:image/png;base64," + b64(wide), b64(gray16)]})
    as_files = httpx.post(image_server.url + "/predict", headers=AUTH, timeout=60,
                          files=[("images", (name, data, "image/png"))
                                 for name, data in [("red.png", red), ("wide.png", wide), ("gray16.png", gray16)]])
    for response in (as_json, as_files):
        assert response.status_code == 200, response.text
        assert_matches(response.json()["predictions"], expected, predictor.label_names)


@slow
def test_metadata(runs, text_server):
    metadata = httpx.get(text_server.url + "/metadata").json()
    metrics = json.loads((runs["text"] / "metrics.json").read_text())
    run = load(runs["text"])
    assert metadata["task"] == "text" and metadata["strategy"] == "lora" == run.cfg.strategy
    assert metadata["base_model"] == portable_name(run.cfg.model.name) == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["label_names"] == run.label_names
    assert metadata["test_metrics"] == metrics["test"] and metadata["format"] == "pytorch"
    assert metadata["limits"]["max_items"] == 8


@slow
def test_an_onnx_export_is_served_with_the_same_predictions(runs, tmp_path):
    from peftlab.export import export_run

    export_run(runs["text"], tmp_path / "onnx", log=lambda *args: None)
    with server_process(tmp_path / "onnx", "--no-access-log") as server:
        metadata = httpx.get(server.url + "/metadata").json()
        response = httpx.post(server.url + "/predict", json={"inputs": TEXTS}, timeout=60)
    run = load(runs["text"])
    assert metadata["format"] == "onnx" and metadata["strategy"] == run.cfg.strategy
    assert metadata["base_model"] == portable_name(run.cfg.model.name)
    assert response.status_code == 200, response.text
    assert_matches(response.json()["predictions"], run.probabilities(TEXTS), run.label_names)


JSON_TYPE = {"content-type": "application/json"}
# (id, server, request keyword arguments for httpx, status, a fragment of the error). {big} is a 600x600 PNG.
BAD_REQUESTS = [
    ("not JSON", "text", {"content": b"{inputs", "headers": JSON_TYPE}, 400,
     "the body is not valid JSON"),
    ("JSON nested 100,000 deep", "text", {"content": b"[" * 100_000, "headers": JSON_TYPE}, 400, "nests too deeply"),
    ("unpaired surrogate", "text", {"content": b'{"inputs": ["\\ud800"]}', "headers": JSON_TYPE}, 400,
     "inputs[0] holds an unpaired surrogate"),
    ("JSON list body", "text", {"json": ["a"]}, 400, "the body must be a JSON object, not a list"),
    ("inputs not a list", "text", {"json": {"inputs": "a film"}}, 400, "'inputs' must be a list, not a string"),
    ("empty list", "text", {"json": {"inputs": []}}, 400, "'inputs' is empty"),
    ("number among texts", "text", {"json": {"inputs": ["ok", 3]}}, 400, "inputs[1] is a number, not a string"),
    ("blank text", "text", {"json": {"inputs": ["  "]}}, 400, "inputs[0] is empty"),
    ("unknown key", "text", {"json": {"texts": ["a"]}}, 400, "unknown key 'texts'"),
    ("too many items", "text", {"json": {"inputs": ["a"] * 9}}, 413, "9 inputs in one request, over the limit of 8"),
    ("text over the length limit", "text", {"json": {"inputs": ["x" * 501]}}, 413,
     "inputs[0] has 501 characters, over the limit of 500"),
    ("images to a text run", "text", {"json": {"images": ["aGk="]}}, 400, "this server labels texts, so 'images'"),
    ("files to a text run", "text", {"files": {"images": ("a.png", b"x", "image/png")}}, 400,
     "this server labels texts, not uploaded files"),
    ("plain text body", "text", {"content": b"a film", "headers": {"content-type": "text/plain"}}, 415,
     "content type 'text/plain' is not accepted"),
    ("image path as text", "text", {"json": {"inputs": ["cat.png"]}}, 400, "looks like an image file"),
    ("body over the limit", "text", {"json": {"inputs": ["x" * 400] * 3000}}, 413,
     "the request body is over the limit of 1 MiB"),
    ("unknown endpoint", "text", {"method": "GET", "path": "/labels"}, 404, "no endpoint GET /labels"),
    ("texts to an image run", "image", {"json": {"inputs": ["a cat"]}}, 400, "this server labels images, so 'inputs'"),
    ("not base64", "image", {"json": {"images": ["%%%"]}}, 400, "images[0] is not base64"),
    ("undecodable image", "image", {"json": {"images": [b64(b"GIF89a but not really")]}}, 400,
     "'images[0]' is not a readable image"),
    ("truncated upload", "image", {"files": {"images": ("cut.png", png_bytes()[:60], "image/png")}}, 400,
     "'cut.png' is not a readable image"),
    ("image over the byte limit", "image", {"json": {"images": [b64(os.urandom(600_000))]}}, 413,
     "images[0] is over the limit of 0.5 MiB"),
    ("image over the pixel limit", "image", {"json": {"images": ["{big}"]}}, 413,
     "'images[0]' is 600 x 600 pixels, more than the 250,000 allowed"),
    ("images sharing the pixel budget", "image", {"json": {"images": ["{med}", "{med}"]}}, 413,
     "'images[1]' is 400 x 400 pixels, more than the 90,000 allowed"),
    ("too many files", "image", {"files": [("images", ("a.png", b"x", "image/png"))] * 5}, 413, "Too many files"),
    ("text field in multipart", "image",
     {"data": {"images": "a cat"}, "files": {"images": ("a.png", b"", "image/png")}}, 400,
     "multipart field 'images' holds text, not a file"),
    ("unknown multipart field", "image", {"files": {"photo": ("a.png", b"", "image/png")}}, 400,
     "unexpected multipart field 'photo'"),
]


@slow
def test_bad_requests_get_one_json_error_and_the_server_goes_on(runs, text_server, image_server):
    servers = {"text": text_server, "image": image_server}
    fill = {"{big}": b64(png_bytes((600, 600))), "{med}": b64(png_bytes((400, 400)))}
    for case_id, kind, request, status, fragment in BAD_REQUESTS:
        request = copy.deepcopy(request)
        if "json" in request and "images" in request["json"]:
            request["json"]["images"] = [fill.get(item, item) for item in request["json"]["images"]]
        method, path = request.pop("method", "POST"), request.pop("path", "/predict")
        response = httpx.request(method, servers[kind].url + path, headers={**AUTH, **request.pop("headers", {})},
                                 timeout=60, **request)
        assert response.status_code == status, (case_id, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", case_id
        assert fragment in response.json()["error"], (case_id, response.json())
        assert "\n" not in response.json()["error"]
    for kind, inputs in [("text", {"inputs": ["still here"]}), ("image", {"images": [b64(png_bytes())]})]:
        assert servers[kind].process.poll() is None
        assert httpx.post(servers[kind].url + "/predict", json=inputs, headers=AUTH, timeout=60).status_code == 200
        assert "Traceback" not in servers[kind].output()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)
BODIES = st.one_of(
    st.builds(lambda value: json.dumps(value).encode(), JSON_VALUES),
    st.builds(lambda key, value: json.dumps({key: value}).encode(), st.sampled_from(["inputs", "images"]), JSON_VALUES),
    # Any code point, unpaired surrogates included (json.dumps writes them as \\udXXX escapes).
    st.builds(lambda texts: json.dumps({"inputs": texts}).encode(),
              st.lists(st.text(st.characters(exclude_categories=()), max_size=30), max_size=10)),
    st.binary(max_size=200),
)


@slow
def test_no_body_makes_the_server_fail(text_server, image_server):
    """Generated JSON of every shape, and random bytes, under several content types: a 2xx or a 4xx JSON error."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=BODIES, content_type=st.sampled_from(["application/json", "", "text/plain",
                                                      "multipart/form-data; boundary=x"]),
           kind=st.sampled_from(["text", "image"]))
    def check(body, content_type, kind):
        server = {"text": text_server, "image": image_server}[kind]
        response = httpx.post(server.url + "/predict", content=body, timeout=60,
                              headers={**AUTH, **({"content-type": content_type} if content_type else {})})
        assert response.status_code < 500, (body, content_type, response.text)
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}

    check()
    assert "Traceback" not in text_server.output() + image_server.output()


def raw_request(url: str, data: bytes) -> bytes:
    """Send `data` over a raw socket and nothing more, then return what the server answers (before any timeout)."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(data)
        while b"}" not in answer:  # the JSON error's end
            received = sock.recv(65536)
            if not received:
                break
            answer += received
    return answer


@slow
def test_oversized_bodies_are_refused_before_they_are_read(text_server):
    # A Content-Length of 1 GB and no body at all: the 413 comes back without waiting for it.
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = raw_request(text_server.url, (head + "Content-Length: 1000000000\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 1 MiB" in answer, answer
    # A chunked body (no length) of 17 x 64 KiB, unfinished: answered 413 once it passes 1 MiB, without its end.
    chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
    answer = raw_request(text_server.url, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunk * 17)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 1 MiB" in answer, answer
    assert httpx.get(text_server.url + "/health").status_code == 200


@slow
def test_token_guards_every_endpoint_but_health(image_server):
    url = image_server.url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path, kwargs in [("GET", "/metadata", {}), ("POST", "/predict", {"json": {"images": []}})]:
            response = httpx.request(method, url + path, headers=headers, **kwargs)
            assert response.status_code == 401, (path, headers)
            assert "bearer token" in response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/metadata", headers=AUTH).json()["task"] == "image"
    page = httpx.get(url + "/")  # the page holds no model data; it asks for the token and sends it itself
    assert page.status_code == 200 and 'data-token-required="true"' in page.text


def run_main_with(argv: list[str], monkeypatch, capsys) -> tuple[dict, str]:
    """peftlab.serve.main with uvicorn.run replaced by a recorder; uvicorn's arguments and what main printed."""
    import uvicorn

    from peftlab import serve

    called = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: called.update(app=app, **kwargs))
    serve.main(argv)
    return called, capsys.readouterr().err


@slow
def test_binding_every_network_without_a_token_warns(runs, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    called, err = run_main_with([str(runs["text"]), "--host", "0.0.0.0"], monkeypatch, capsys)
    assert called["host"] == "0.0.0.0"
    assert "warning: serving on 0.0.0.0 without a token" in err
    called, err = run_main_with([str(runs["text"]), "--host", "0.0.0.0", "--token", "t"], monkeypatch, capsys)
    assert "warning" not in err
    called, err = run_main_with([str(runs["text"])], monkeypatch, capsys)
    assert called["host"] == "127.0.0.1" and "warning" not in err


def test_bad_run_folder_is_one_line(tmp_path, capsys):
    from peftlab import serve

    with pytest.raises(SystemExit) as stop:
        serve.main([str(tmp_path / "missing")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not a folder" in err[0]


@slow
@needs_chromium
def test_page_in_a_headless_browser(runs, text_server, image_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    page = httpx.get(text_server.url + "/").text
    assert "http://" not in page and "https://" not in page and "@import" not in page  # nothing from elsewhere
    with headless_browser() as browser:
        wait = WebDriverWait(browser, 60)
        text_predictor = load(runs["text"])
        browser.get(text_server.url + "/")
        texts = wait.until(seen.visibility_of_element_located((By.ID, "texts")))
        # A single-task run: no task picker, and the line names the run's labels as before.
        assert not browser.find_element(By.ID, "task-box").is_displayed()
        model_line = browser.find_element(By.ID, "model").text
        assert model_line.startswith("sentence-transformers/all-MiniLM-L6-v2 + lora (pytorch), labels texts as "
                                     + ", ".join(text_predictor.label_names))
        texts.send_keys("\n".join(TEXTS[:3]))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == 3)
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".result .top-label")]
        assert labels == [r["label"] for r in text_predictor.predict(TEXTS[:3])]
        assert not browser.find_elements(By.CSS_SELECTOR, ".result .task")  # only a multi-task result names its task
        bars = browser.find_elements(By.CSS_SELECTOR, ".result:first-child .bar")
        assert sorted(bar.get_attribute("data-label") for bar in bars) == sorted(text_predictor.label_names)

        # The token-guarded image server: the page shows the token field; the upload goes as multipart.
        image_predictor = load(runs["image"])
        (tmp_path / "green.png").write_bytes(png_bytes((24, 24), (20, 220, 40)))
        browser.get(image_server.url + "/")
        token = wait.until(seen.visibility_of_element_located((By.ID, "token")))
        browser.find_element(By.ID, "submit").click()  # no token yet: the server's 401 shows
        wait.until(lambda b: "bearer token" in b.find_element(By.ID, "error").text)
        token.send_keys(TOKEN)
        browser.find_element(By.ID, "submit").click()
        files = wait.until(seen.visibility_of_element_located((By.ID, "files")))
        files.send_keys(str(tmp_path / "green.png"))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .top-label"))
        label = browser.find_element(By.CSS_SELECTOR, ".result .top-label").text
        assert label == image_predictor.predict([tmp_path / "green.png"])[0]["label"]
        assert not browser.find_element(By.ID, "task-box").is_displayed()


# The micro-batcher on its own: a fake model that records each call's inputs.

def run_concurrently(worker, requests: list[list], delays_s: list[float] | None = None):
    """Send `requests` to `worker` at once (or each after its delay); each one's rows, or the error it got."""
    async def main():
        async def one(inputs, i):
            await asyncio.sleep(delays_s[i] if delays_s else 0)
            try:
                return await worker(inputs)
            except ValueError as err:
                return err
        try:
            return await asyncio.gather(*(one(inputs, i) for i, inputs in enumerate(requests)))
        finally:
            await worker.close()
    return asyncio.run(main())


def recording_model(calls: list, seconds: float = 0.0):
    def forward(inputs):
        calls.append(list(inputs))
        time.sleep(seconds)
        if "bad" in inputs:
            raise ValueError("bad input")
        return [[x * 10] for x in inputs if x != "bad"]
    return forward


def test_micro_batcher_joins_concurrent_requests_and_splits_answers():
    calls = []
    results = run_concurrently(MicroBatcher(recording_model(calls), max_batch=64, wait_s=0.05), [[1], [2, 3], [4]])
    assert results == [[[10]], [[20], [30]], [[40]]]
    assert calls == [[1, 2, 3, 4]]  # one forward pass for the three requests


def test_micro_batcher_without_a_wait_joins_what_queued_while_the_model_ran():
    calls = []
    results = run_concurrently(MicroBatcher(recording_model(calls, seconds=0.3), max_batch=64, wait_s=0),
                               [[1], [2], [3], [4]], delays_s=[0, 0.1, 0.1, 0.1])
    assert results == [[[10]], [[20]], [[30]], [[40]]]
    assert calls == [[1], [2, 3, 4]]


def test_micro_batcher_never_splits_a_request_nor_passes_max_batch():
    calls = []
    results = run_concurrently(MicroBatcher(recording_model(calls), max_batch=4, wait_s=0.05),
                               [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]])
    assert results == [[[10], [20]], [[30], [40], [50]], [[60]], [[70], [80], [90], [100]]]
    assert all(len(call) <= 4 for call in calls) and sorted(x for call in calls for x in call) == list(range(1, 11))
    assert [1, 2] in calls or [1, 2, 6] in calls  # [3, 4, 5] did not fit beside [1, 2]


def test_micro_batcher_gives_a_failing_input_its_own_error():
    calls = []
    results = run_concurrently(MicroBatcher(recording_model(calls), max_batch=64, wait_s=0.05), [[1], ["bad"], [3]])
    assert results[0] == [[10]] and results[2] == [[30]]
    assert isinstance(results[1], ValueError)
    assert calls[0] == [1, "bad", 3]  # joined, failed, then each alone


def test_model_worker_without_batching_runs_each_request_alone():
    calls = []
    results = run_concurrently(ModelWorker(recording_model(calls)), [[1], [2, 3]])
    assert results == [[[10]], [[20], [30]]] and sorted(calls) == [[1], [2, 3]]
