"""Serve a run over HTTP with FastAPI and uvicorn: the model is loaded once, at start-up.

    peftlab serve outputs/minilm_lora_rotten_tomatoes                  # http://127.0.0.1:8000
    PEFTLAB_SERVE_TOKEN=s3cret peftlab serve RUN --host 0.0.0.0 --port 8080
    python -m peftlab.serve RUN --help                                 # every limit, with its default

Endpoints:
    POST /predict   {"inputs": ["a text", ...]} for a text run; {"images": ["<base64>", ...]} or multipart files
                    named `images` for an image run -> {"predictions": [{"label": ..., "probabilities": {...}}, ...]}
                    A multi-task run: {"inputs": [...], "task": "<name>"} (or "images"), or "tasks": ["<name>", ...]
                    with one task per input (routed in one forward pass, also across requests batched together);
                    multipart uploads add a field `task`, or one `tasks` field per image; each prediction also names
                    its "task".
    GET  /metadata  task, label names (a multi-task run: `tasks`, each task's label names), base model, strategy,
                    test metrics, limits
    GET  /health    {"status": "ok"}; the only endpoint that never needs the token
    GET  /          a page to try the model in a browser (self-contained: works offline; holds no model data)

RUN is a run's output folder or an ONNX export of one (`peftlab export`; `load_model` tells them apart). Client
errors are JSON {"error": "<one line>"}: 400 malformed or wrong input, 401 missing or wrong token, 413 over a limit
(body, items, image bytes or pixels, text length), 415 neither JSON nor multipart; none stops the server.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) as objects.
import argparse
import base64
import binascii
import contextlib
import dataclasses
import io
import ipaddress
import json
import os
import secrets
import socket
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from peftlab.cli import field_docs
from peftlab.errors import PeftlabError

TOKEN_ENV = "PEFTLAB_SERVE_TOKEN"
MiB = 1024 * 1024


@dataclass
class ServeLimits:
    """What one request may hold, and how requests share forward passes (each field is a command-line flag)."""

    max_items: int = 64
    """Most inputs (texts or images) in one request."""
    max_body_mb: float = 16.0
    """Largest request body in MiB; a larger Content-Length is refused before the body is read, and a body without
    one is cut off when it passes the limit."""
    max_image_mb: float = 8.0
    """Largest single image file in MiB (before base64)."""
    max_pixels: int = 33_554_432
    """Most pixels (width x height, from the headers, before decoding) of all images in one request together: at 3
    bytes a pixel, 96 MiB decoded. One 12-megapixel photo fits twice."""
    max_text_chars: int = 10_000
    """Longest text in characters (the model reads only its first data.max_length tokens)."""
    max_connections: int = 32
    """Most connections served at once; more are answered 503 (bounds the memory of bodies being read)."""
    batching: bool = True
    """Label the inputs of all requests waiting for the model in one forward pass (--no-batching: one per request)."""
    batch_wait_ms: float = 0.0
    """With batching, how long a batch waits after its first request for more to join (0: only those waiting)."""
    max_batch: int = 64
    """Most inputs in one forward pass when requests are batched together."""


class ClientError(Exception):
    """A request the server cannot answer: its HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# An ONNX export folder's description file (peftlab.exported.EXPORT_FILE, on the export branch).
EXPORT_FILE = "export.json"


@dataclass
class ServedModel:
    """What the server serves: a loaded model and its description for GET /metadata."""

    model: Any
    """.task ("text" | "image"), .label_names and .probabilities(inputs) -> (N, C): peftlab.load's LoadedRun or
    peftlab.exported's OnnxRun."""
    metadata: dict[str, Any]
    """task, label_names, base_model, strategy, strategy_options, format ("pytorch" | "onnx"), test_metrics."""


def load_model(folder: str | Path, threads: int | None = None) -> ServedModel:
    """The model in `folder`, ready to label: a run's output folder (PyTorch, `peftlab.load`) or an ONNX export of one
    (`peftlab export`, loaded with onnxruntime). The one place that tells the two apart.

    Args:
        threads: onnxruntime's intra-op threads for an export (None: its default); torch's are the caller's to set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftlabError(f"{folder} is not a folder; pass a run's output_dir or an ONNX export folder")
    if (folder / EXPORT_FILE).is_file():
        from peftlab.exported import load_onnx

        model = load_onnx(folder, threads=threads)
        run = model.metadata.get("run", {})  # export.json's record of the run it came from
        return ServedModel(model, {
            "task": model.task, "label_names": list(model.label_names), "base_model": run.get("base"),
            "strategy": run.get("strategy"), "strategy_options": run.get("strategy_options"), "format": "onnx",
            "test_metrics": run.get("test_metrics")})
    from peftlab.backbones import portable_name
    from peftlab.loading import MultiTaskRun, load
    from peftlab.runs import METRICS_FILE

    model = load(folder)
    cfg, test_metrics = model.cfg, None
    metrics_path = folder / METRICS_FILE
    if metrics_path.is_file():
        try:
            test_metrics = json.loads(metrics_path.read_text(encoding="utf-8")).get("test")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            print(f"warning: {metrics_path} is damaged; /metadata shows no test metrics", file=sys.stderr)
    tasks = {"tasks": model.task_labels, "label_names": []} if isinstance(model, MultiTaskRun) else \
        {"label_names": list(model.label_names)}
    return ServedModel(model, {
        "task": model.task, **tasks, "base_model": portable_name(cfg.model.name),
        "strategy": cfg.strategy, "strategy_options": cfg.strategy_options.get(cfg.strategy, {}),
        "format": "pytorch", "test_metrics": test_metrics})


# ---------------------------------------------------------------------------------------------------------------------
# Reading a request's inputs
# ---------------------------------------------------------------------------------------------------------------------

JSON_SHAPES = {"text": '{"inputs": ["a text", ...]}',
               "image": '{"images": ["<base64>", ...]} or multipart files named "images"'}


MULTITASK_SHAPES = {
    "text": '{"inputs": ["a text", ...], "task": "<task>"} or {"inputs": [...], "tasks": ["<task>", ...]}',
    "image": '{"images": ["<base64>", ...], "task": "<task>"} (or "tasks": ["<task>", ...], one per image), or '
             'multipart files named "images" with a field "task" (or one "tasks" field per image)'}


def read_tasks(payload: dict, count: int, task_names: list[str], kind: str = "text") -> list[str]:
    """The task of each of a multi-task request's `count` inputs, from its `task` or `tasks` (a JSON body's keys, or
    a multipart body's text fields: "tasks" as a list); ClientError otherwise."""
    shape = MULTITASK_SHAPES[kind]

    def known(name, where: str) -> str:
        if not isinstance(name, str) or name not in task_names:
            raise ClientError(400, f"{where} is {json.dumps(name)}, not a task of this server ({', '.join(task_names)})")
        return name

    if ("task" in payload) == ("tasks" in payload):
        raise ClientError(400, f"name the task of the inputs with \"task\", or one per input with \"tasks\" (not "
                               f"both); this server's tasks are {', '.join(task_names)}: send {shape}")
    if "task" in payload:
        return [known(payload["task"], "task")] * count
    tasks = payload["tasks"]
    if not isinstance(tasks, list) or len(tasks) != count:
        raise ClientError(400, f"'tasks' must be a list with one task per input ({count}); send {shape}")
    return [known(name, f"tasks[{i}]") for i, name in enumerate(tasks)]


async def read_inputs(request, task: str, limits: ServeLimits, task_names: list[str] | None = None) -> list:
    """The texts, or decoded PIL images, of a POST /predict request; ClientError for anything else.

    Args:
        task_names: a multi-task run's tasks: the request names its inputs' task(s) (`read_tasks`), and the result
            is (text or image, task) pairs.
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        if task != "image":
            raise ClientError(400, f"this server labels texts, not uploaded files; send {JSON_SHAPES['text']}")
        try:
            form = await request.form(max_files=limits.max_items, max_fields=limits.max_items)
        except HTTPException as err:
            if err.status_code == 413:
                raise
            status = 413 if "Too many" in str(err.detail) else 400
            raise ClientError(status, f"multipart body: {err.detail}") from err
        fields = ("images", "task", "tasks") if task_names else ("images",)
        uploads, named_tasks = [], {}
        for key, value in form.multi_items():
            if key not in fields:
                raise ClientError(400, f"unexpected multipart field {key!r}; send "
                                       f"{MULTITASK_SHAPES['image'] if task_names else JSON_SHAPES['image']}")
            if key != "images":
                if not isinstance(value, str):
                    raise ClientError(400, f"multipart field {key!r} holds a file; send the task's name as text")
                named_tasks.setdefault(key, []).append(value)
            elif isinstance(value, str):
                raise ClientError(400, "multipart field 'images' holds text, not a file; send image files")
            else:
                uploads.append(value)
        check_count(len(uploads), "image files", limits)
        tasks = None
        if task_names:  # checked before any image is read or decoded
            if len(named_tasks.get("task", [])) > 1:
                raise ClientError(400, "give one multipart field \"task\" for all images, or one \"tasks\" field "
                                       "per image")
            tasks = read_tasks({key: value[0] if key == "task" else value for key, value in named_tasks.items()},
                               len(uploads), task_names, "image")
        named = []
        for i, upload in enumerate(uploads):
            data = await upload.read(int(limits.max_image_mb * MiB) + 1)
            named.append((upload.filename or f"images[{i}]", check_image_bytes(data, upload.filename, limits)))
        images = await run_in_threadpool(decode_images, named, limits)
        return list(zip(images, tasks)) if tasks else images
    if content_type not in ("application/json", ""):
        raise ClientError(415, f"content type {content_type!r} is not accepted; send application/json "
                               f"({JSON_SHAPES[task]})")
    body = await request.body()
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClientError(400, f"the body is not valid JSON ({err}); send {JSON_SHAPES[task]}") from err
    except RecursionError as err:  # e.g. 100,000 nested lists: deeper than Python's parser goes
        raise ClientError(400, f"the body's JSON nests too deeply; send {JSON_SHAPES[task]}") from err
    if not isinstance(payload, dict):
        raise ClientError(400, f"the body must be a JSON object, not {json_type(payload)}; send {JSON_SHAPES[task]}")
    if unknown := sorted(set(payload) - {"inputs", "images", *(("task", "tasks") if task_names else ())}):
        raise ClientError(400, f"unknown key {unknown[0]!r}; send "
                               f"{MULTITASK_SHAPES[task] if task_names else JSON_SHAPES[task]}")
    key, other = ("inputs", "images") if task == "text" else ("images", "inputs")
    if other in payload:
        raise ClientError(400, f"this server labels {task}s, so {other!r} does not apply; send {JSON_SHAPES[task]}")
    if key not in payload:
        raise ClientError(400, f"no {key!r} in the body; send {JSON_SHAPES[task]}")
    items = payload[key]
    if not isinstance(items, list):
        raise ClientError(400, f"{key!r} must be a list, not {json_type(items)}; send {JSON_SHAPES[task]}")
    check_count(len(items), key, limits)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ClientError(400, f"{key}[{i}] is {json_type(item)}, not a string; send {JSON_SHAPES[task]}")
    if task == "text":
        for i, text in enumerate(items):
            if len(text) > limits.max_text_chars:
                raise ClientError(413, f"inputs[{i}] has {len(text):,} characters, over the limit of "
                                       f"{limits.max_text_chars:,}; shorten it or start the server with a larger "
                                       f"--max-text-chars")
            if not text.strip():
                raise ClientError(400, f"inputs[{i}] is empty; send the text to label")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # JSON's "\ud800" escape: no character, and the tokenizer refuses it
                raise ClientError(400, f"inputs[{i}] holds an unpaired surrogate ({err.reason} at {err.start}); "
                                       f"send valid Unicode text") from err
        return list(zip(items, read_tasks(payload, len(items), task_names))) if task_names else items
    tasks = read_tasks(payload, len(items), task_names, "image") if task_names else None  # before any decoding
    named = [(f"images[{i}]", check_image_bytes(decode_base64(item, i, limits), None, limits))
             for i, item in enumerate(items)]
    images = await run_in_threadpool(decode_images, named, limits)
    return list(zip(images, tasks)) if tasks else images


def json_type(value) -> str:
    """How an error names a JSON value's type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def check_count(count: int, what: str, limits: ServeLimits) -> None:
    if count == 0:
        raise ClientError(400, f"{what!r} is empty; send at least one input")
    if count > limits.max_items:
        raise ClientError(413, f"{count} {what} in one request, over the limit of {limits.max_items}; split them "
                               f"into several requests")


def decode_base64(text: str, index: int, limits: ServeLimits) -> bytes:
    """The bytes of a base64 image (a data: URL's prefix is dropped); sizes checked before decoding."""
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > limits.max_image_mb * MiB:
        raise ClientError(413, f"images[{index}] is over the limit of {limits.max_image_mb:g} MiB; send a "
                               f"smaller image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ClientError(400, f"images[{index}] is not base64 ({err}); send each image file's bytes as base64") \
            from err


def check_image_bytes(data: bytes, filename: str | None, limits: ServeLimits) -> bytes:
    if len(data) > limits.max_image_mb * MiB:
        raise ClientError(413, f"image {filename!r} is over the limit of {limits.max_image_mb:g} MiB; send a "
                               f"smaller image")
    return data


def decode_images(named: list[tuple[str, bytes]], limits: ServeLimits) -> list:
    """Decode every image; the request's images share the `max_pixels` budget, checked from each header first."""
    from PIL import UnidentifiedImageError

    from peftlab.data.image import ImageTooLarge, open_image_file
    from peftlab.data.splits import first_line

    images, budget = [], limits.max_pixels
    try:
        for name, data in named:
            try:
                image = open_image_file(io.BytesIO(data), name=name, max_pixels=budget)
            except ImageTooLarge as err:
                raise ClientError(413, f"{err} (the images of one request share {limits.max_pixels:,} pixels; "
                                       f"see --max-pixels)") from err
            except PeftlabError as err:  # PIL cannot decode it: say why, without PIL's name for the buffer
                cause = err.__cause__
                reason = "not an image format PIL reads" if isinstance(cause, UnidentifiedImageError) else \
                    first_line(cause or err)
                raise ClientError(400, f"{name!r} is not a readable image ({reason}); send PNG, JPEG, WebP or other "
                                       f"image files") from err
            images.append(image)
            budget -= image.width * image.height
    except ClientError:
        for image in images:
            image.close()
        raise
    return images


# ---------------------------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, from its Content-Length before reading, or once the bytes
    read pass the limit (a chunked body), so a client cannot make the server buffer more than that."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is over the limit of {self.max_bytes / MiB:g} MiB; send less per request"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (413, too_large) if length.isdigit() else (400, "the Content-Length is not a number")
            return await JSONResponse({"error": message}, status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)  # answered as JSON by the app's handler
            return message

        return await self.app(scope, limited_receive, send)


def build_app(served: ServedModel, limits: ServeLimits | None = None, token: str | None = None):
    """The FastAPI application serving `served` (from load_model); `token` guards all but /health."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from peftlab.microbatch import MicroBatcher, ModelWorker

    limits = limits or ServeLimits()
    model = served.model
    metadata = {**served.metadata, "limits": dataclasses.asdict(limits)}
    task_labels = served.metadata.get("tasks")  # a multi-task run: {task: its label names}
    labels = list(model.label_names) if task_labels is None else None

    def forward(inputs: list) -> list[list[float]]:
        if task_labels is None:
            return model.probabilities(inputs).tolist()  # a torch tensor or a numpy array: both have tolist()
        # (input, task) pairs, maybe of several requests: one forward, each input through its task's adapter and head.
        rows = model.probabilities([text for text, _ in inputs], tasks=[name for _, name in inputs]).tolist()
        return [row[:len(task_labels[name])] for row, (_, name) in zip(rows, inputs)]

    def prediction(row: list[float], item) -> dict[str, Any]:
        names = labels if task_labels is None else task_labels[item[1]]
        best = {"label": names[max(range(len(row)), key=row.__getitem__)], "probabilities": dict(zip(names, row))}
        return best if task_labels is None else {"task": item[1], **best}

    worker = (MicroBatcher(forward, max_batch=limits.max_batch, wait_s=limits.batch_wait_ms / 1000)
              if limits.batching else ModelWorker(forward))

    async def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise ClientError(401, "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(check_token)]
    # No /docs or /redoc: their pages load scripts from a CDN, and the API is three endpoints (this docstring).
    app = FastAPI(title="peftlab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(limits.max_body_mb * MiB))

    @app.exception_handler(ClientError)
    async def client_error(request, err: ClientError):
        return JSONResponse({"error": err.message}, err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = err.detail
        if err.status_code in (404, 405):
            message = (f"no endpoint {request.method} {request.url.path}; the endpoints are GET /, GET /health, "
                       f"GET /metadata, POST /predict")
        return JSONResponse({"error": message}, err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(PeftlabError)
    async def model_refused(request, err: PeftlabError):  # the model's own input checks (e.g. an image path as text)
        return JSONResponse({"error": " ".join(str(err).split())}, 400)

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):  # a bug, not the client's input: JSON too; uvicorn logs it
        return JSONResponse({"error": f"internal error ({type(err).__name__}); the server's log has the traceback"},
                            500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata", dependencies=guarded)
    async def get_metadata():
        return metadata

    @app.post("/predict", dependencies=guarded)
    async def predict(request: Request):
        inputs = await read_inputs(request, model.task, limits, list(task_labels) if task_labels else None)
        try:
            rows = await worker(inputs)
        finally:
            for item in inputs:
                image = item[0] if isinstance(item, tuple) else item  # a multi-task request's (image, task)
                if hasattr(image, "close"):
                    image.close()
        return {"predictions": [prediction(row, item) for row, item in zip(rows, inputs)]}

    page = resources.files("peftlab").joinpath("serve_page.html").read_text(encoding="utf-8")
    page = page.replace("__TOKEN_REQUIRED__", "true" if token else "false")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        # The page holds no model data (it asks /metadata with the token), so it needs no token itself; the policy
        # keeps it from loading anything but itself, even if a label name carried markup.
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'"})

    app.router.on_shutdown.append(worker.close)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (a name other than localhost counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ServeLimits]:
    parser = argparse.ArgumentParser(prog="peftlab serve", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a run's output_dir, or an ONNX export folder (peftlab export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves every network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=None,
                        help=f"bearer token every endpoint but /health requires; when not given, ${TOKEN_ENV} "
                             f"is read (which keeps the token out of the process list)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads of the model; None: OMP_NUM_THREADS, else every physical core "
                             "(on a machine shared with busy jobs, 1 can be much faster)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="print one line per request")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party notices")
    docs = field_docs(ServeLimits)
    for field in dataclasses.fields(ServeLimits):
        kind = {"action": argparse.BooleanOptionalAction} if field.type is bool else {"type": field.type}
        parser.add_argument("--" + field.name.replace("_", "-"), default=field.default, help=docs.get(field.name),
                            **kind)
    args = parser.parse_args(argv)
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    for name, value in dataclasses.asdict(limits).items():
        if not isinstance(value, bool) and (value < 0 or (value == 0 and name != "batch_wait_ms")):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    return args, limits


@dataclass
class RunningServer:
    """A server started by server_process: its base URL, process, and what it printed so far (`output()`)."""

    url: str
    process: Any
    log: Any

    def output(self) -> str:
        # pread, not seek + read: the server writes through the same file offset.
        return os.pread(self.log.fileno(), os.fstat(self.log.fileno()).st_size, 0).decode(errors="replace")


@contextlib.contextmanager
def server_process(run: str | Path, *args: str, env: dict[str, str] | None = None, start_timeout_s: float = 300):
    """`python -m peftlab.serve RUN --port <free> ARGS` started in a subprocess on 127.0.0.1, yielding a
    RunningServer once /health answers, stopped on exit (tests and benchmarks/serve_load.py use the real server so).

    Args:
        env: the server's environment (default: this process's).
    """
    import subprocess
    import time
    import urllib.request

    with socket.socket() as sock:  # a port free now; the server binds it a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "peftlab.serve", str(run), "--port", str(port), *args],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (exit code {process.poll()}):\n{server.output()}")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def main(argv: list[str] | None = None) -> None:
    from peftlab.console import quiet_third_party
    from peftlab.threads import set_cpu_threads

    args, limits = parse_args(argv)
    quiet_third_party(args.debug)  # also when started as `python -m peftlab.serve`, not through the peftlab command
    token = args.token or os.environ.get(TOKEN_ENV) or None

    threads = set_cpu_threads(args.threads)
    try:
        served = load_model(args.run, args.threads)
        app = build_app(served, limits, token)
    except PeftlabError as err:
        if args.debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    if not is_loopback(args.host) and token is None:
        print(f"warning: serving on {args.host} without a token: anyone who can reach port {args.port} can use the "
              f"model; set {TOKEN_ENV} (or --token)", file=sys.stderr)
    batching = (f"batching (waiting {limits.batch_wait_ms:g} ms)" if limits.batching and limits.batch_wait_ms else
                "batching" if limits.batching else "no batching")
    tasks = served.metadata.get("tasks")
    labels = ", ".join(served.model.label_names) if tasks is None else f"tasks {', '.join(tasks)}"
    print(f"serving {args.run} ({served.model.task}: {labels}; {batching}; "
          f"{served.metadata['format']}; {threads.threads} cpu "
          f"threads ({'--threads' if args.threads else threads.reason})"
          f"{'; token required' if token else ''}) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=args.access_log,
                limit_concurrency=limits.max_connections, log_level="info")


if __name__ == "__main__":
    main()
