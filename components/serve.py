"""Serve a registered model over REST with MLflow's scoring server: /ping, /health, /version, /invocations.

    python -m components.serve --model models:/rental-price@prod --port 8080

The alias is resolved to a concrete version at start; every answer carries it in `X-Model-Version` (and
`X-Model-Uri`). The HTTP server answers at once and loads the model in the background: until it is loaded every
route answers 503 with a message, so Kubernetes probes and callers can tell "loading" from "broken".
Around MLflow's app this adds only what a public endpoint needs: a body-size limit (413) and error bodies with a
message but no stack trace.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import threading

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger("serve")


def resolve(model_uri: str) -> tuple[str, str]:
    """models:/name@alias -> (models:/name/<version>, version); other URIs are served as given."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    if match:
        from components import tracking
        from components.errors import StepError

        try:
            tracking.require_server("serve")
        except StepError as exc:
            raise SystemExit(str(exc))
        name, alias = match.groups()
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except mlflow.exceptions.MlflowException as exc:
            raise SystemExit(f"serve: model {name!r} has no version with alias {alias!r} at "
                             f"{mlflow.get_tracking_uri()}: run the pipeline first ({exc.message[:200]})")
        return f"models:/{name}/{version}", version
    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    return model_uri, match.group(2) if match else ""


class ServingApp:
    """ASGI app: 503 while the model loads, then MLflow's scoring app behind a size limit and clean errors."""

    def __init__(self, model_uri: str, version: str, max_body_bytes: int, concurrency: int = 1):
        self.model_uri, self.version, self.max_body_bytes = model_uri, version, max_body_bytes
        # Predictions hold the GIL; running several at once in threads only makes each slower.
        self.predicting = asyncio.Semaphore(concurrency)
        self.app = None
        self.problem = f"model {model_uri} is loading"
        self.headers = [(b"x-model-version", version.encode()), (b"x-model-uri", model_uri.encode())]

    def load(self) -> None:
        from mlflow.pyfunc import scoring_server

        try:
            self.app = scoring_server.init(mlflow.pyfunc.load_model(self.model_uri))
            log.info("serving %s (version %s)", self.model_uri, self.version)
        except Exception as exc:  # keep answering, and say why, rather than die silently
            self.problem = f"model {self.model_uri} failed to load: {exc}"
            log.exception("model failed to load")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    threading.Thread(target=self.load, daemon=True).start()
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.app is None:
            return await self.reply(send, 503, "MODEL_NOT_READY", self.problem)
        if scope["type"] == "http" and scope["method"] == "POST":
            body = await self.read_body(receive)
            if body is None:
                return await self.reply(send, 413, "REQUEST_TOO_LARGE",
                                        f"request body over {self.max_body_bytes} bytes: send smaller batches")
            async with self.predicting:
                return await self.app(scope, self.replay(body), self.cleaning(send))
        await self.app(scope, receive, self.cleaning(send))

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

    @staticmethod
    def replay(body: bytes):
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return receive

    def cleaning(self, send):
        """Add the version headers; give error answers a short message and no stack trace."""
        error = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    message["headers"] = list(message.get("headers", [])) + self.headers
                    return await send(message)
                error.update(status=message["status"], body=b"")
                return None
            if not error:
                return await send(message)
            error["body"] += message.get("body", b"")
            if not message.get("more_body"):
                await self.reply(send, error["status"], *error_of(error["body"]))

        return wrapped

    async def reply(self, send, status: int, error_code: str, message: str) -> None:
        body = json.dumps({"error_code": error_code, "message": message}).encode()
        headers = self.headers + [(b"content-type", b"application/json"),
                                                     (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error_of(body: bytes) -> tuple[str, str]:
    """The error code and a short message from an MLflow error answer, without the echoed data or stack trace."""
    try:
        payload = json.loads(body)
        code, text = payload.get("error_code", "BAD_REQUEST"), str(payload.get("message", ""))
    except (ValueError, AttributeError):
        code, text = "BAD_REQUEST", body.decode(errors="replace")
    # MLflow repeats the whole input (and the schema) in its messages; the error after them is what matters.
    text = re.sub(r"^Failed to predict data .*?\nError: ", "", text, flags=re.S)
    text = re.sub(r"^Failed to enforce schema of data .*? with schema .*?\. Error: ",
                  "input does not match the model signature: ", text, flags=re.S)
    text = re.sub(r"\nInput: .*", "", text, flags=re.S)
    return code, text.strip()[:1000]


def build_app() -> ServingApp:
    """App factory for uvicorn (one per worker), configured by the environment that main() sets."""
    return ServingApp(os.environ["SERVE_MODEL_URI"], os.environ.get("SERVE_MODEL_VERSION", ""),
                      int(os.environ.get("SERVE_MAX_BODY_BYTES", 5_000_000)),
                      int(os.environ.get("SERVE_CONCURRENCY", 1)))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_URI", "models:/rental-price@prod"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SERVE_WORKERS", 1)))
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("SERVE_CONCURRENCY", 1)),
                        help="predictions at once per worker (1: measured best, make bench-serve)")
    parser.add_argument("--max-body-mb", type=float, default=5.0,
                        help="larger requests get 413 (5 MB is about 15,000 listings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uri, version = resolve(args.model)
    log.info("%s resolves to %s", args.model, uri)
    os.environ.update(SERVE_MODEL_URI=uri, SERVE_MODEL_VERSION=version, SERVE_CONCURRENCY=str(args.concurrency),
                      SERVE_MAX_BODY_BYTES=str(int(args.max_body_mb * 1e6)))
    uvicorn.run("components.serve:build_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="info")


if __name__ == "__main__":
    main()
