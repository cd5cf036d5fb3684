"""The model server's inference log: what the server was asked and answered, for monitoring what the model meets.

Each priced row becomes one JSON line: the request's fields (the model's inputs, as sent), the predicted price, the
model version, the request's id and the time. It holds request data (listings as clients sent them): keep it where
that data may be kept, and delete it when monitoring no longer needs it.

The server hands each answer to `InferenceLog.record`, which only queues it: a thread writes the lines, so writing
never slows an answer (a full queue drops rows and counts them, it never waits). The thread writes a part at a time
and closes it (gzipped, named by its first and last row's time) when it reaches `part_bytes` or `part_seconds`, and
when the server stops. Parts go to a local folder, where the oldest are removed past `keep_bytes`, or to
`s3://bucket/prefix/` (MinIO: S3_ENDPOINT_URL), where the bucket's lifecycle bounds them.

`read_log` reads back the rows of a period, and `as_listings` makes them a listings CSV for the monitoring pipeline:
a source that is a folder (a local directory, or an s3:// prefix ending in /) is read as an inference log.
"""

from __future__ import annotations

import datetime
import gzip
import io
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pandas as pd

log = logging.getLogger("serve.inference_log")

PART_GLOB = "inference-*.jsonl.gz"
STAMP = "%Y%m%dT%H%M%S%fZ"
# The columns a part's lines add to the request's fields.
TIME, VERSION, REQUEST, PREDICTED = "served_at", "model_version", "request_id", "predicted_price"


def is_log(source: str) -> bool:
    """Whether a source names an inference log: a local directory, or an s3:// prefix ending in /."""
    if source.startswith("s3://"):
        return source.endswith("/")
    path = source.removeprefix("file://")
    return bool(path) and "://" not in path and Path(path).is_dir()


class InferenceLog:
    """A writer of the inference log at `location`, one per server process."""

    def __init__(self, location: str, part_bytes: int = 8_000_000, part_seconds: float = 300.0,
                 keep_bytes: int = 1_000_000_000, queue_requests: int = 1000):
        self.location, self.part_bytes, self.part_seconds, self.keep_bytes = location, part_bytes, part_seconds, keep_bytes
        self.s3 = location.startswith("s3://")
        if self.s3 and not location.endswith("/"):
            raise ValueError(f"inference log {location!r}: an s3:// location is a prefix ending in /")
        # Parts are written here; for s3, uploaded from here (and kept here while the upload fails).
        self.folder = Path(tempfile.mkdtemp(prefix="inference-log-")) if self.s3 else Path(location)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = f"{socket.gethostname()}-{os.getpid()}"
        self.queue: queue.Queue = queue.Queue(maxsize=queue_requests)
        self.dropped = 0  # rows not logged because the queue was full
        self.file = None
        self.first = self.last = None  # the current part's first and last row times
        self.opened = 0.0
        self.thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the request path: queue only

    def record(self, rows: pd.DataFrame | dict[str, list], typed, prices: list[float], version: str) -> None:
        """Queue one answered request: the rows as sent (`rows`: a frame or its columns), as the model read them
        (`typed`), their prices."""
        try:
            self.queue.put_nowait((time.time(), version, rows, typed, prices))
        except queue.Full:
            self.dropped += len(prices)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and close the current part (the server is stopping)."""
        self.queue.put(None)
        self.thread.join(timeout)

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        reported = 0
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                item = ()
            try:
                if item is None:
                    return self._rotate()
                if item:
                    self._write(*item)
                if self.file and (self.file.tell() >= self.part_bytes or time.time() - self.opened >= self.part_seconds):
                    self._rotate()
                if self.dropped > reported:
                    log.warning("inference log: %d row(s) not logged so far: the writer fell behind", self.dropped)
                    reported = self.dropped
            except Exception:  # a full disk, an unreachable bucket: the server goes on answering
                log.exception("inference log: writing failed")
                if item is None:  # stopping: what could not be uploaded stays in the folder
                    return

    def _write(self, at: float, version: str, rows: pd.DataFrame | dict[str, list], typed, prices: list[float]) -> None:
        lines = pd.DataFrame(typed).copy()  # typed: a frame, or its columns as arrays
        for column in lines.columns:
            if pd.api.types.is_datetime64_any_dtype(lines[column]):
                lines[column] = lines[column].dt.strftime("%Y-%m-%d")
            elif column in rows and column in ("id", "host_id"):  # as sent: an 18-digit id is not exact as a float
                lines[column] = pd.Series(rows[column], dtype=object).to_numpy()
        stamp = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
        lines[PREDICTED], lines[VERSION] = prices, version
        lines[REQUEST], lines[TIME] = uuid.uuid4().hex[:16], stamp.isoformat(timespec="milliseconds")
        if self.file is None:
            self.file = open(self.folder / f".writing-{self.writer}.jsonl", "w", encoding="utf-8")
            self.opened, self.first = time.time(), stamp
        self.last = stamp
        text = lines.to_json(orient="records", lines=True, force_ascii=False)
        self.file.write(text if text.endswith("\n") else text + "\n")
        self.file.flush()

    def _rotate(self) -> None:
        """Close the current part: gzip it under its final name, then upload it (s3) or bound the folder."""
        if self.file is not None:
            self.file.close()
            name = f"inference-{self.first.strftime(STAMP)}-{self.last.strftime(STAMP)}-{self.writer}.jsonl.gz"
            raw = Path(self.file.name)
            part = self.folder / name
            with open(raw, "rb") as plain, gzip.open(part.with_suffix(".tmp"), "wb") as packed:
                packed.writelines(plain)
            part.with_suffix(".tmp").rename(part)  # readers see whole parts only
            raw.unlink()
            self.file = None
        try:
            if self.s3:
                self._upload()
        finally:  # parts an unreachable bucket left here stay within the bound too
            self._bound()

    def _upload(self) -> None:
        from components import sources

        bucket, prefix = _s3_location(self.location)
        for part in sorted(self.folder.glob(PART_GLOB)):
            sources._s3_client().upload_file(str(part), bucket, prefix + part.name)
            part.unlink()

    def _bound(self) -> None:
        parts = sorted(self.folder.glob(PART_GLOB), key=lambda p: p.name)
        sizes = {}
        for part in parts:
            try:
                sizes[part] = part.stat().st_size
            except FileNotFoundError:  # another worker removed it
                pass
        total = sum(sizes.values())
        for part, size in sizes.items():
            if total <= self.keep_bytes:
                break
            part.unlink(missing_ok=True)
            total -= size
            log.info("inference log: removed %s (the log is kept under %d bytes)", part.name, self.keep_bytes)


# ---------------------------------------------------------------- reading

def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _span(name: str) -> tuple[datetime.datetime, datetime.datetime]:
    """A part's first and last row's times, from its name."""
    first, last = name.removeprefix("inference-").split("-")[:2]
    read = lambda s: datetime.datetime.strptime(s, STAMP).replace(tzinfo=datetime.timezone.utc)  # noqa: E731
    return read(first), read(last)


def parts(location: str) -> dict[str, object]:
    """The log's closed parts: name -> how to read its bytes."""
    if location.startswith("s3://"):
        from components import sources

        bucket, prefix = _s3_location(location)
        client = sources._s3_client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if "/" not in name and Path(name).match(PART_GLOB):
                    found[name] = lambda key=item["Key"]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return found
    folder = Path(location.removeprefix("file://"))
    return {p.name: p.read_bytes for p in sorted(folder.glob(PART_GLOB))}


def read_log(location: str, hours: float = 0.0, now: datetime.datetime | None = None) -> pd.DataFrame:
    """The rows logged in the last `hours` (0: all), oldest first."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    since = now - datetime.timedelta(hours=hours) if hours > 0 else None
    frames = []
    for name, read in sorted(parts(location).items(), key=lambda item: _span(item[0])):
        if since is not None and _span(name)[1] < since:
            continue
        frames.append(pd.read_json(io.BytesIO(gzip.decompress(read())), lines=True, dtype=False))
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    if since is not None:
        rows = rows[pd.to_datetime(rows[TIME], utc=True) >= since]
    return rows.sort_values(TIME, kind="stable").reset_index(drop=True)


def as_listings(rows: pd.DataFrame) -> bytes:
    """Logged rows as a listings CSV: the listing columns the requests had, the others empty (no price: these are
    questions, not listings), then what the server answered."""
    from components.listings import OPTIONAL, SCHEMA

    columns = [c for c in SCHEMA if c not in OPTIONAL or c in rows.columns]
    table = pd.DataFrame({c: rows[c] if c in rows.columns else pd.Series(dtype=object, index=rows.index)
                          for c in columns})
    table = pd.concat([table, rows[[c for c in (PREDICTED, VERSION, TIME) if c in rows.columns]]], axis=1)
    return table.to_csv(index=False).encode()
