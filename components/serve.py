"""Serve a registered model over REST: GET /ping, /health, /version, /openapi.json; POST /invocations (MLflow's JSON
protocol). The API is described at /openapi.json (components/serve_api.py).

    python -m components.serve --model models:/rental-price@prod --port 8080 [--version 3]

Which version: `--version` (in the cluster, the Deployment's annotation rental-price/model-version, which the
pipeline patches when prod moves), else the alias as it is at start. Every answer names it (`X-Model-Version`).

The server answers at once and gets the model in the background: from its cache folder when it is there (so a
restart needs no MLflow), else from MLflow, retrying while MLflow does not answer. Until the model is loaded every
route answers 503 saying why. Requests are checked against what the model was trained on (model.check_inputs): a
row that is broken or unfamiliar gets a 400 naming the row and field; with `?flag=true` unfamiliar rows are priced
and listed under "flags". Beside the prices ("predictions", as MLflow's protocol has them) come their ranges
("price_ranges": low and high, holding the price of "coverage" of listings). At most `--max-queue` requests are
admitted at once, counted once their body is read; the rest get 429 with Retry-After at once, and a request whose
client has gone is not computed. A client gets `--read-seconds` to send its headers and body (else 408, or the
connection is closed), so slow clients hold no slot; /ping (readiness) answers 503 while every slot is taken.

With `--inference-log FOLDER` (or s3://bucket/prefix/) every priced row is logged off the request path for the
monitoring pipeline to read (components/inference_log.py): it holds the requests' data. Off unless asked.
"""

import argparse
import asyncio
import codecs
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

from uvicorn.protocols.http.h11_impl import H11Protocol

from components import names, serve_api
from components.names import parse_model_uri

log = logging.getLogger("serve")

ERROR_CODES = {400: "BAD_REQUEST", 404: "ENDPOINT_NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT",
               413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 429: "TOO_MANY_REQUESTS", 500: "INTERNAL_ERROR",
               503: "MODEL_NOT_READY"}
ROUTES = serve_api.ROUTES
READ_SECONDS = 10.0  # for a request's headers, and again for its body: 5 MB in 10 s is 4 Mbit/s
MAX_PROBLEMS_SHOWN = 100
STAMP = ".model-version"  # in a cached model: the run and creation time of the version it holds


class Unready(Exception):
    """The model cannot be served (yet): the message says why; `final` when retrying cannot help."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


def fetch_model(uri: str, version: str, cache: Path) -> str:
    """The local folder of the model to serve: the cached copy of models:/name/<version>, else downloaded into
    the cache (whole, or not at all). Raises Unready while MLflow does not answer or has no such model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components import tracking

    name, alias, pinned = parse_model_uri(uri)
    version = version or pinned
    if not name:
        return uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri)
    server = mlflow.get_tracking_uri()
    # One folder per server; in it, each version with the stamp of the version it holds, so that a server reset
    # since (a new version 1) is never served from an old copy.
    models = cache / hashlib.sha256(server.encode()).hexdigest()[:12] / name
    up = tracking.answers(server)
    if version and (models / version / STAMP).is_file() and not up:
        return str(models / version)
    if not up:
        what = f"version {version} of {name!r}" if version else f"{name!r}@{alias}"
        raise Unready(f"{what} is not in the cache ({cache}) and the MLflow server at {server} does not answer: "
                      "retrying until it does")
    try:
        client = mlflow.tracking.MlflowClient()
        found = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
        version, stamp = found.version, f"{found.run_id} {found.creation_timestamp}"
        target = models / version
        if (target / STAMP).is_file() and (target / STAMP).read_text() == stamp:
            return str(target)
        models.mkdir(parents=True, exist_ok=True)
        if target.exists():  # another server's version of that number: set aside, then removed
            shutil.rmtree(target.rename(models / f".old-{uuid.uuid4().hex}"), ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=models, ignore_cleanup_errors=True) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=names.model_uri(name, version=version), dst_path=tmp)
            Path(tmp, STAMP).write_text(stamp)
            try:
                Path(tmp).rename(target)  # atomic: another worker's copy or ours, never half of one
            except OSError:
                if not target.is_dir():
                    raise
    except MlflowException as exc:
        if tracking.answers(server):
            raise Unready(f"cannot serve {uri}{f' version {version}' if version else ''}: {exc.message[:300]}",
                          final=exc.error_code in tracking.NOT_FOUND)
        raise Unready(f"the MLflow server at {server} stopped answering while the model was fetched: retrying")
    return str(target)


def fast_path_of(model, path: str):
    """The model compiled to plain arrays (components/fast_path.py), used only if it gives the model's own prices and
    ranges on probe rows: its input example and edge cases made of it. Else None: the model itself scores."""
    import mlflow

    from components import fast_path
    from components.model import check_inputs

    try:
        example, _ = check_inputs(mlflow.models.Model.load(path).load_input_example(path), None)
    except Exception as exc:  # a model saved without an input example: nothing to verify against
        log.warning("no fast path: the model's input example cannot be read (%s)", str(exc)[:200])
        return None
    fast, said = fast_path.checked(model, example)
    log.info("%s", said)
    return fast


class ServingApp:
    """The ASGI app: 503 until the model is loaded, then predictions behind a bounded queue."""

    def __init__(self, model_uri: str, version: str = "", cache: str = "", max_body_bytes: int = 5_000_000,
                 max_queue: int = 8, retry_seconds: float = 10.0, inference_log: str = "",
                 inference_log_keep_mb: float = 1000.0, read_seconds: float = READ_SECONDS):
        self.model_uri, self.version, self.read_seconds = model_uri, version, read_seconds
        self.max_body_bytes, self.max_queue = max_body_bytes, max_queue
        # Bodies being read are bounded apart from admitted work: slow senders wait for their own deadline, never
        # take a computing slot, and cannot hold more memory than this many bodies.
        self.max_reading, self.reading = 8 * max_queue, 0
        self.log_location, self.inference_log = inference_log, None
        self.log_keep_bytes = int(inference_log_keep_mb * 1e6)
        self.cache = Path(cache or Path(tempfile.gettempdir(), f"{names.PREFIX}-models"))
        self.retry_seconds = retry_seconds
        self.model = self.profile = self.fast = None
        self.problem = f"model {model_uri} is loading"
        self.admitted = 0  # requests between admission and answer
        # One prediction at a time: predictions hold the GIL, so threads would only make each one slower.
        self.predicting = threading.Lock()
        self.headers = [(b"x-model-uri", model_uri.encode())]

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        """Fetch and load the model, retrying while MLflow does not answer; on a final refusal, keep saying why."""
        from components import saved_model
        from components.errors import StepError

        self.cache.mkdir(parents=True, exist_ok=True)
        attempt, delay = 0, 1.0
        while True:
            attempt += 1
            try:
                path = fetch_model(self.model_uri, self.version, self.cache)
                model, self.profile = saved_model.read_model(path, "serve")
                self.fast = fast_path_of(model, path)
                self.model = model  # last: a loaded model means ready
                break
            except Unready as exc:
                if exc.final:
                    self.problem = str(exc)
                    log.error("%s", exc)
                    return
                self.problem = f"{exc} (attempt {attempt}, next in {delay:.0f} s)"
                log.warning("%s", self.problem)
            except StepError as exc:
                self.problem = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # a download cut short, a full disk: say so and try again
                self.problem = f"model {self.model_uri} failed to load ({type(exc).__name__}: {str(exc)[:300]})"
                log.exception("model failed to load")
            time.sleep(delay)
            delay = min(delay * 2, self.retry_seconds)
        name = parse_model_uri(self.model_uri)[0]
        self.version = version = self.version or parse_model_uri(self.model_uri)[2] or (Path(path).name if name else "")
        served = names.model_uri(name, version=version) if name else self.model_uri
        self.headers = [(b"x-model-version", version.encode()), (b"x-model-uri", served.encode())]
        if self.profile is None:
            log.warning("the model has no input profile (saved before profiles): only fields and types are checked")
        log.info("serving %s version %s from %s", self.model_uri, version, path)

    # ------------------------------------------------------------ requests

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    if self.log_location:
                        from components.inference_log import InferenceLog

                        self.inference_log = InferenceLog(self.log_location, keep_bytes=self.log_keep_bytes)
                        log.info("inference log: every priced row goes to %s", self.log_location)
                    threading.Thread(target=self.load, daemon=True).start()
                    await send({"type": "lifespan.startup.complete"})
            if self.inference_log is not None:
                await asyncio.to_thread(self.inference_log.close)  # the last part, written and closed
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            return await self.reply(send, 404, f"no route {path}: the routes are {sorted(ROUTES)}")
        if method == "HEAD" and ROUTES[path] == "GET":
            method, send = "GET", without_body(send)
        if method != ROUTES[path]:
            allowed = "GET, HEAD" if ROUTES[path] == "GET" else ROUTES[path]
            return await self.reply(send, 405, f"{path} takes {allowed}, not {method}", [(b"allow", allowed.encode())])
        if path == "/openapi.json":
            return await self.reply(send, 200, serve_api.document(self.profile))
        if self.model is None:
            return await self.reply(send, 503, self.problem, [(b"retry-after", b"5")])
        if path == "/version":
            return await self.reply(send, 200, {"model_uri": self.model_uri, "version": self.version,
                                                "served": dict(self.headers)[b"x-model-uri"].decode(),
                                                "fast_path": self.fast is not None})
        if path == "/ping" and self.admitted >= self.max_queue:  # readiness: route new work to another pod
            return await self.reply(send, 503, {"error_code": "SATURATED", "message": f"all {self.max_queue} slots "
                                                "are computing: take this pod out of rotation until one frees"},
                                    [(b"retry-after", b"1")])
        if path != "/invocations":
            return await self.reply(send, 200, {"status": "ready", "version": self.version})
        content_type, charset = media_type(scope)
        if content_type != "application/json":
            return await self.reply(send, 415, f"content type {content_type or '(none)'!r} is not served: send "
                                               "application/json")
        try:
            charset = codecs.lookup(charset).name
        except LookupError:
            return await self.reply(send, 415, f"charset {charset!r} is not known: send UTF-8 (or name a charset "
                                               "Python reads, such as latin-1 or utf-16)")
        if self.reading >= self.max_reading:
            return await self.reply(send, 429, f"{self.reading} requests are sending their body, the most this server "
                                               "reads at once: retry shortly", [(b"retry-after", b"1")])
        self.reading += 1
        try:
            body = await asyncio.wait_for(self.read_body(receive), self.read_seconds)
        except TimeoutError:
            return await self.reply(send, 408, f"the request body did not arrive within {self.read_seconds:g} s")
        finally:
            self.reading -= 1
        if body is None:
            return await self.reply(send, 413, f"request body over {self.max_body_bytes} bytes: send smaller batches")
        if self.admitted >= self.max_queue:
            return await self.reply(send, 429, f"{self.admitted} requests are queued, the most this server takes: "
                                               "retry shortly", [(b"retry-after", b"1")])
        self.admitted += 1
        gone = asyncio.ensure_future(receive())  # resolves with http.disconnect if the client leaves
        try:
            flag = parse_qs(scope.get("query_string", b"").decode()).get("flag", ["false"])[0].lower() == "true"
            status, answer = await asyncio.to_thread(self.answer, body, flag, gone, charset)
            if status:
                await self.reply(send, status, answer)
        finally:
            self.admitted -= 1
            gone.cancel()

    def answer(self, body: bytes, flag: bool, gone, charset: str = "utf-8") -> tuple[int, object]:
        """(status, payload) for one /invocations body; (0, None) when its client left before its turn."""
        from components import model
        from components.listings import SCHEMA

        try:
            rows = parse_rows(body, charset)
        except ValueError as exc:
            return 400, str(exc)
        columns, problems = model.typed_inputs(rows, self.profile)
        features = (self.profile or {}).get("features", model.FEATURES)
        unknown = [c for c in rows if c not in features and c not in SCHEMA]  # a listing's own are known
        refused = model.refused(problems, flag)
        if refused:
            return 400, {"message": describe(refused, flag), "problems": [p.as_dict() for p in refused[:MAX_PROBLEMS_SHOWN]]}
        with self.predicting:
            if gone.done():
                log.info("client left before its turn: %d rows not priced", row_count(rows))
                return 0, None
            prices, low, high, coverage = self.price(columns)
        if self.inference_log is not None:
            self.inference_log.record(rows, columns, prices, self.version)
        flags = [p.as_dict() for p in problems]
        ranges = {} if low is None else {"price_ranges": [{"low": a, "high": b} for a, b in zip(low, high)],
                                         "coverage": coverage}
        warnings = [f"unknown fields, ignored: {', '.join(map(repr, unknown[:20]))}"
                    f"{f' and {len(unknown) - 20} more' if len(unknown) > 20 else ''}"] if unknown else []
        return 200, {"predictions": prices, **ranges, **({"flags": flags} if flags else {}),
                     **({"warnings": warnings} if warnings else {})}

    def price(self, columns: dict) -> tuple[list, list | None, list | None, float | None]:
        """Prices, their ranges' ends and the ranges' coverage, for the checked columns: by the fast path when the
        model has one, else by the model itself (no ranges from a model saved before them)."""
        import pandas as pd

        from components import model

        if self.fast is not None:
            price, low, high = self.fast.price_ranges(columns)
            return price.tolist(), low.tolist(), high.tolist(), self.fast.coverage
        typed = pd.DataFrame(columns)
        found = model.price_ranges(self.model, typed)
        if found is None:
            return self.model.predict(typed).tolist(), None, None, None
        return found["price"].tolist(), found["low"].tolist(), found["high"].tolist(), found.attrs["coverage"]

    async def read_body(self, receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def reply(self, send, status: int, payload, extra: list | None = None) -> None:
        """A JSON answer; an error carries the code of its status and a message (a str, or a dict with one)."""
        if status >= 400:  # a dict payload may name its own error_code
            payload = {"error_code": ERROR_CODES[status], **(payload if isinstance(payload, dict) else
                                                              {"message": payload})}
        body = json.dumps(payload).encode()
        headers = self.headers + (extra or []) + [(b"content-type", b"application/json"),
                                                  (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def without_body(send):
    """`send` for a HEAD request: the GET answer's headers (its content-length too), no body."""
    async def send_head(message):
        await send({**message, "body": b""} if message["type"] == "http.response.body" else message)
    return send_head


def media_type(scope) -> tuple[str, str]:
    """The request's media type and charset (UTF-8 unless it names one), both lower case."""
    value = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    media, *params = [part.strip() for part in value.split(";")]
    named = dict(p.split("=", 1) for p in params if "=" in p)
    return media.lower(), named.get("charset", "utf-8").strip('"').lower()


def refuse_constant(name: str):
    raise ValueError(f"{name} is not standard JSON: send null for a missing value")


def parse_rows(body: bytes, charset: str = "utf-8") -> dict[str, list]:
    """The rows of an MLflow scoring request ({"dataframe_split": {"columns", "data"[, "index"]}} or
    {"dataframe_records": [{...}, ...]}), as their columns: name -> the values as sent (a field a record lacks is
    None). No frame is made: for a one-row request that cost more than the model. A ValueError says what is wrong
    with the request's shape."""
    try:
        text = body.decode(charset)
    except UnicodeDecodeError as exc:
        raise ValueError(f"the body is not valid {charset} ({exc}): name its charset in Content-Type") from None
    try:
        payload = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"the body is not valid JSON ({exc})") from None
    formats = ("dataframe_split", "dataframe_records")
    if not isinstance(payload, dict) or len([f for f in formats if f in payload]) != 1:
        raise ValueError(f"the body must be a JSON object with exactly one of {list(formats)}")
    if "dataframe_records" in payload:
        records = payload["dataframe_records"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("dataframe_records must be a list of objects, one per row")
        names = dict.fromkeys(name for record in records for name in record)
        rows = {name: [record.get(name) for record in records] for name in names}
    else:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
                or not isinstance(split.get("data"), list):
            raise ValueError("dataframe_split must be an object with lists 'columns' and 'data'")
        columns, data = split["columns"], split["data"]
        if not all(isinstance(c, str) for c in columns) or len(set(columns)) != len(columns):
            raise ValueError("dataframe_split.columns must be distinct names")
        for i, row in enumerate(data):
            if not isinstance(row, list) or len(row) != len(columns):
                raise ValueError(f"dataframe_split.data row {i} must be a list of {len(columns)} values, one per column")
        if "index" in split and (not isinstance(split["index"], list) or len(split["index"]) != len(data)):
            raise ValueError(f"dataframe_split.index must have one label per data row ({len(data)})")
        rows = {name: [row[i] for row in data] for i, name in enumerate(columns)}
    if not row_count(rows):
        raise ValueError("the request has no rows")
    return rows


def row_count(rows: dict[str, list]) -> int:
    """The rows of parse_rows' columns (every column has one value per row)."""
    return len(next(iter(rows.values()), ()))


def describe(problems, flag: bool) -> str:
    rows = sorted({p.row for p in problems})
    shown = "; ".join(f"row {p.row}, field {p.field}: {p.problem}" if p.row >= 0 else f"field {p.field}: {p.problem}"
                      for p in problems[:5])
    more = f" (and {len(problems) - 5} more problems)" if len(problems) > 5 else ""
    hint = "" if flag or all(p.broken for p in problems) else \
        " Rows outside what the model was trained on can be priced and flagged instead: POST /invocations?flag=true."
    return f"{len(rows)} row(s) cannot be priced: {shown}{more}.{hint}"


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers (SERVE_READ_SECONDS): a connection
    that opens, or starts its next request, and does not finish the headers in time is closed. uvicorn has none: a
    client sending a header a minute would hold its connection for good."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # asyncio sets TCP_NODELAY only on sockets it made; with --workers uvicorn makes the listening socket (proto
        # 0), and each answer's body then waited for the client's delayed ACK of its headers: 40 ms.
        connection = transport.get_extra_info("socket")
        if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stopping = False
        self.arm_deadline()

    def arm_deadline(self) -> None:
        self.awaiting_headers = self.loop.call_later(float(os.environ.get("SERVE_READ_SECONDS", READ_SECONDS)),
                                                     self.headers_late, self.cycle)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self.awaiting_headers.cancel()  # a request's headers are in: its body has the app's deadline
            if self.stopping:
                self.cycle.keep_alive = False  # answered, then closed: the server is stopping

    def shutdown(self) -> None:
        """When the server stops, uvicorn closes at once every connection with no request in progress. One accepted a
        moment before, whose first request was still on its way, lost that request: its client saw the connection
        closed with no answer (found by the soak, SIGTERM under load). Such a connection is answered first, then
        closed; the header deadline bounds the wait for one that sends nothing. An idle keep-alive connection is
        closed at once, as uvicorn does."""
        if self.cycle is None and not self.transport.is_closing():
            self.stopping = True
        else:
            super().shutdown()

    def on_response_complete(self) -> None:
        self.arm_deadline()  # before uvicorn handles a pipelined request, which cancels it
        super().on_response_complete()

    def headers_late(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.awaiting_headers.cancel()
        super().connection_lost(exc)


def build_app() -> ServingApp:
    """App factory for uvicorn (one per worker), configured by the environment that main() sets."""
    env = os.environ
    return ServingApp(env["SERVE_MODEL_URI"], env.get("SERVE_MODEL_VERSION", ""), env.get("SERVE_MODEL_CACHE", ""),
                      int(env.get("SERVE_MAX_BODY_BYTES", 5_000_000)), int(env.get("SERVE_MAX_QUEUE", 8)),
                      inference_log=env.get("SERVE_INFERENCE_LOG", ""),
                      inference_log_keep_mb=float(env.get("SERVE_INFERENCE_LOG_KEEP_MB", 1000)),
                      read_seconds=float(env.get("SERVE_READ_SECONDS", READ_SECONDS)))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_URI", names.PROD_MODEL_URI))
    parser.add_argument("--version", default=os.environ.get("MODEL_VERSION", ""),
                        help="serve this version of the model (not what the alias names); 'none' or empty: the alias")
    parser.add_argument("--cache", default=os.environ.get("SERVE_MODEL_CACHE", ""),
                        help="folder of fetched models (default: rental-price-models in the temp folder)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SERVE_WORKERS", 1)))
    parser.add_argument("--max-queue", type=int, default=int(os.environ.get("SERVE_MAX_QUEUE", 8)),
                        help="requests admitted at once per worker; more get 429 (make bench-serve)")
    parser.add_argument("--max-body-mb", type=float, default=5.0,
                        help="larger requests get 413 (5 MB is about 15,000 listings)")
    parser.add_argument("--read-seconds", type=float,
                        default=float(os.environ.get("SERVE_READ_SECONDS", READ_SECONDS)),
                        help="a client's time to send a request's headers, and again its body; later: closed, or 408")
    parser.add_argument("--inference-log", default=os.environ.get("SERVE_INFERENCE_LOG", ""),
                        help="log every priced row (it holds request data) to this folder or s3://bucket/prefix/ "
                             "for monitoring; empty: off. Parts kept locally past SERVE_INFERENCE_LOG_KEEP_MB "
                             "(1000) are removed, oldest first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    version = "" if args.version in ("", "none") else args.version
    if version and not version.isdigit():
        raise SystemExit(f"serve: --version: {version!r} is not a version number")
    if args.inference_log.startswith("s3://") and not args.inference_log.endswith("/"):
        raise SystemExit(f"serve: --inference-log: {args.inference_log!r}: an s3:// log is a prefix ending in /")
    name, alias, _ = parse_model_uri(args.model)
    if alias and not version:
        refuse_missing_alias(name, alias)
    os.environ.update(SERVE_MODEL_URI=args.model, SERVE_MODEL_VERSION=version, SERVE_MODEL_CACHE=args.cache,
                      SERVE_MAX_QUEUE=str(args.max_queue), SERVE_MAX_BODY_BYTES=str(int(args.max_body_mb * 1e6)),
                      SERVE_INFERENCE_LOG=args.inference_log, SERVE_READ_SECONDS=str(args.read_seconds))
    uvicorn.run("components.serve:build_app", factory=True, host=args.host, port=args.port, http=HeaderDeadline,
                workers=args.workers, log_level="info")


def refuse_missing_alias(name: str, alias: str) -> None:
    """Exit at once when MLflow answers and has no such alias; when MLflow is down, the server waits for it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components import tracking

    if not tracking.answers(mlflow.get_tracking_uri()):
        return
    try:
        mlflow.tracking.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in tracking.NOT_FOUND:
            return  # refused (a wrong password), or failing: the server answers 503 saying so
        raise SystemExit(f"serve: model {name!r} has no version with alias {alias!r} at {mlflow.get_tracking_uri()}: "
                         f"run the pipeline first ({exc.message[:200]})")


if __name__ == "__main__":
    main()
