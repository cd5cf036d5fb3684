"""Stand-in for the Kubeflow Pipelines API server (REST v2beta1), for the real kfp.Client to talk to.
Used because no cluster can run KFP here: state lives in memory and only the calls our code makes are served."""

import datetime
import email.parser
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import yaml

API = "/apis/v2beta1"
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 503: 14}  # what grpc-gateway puts in "code"
ALIASES = {"name": "display_name"}  # KFP accepts "name" for display_name in filters and sort_by


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class KfpStandIn:
    """`with KfpStandIn() as kfp_api:` serves on kfp_api.url; the dicts below hold the stored JSON objects by id."""

    def __init__(self):
        self.pipelines, self.versions, self.experiments, self.recurring_runs, self.runs = {}, {}, {}, {}, {}
        self.requests = []  # (method, path, query dict, parsed body) of every request, in order
        self._failures, self._lock, self._last_time = [], threading.Lock(), None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.api = self
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        get = lambda store, kind: lambda q, b, key: self._get(store, key, kind)  # noqa: E731
        self._routes = [
            ("GET", "/healthz", lambda q, b: {"multi_user": False, "pipeline_store": "database"}),
            ("GET", "/pipelines", lambda q, b: self._list(self.pipelines, q, "pipelines")),
            ("GET", "/pipelines/([^/]+)", get(self.pipelines, "pipeline")),
            ("POST", "/pipelines/upload", lambda q, b: self._upload(q, b, None)),
            ("POST", "/pipelines/upload_version", lambda q, b: self._upload(q, b, q.get("pipelineid", ""))),
            ("GET", "/pipelines/([^/]+)/versions", self._list_versions),
            ("GET", "/pipelines/[^/]+/versions/([^/]+)", get(self.versions, "pipeline version")),
            ("GET", "/experiments", lambda q, b: self._list(self.experiments, q, "experiments")),
            ("POST", "/experiments", self._create_experiment),
            ("GET", "/experiments/([^/]+)", get(self.experiments, "experiment")),
            ("GET", "/recurringruns", lambda q, b: self._list(self.recurring_runs, q, "recurringRuns",
                                                              experiment_id=q.get("experiment_id"))),
            ("POST", "/recurringruns", lambda q, b: self._create_run(b, self.recurring_runs, "recurring_run_id")),
            ("GET", "/recurringruns/([^/:]+)", get(self.recurring_runs, "recurring run")),
            ("DELETE", "/recurringruns/([^/:]+)", lambda q, b, key: self._delete(self.recurring_runs, key)),
            ("GET", "/runs", lambda q, b: self._list(self.runs, q, "runs", experiment_id=q.get("experiment_id"))),
            ("POST", "/runs", lambda q, b: self._create_run(b, self.runs, "run_id")),
            ("GET", "/runs/([^/:]+)", get(self.runs, "run")),
        ]

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, status: int, message: str = "injected failure", on: str = ""):
        """Answer the next request (queued: call twice to fail two), or with `on` ("POST /recurringruns") the next
        such request, with this HTTP status and a KFP-style error body."""
        self._failures.append((status, message, on))

    def _handle(self, method, path, query, content_type, raw):
        try:
            body, error = _parse_body(content_type, raw), None
        except ValueError as e:
            body, error = raw.decode(errors="replace"), ApiError(400, f"cannot parse request body: {e}")
        with self._lock:  # one request at a time: the stores are plain dicts
            self.requests.append((method, path, query, body))
            for i, (status, message, on) in enumerate(self._failures):
                if not on or on == f"{method} {path.removeprefix(API)}":
                    del self._failures[i]
                    raise ApiError(status, message)
            if error:
                raise error
            for verb, pattern, answer in self._routes:
                match = re.fullmatch(API + pattern, path)
                if verb == method and match:
                    return answer(query, body, *match.groups())
        raise ApiError(404, f"the stand-in has no route for {method} {path}")

    def _now(self):
        # Strictly increasing, so "created_at desc" orders objects made in the same microsecond as they were made.
        now = datetime.datetime.now(datetime.timezone.utc)
        self._last_time = max(now, self._last_time + datetime.timedelta(microseconds=1)) if self._last_time else now
        return self._last_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _get(self, store, key, kind):
        if key not in store:
            raise ApiError(404, f"{kind} {key} not found")
        return store[key]

    def _delete(self, store, key):
        self._get(store, key, "recurring run")  # the only kind the client deletes here
        del store[key]
        return {}

    def _list(self, store, query, key, **scope):
        items = [o for o in store.values() if all(o.get(k) == v for k, v in scope.items() if v)]
        items = [o for o in items if _matches(o, query.get("filter"))]
        field, _, order = (query.get("sort_by") or "created_at").partition(" ")
        field = ALIASES.get(field, field)
        if field not in ("created_at", "display_name") or order not in ("", "asc", "desc"):
            raise ApiError(400, f"stand-in cannot sort by {query['sort_by']!r}")
        items.sort(key=lambda o: o.get(field, ""), reverse=order == "desc")
        start = int(query.get("page_token") or 0)
        end = start + (int(query.get("page_size") or 0) or len(items))
        out = {"total_size": len(items)}
        if items[start:end]:  # like grpc-gateway, an empty list is left out (the client then sees None)
            out[key] = items[start:end]
        if end < len(items):
            out["next_page_token"] = str(end)
        return out

    def _list_versions(self, query, body, pipeline_id):
        self._get(self.pipelines, pipeline_id, "pipeline")
        return self._list(self.versions, query, "pipeline_versions", pipeline_id=pipeline_id)

    def _upload(self, query, body, pipeline_id):
        """Without pipeline_id, make a pipeline and its first version (as real KFP does); with it, one more version."""
        name, description = query.get("name") or query.get("display_name"), query.get("description", "")
        if pipeline_id is not None:
            self._get(self.pipelines, pipeline_id, "pipeline")
        if not name:
            raise ApiError(400, "a name is required")
        taken = (self.pipelines.values() if pipeline_id is None else
                 [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id])
        if any(o["display_name"] == name for o in taken):
            raise ApiError(409, f"Failed to create {'a pipeline' if pipeline_id is None else 'a pipeline version'} "
                                f"due to name conflict: {name!r} already exists")
        spec = _spec(body)  # parsed before anything is stored, so a bad file leaves no half-made pipeline
        made = {"display_name": name, "name": name, "description": description, "created_at": self._now()}
        pipeline = None
        if pipeline_id is None:
            pipeline_id = str(uuid.uuid4())
            pipeline = self.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, **made}
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), **made, "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return pipeline or version

    def _create_experiment(self, query, body):
        name = (body or {}).get("display_name")
        if not name:
            raise ApiError(400, "experiment display_name is required")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise ApiError(409, f"experiment {name!r} already exists")
        experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": self._now(),
                      "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_run(self, body, store, id_key):
        body = body or {}
        if not body.get("display_name"):
            raise ApiError(400, "display_name is required")
        experiment = self._get(self.experiments, body.get("experiment_id", ""), "experiment")
        ref = body.get("pipeline_version_reference") or {}
        if not ref and "pipeline_spec" not in body:
            raise ApiError(400, "a pipeline_version_reference or a pipeline_spec is required")
        if ref:  # both ids must exist and belong together
            version = self._get(self.versions, ref.get("pipeline_version_id", ""), "pipeline version")
            if version["pipeline_id"] != ref.get("pipeline_id"):
                raise ApiError(404, f"pipeline version {version['pipeline_version_id']} is not in pipeline "
                                    f"{ref.get('pipeline_id')}")
        now = self._now()
        new_id = str(uuid.uuid4())
        made = store[new_id] = {**body, id_key: new_id, "created_at": now}
        if id_key == "run_id":
            made.update(state="PENDING", storage_state="AVAILABLE", scheduled_at=now)
            experiment["last_run_created_at"] = now
        else:  # the real server sends int64 fields as JSON strings
            made.update(updated_at=now, max_concurrency=str(body.get("max_concurrency", 1)),
                        status="DISABLED" if body.get("mode") == "DISABLE" else "ENABLED")
        return made


def _matches(obj, filter_json):
    if not filter_json:
        return True
    try:
        predicates = json.loads(filter_json).get("predicates", [])
    except (ValueError, AttributeError):
        raise ApiError(400, f"invalid filter {filter_json!r}")
    for p in predicates:
        key, value = ALIASES.get(p.get("key"), p.get("key")), p.get("stringValue", p.get("string_value"))
        if p.get("operation") not in (1, "EQUALS") or key != "display_name" or value is None:
            raise ApiError(400, f"stand-in supports only EQUALS on display_name with a string value, got {p}")
        if obj.get(key) != value:
            return False
    return True


def _parse_body(content_type, raw):
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
                for part in message.get_payload()}
    return json.loads(raw) if raw.strip() else None


def _spec(body):
    # A compiled spec may carry a second YAML document (the platform spec); KFP then nests both, as here.
    try:
        docs = list(yaml.safe_load_all((body or {})["uploadfile"]))
    except (KeyError, yaml.YAMLError) as e:
        raise ApiError(400, f"uploadfile is missing or not YAML: {e}")
    if not docs or not all(isinstance(d, dict) for d in docs) or "pipelineInfo" not in docs[0]:
        raise ApiError(400, "uploadfile is not a compiled KFP pipeline spec")
    return docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}


class _Handler(BaseHTTPRequestHandler):
    def _serve(self):
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            status, out = 200, self.server.api._handle(self.command, url.path, dict(parse_qsl(url.query)),
                                                       self.headers.get("Content-Type", ""), raw)
        except Exception as e:  # a stand-in bug still answers, as a 500 naming it, rather than dropping the socket
            status, message = getattr(e, "status", 500), getattr(e, "message", f"stand-in error: {e!r}")
            out = {"error": message, "code": GRPC_CODES.get(status, 2), "message": message, "details": []}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, *args):  # keep test output quiet
        pass
