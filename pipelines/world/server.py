"""Serve a generated world over HTTP on a loopback address, for the real downloaders.

Routes (only GET and HEAD):
    /files/<path>                 the file under `root/files/`; 404 when absent
    /slow/files/<path>            the same, after `slow_seconds`
    /redirect?to=/files/<path>    302 to that path on this server (or to an absolute loopback URL)
Content types: .jpg image/jpeg, .mp4 video/mp4, and text/html for any file that is an HTML page.
"""
from __future__ import annotations

import csv
import ipaddress
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from pipelines.egress import HangupTolerantServer

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".mp4": "video/mp4", ".json": "application/json"}


def _loopback(host: str) -> bool:
    try:
        return ipaddress.IPv4Address(host) in ipaddress.IPv4Network("127.0.0.0/8")
    except ValueError:
        return False


@dataclass
class WorldServer:
    """A running world server: its base `url` and every requested path, in order."""

    url: str
    root: Path
    slow_seconds: float
    request_log: list[str] = field(default_factory=list)


class _Server(HangupTolerantServer):
    def __init__(self, address, root: Path, slow_seconds: float, log: list[str]):
        super().__init__(address, _Handler)
        self.files = (root / "files").resolve()
        self.slow_seconds = slow_seconds
        self.log = log
        self.stopping = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the request log is the record; no per-request stderr

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def do_GET(self) -> None:
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        self.server.log.append(self.path)
        parts = urlsplit(self.path)
        path = parts.path
        if path == "/redirect":
            return self._redirect(parse_qs(parts.query).get("to", [""])[0])
        if path.startswith("/slow/"):
            if self.server.stopping.wait(self.server.slow_seconds):
                self.close_connection = True
                return
            path = path[len("/slow"):]
        if not path.startswith("/files/"):
            return self._send(404, "text/plain", b"not found\n", body)
        target = (self.server.files / path[len("/files/"):]).resolve()
        if not target.is_relative_to(self.server.files) or not target.is_file():
            return self._send(404, "text/plain", b"not found\n", body)
        data = target.read_bytes()
        kind = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        if re.match(rb"\s*<(!doctype html|html)", data[:64], re.IGNORECASE):
            kind = "text/html; charset=utf-8"
        self._send(200, kind, data, body)

    def _redirect(self, to: str) -> None:
        if to.startswith("/") and not to.startswith("//"):
            location = f"http://{self.headers.get('Host', '%s:%d' % self.server.server_address[:2])}{to}"
        elif _loopback(urlsplit(to).hostname or ""):
            location = to
        else:
            return self._send(400, "text/plain", b"redirect target must be a path or a loopback URL\n", True)
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _world_json(root: Path) -> dict:
    path = root / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate the world first")
    return json.loads(path.read_text())


@contextmanager
def serve_world(root: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
                slow_seconds: float | None = None) -> Iterator[WorldServer]:
    """Serve `root/files` in a daemon thread for the duration of the block.

    `port=None`: the port of world.json's base_url; `port=0`: a free port (then rebase the metadata
    with `rebase_world` or `rebase_urls`). `slow_seconds=None`: world.json's value.
    """
    if not _loopback(host):
        raise ValueError(f"the world server binds only 127.0.0.0/8 addresses, got {host!r}")
    root = Path(root)
    world = _world_json(root)
    if port is None:
        port = urlsplit(world["base_url"]).port or 80
    if slow_seconds is None:
        slow_seconds = float(world["slow_seconds"])
    log: list[str] = []
    server = _Server((host, port), root, slow_seconds, log)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="world-server", daemon=True)
    thread.start()
    try:
        yield WorldServer(url=f"http://{host}:{server.server_address[1]}", root=root,
                          slow_seconds=slow_seconds, request_log=log)
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def rebase_urls(data, old_base: str, new_base: str):
    """`data` with every string that starts with `old_base` starting with `new_base` instead.

    Takes a str, a list of str/dict (HD-VILA rows), a dict, a pandas DataFrame or a pyarrow Table;
    returns a new object of the same kind.
    """
    if isinstance(data, str):
        return new_base + data[len(old_base):] if data.startswith(old_base) else data
    if isinstance(data, list):
        return [rebase_urls(x, old_base, new_base) for x in data]
    if isinstance(data, dict):
        return {k: rebase_urls(v, old_base, new_base) for k, v in data.items()}
    import pyarrow as pa
    import pyarrow.compute as pc

    pattern = "^" + re.escape(old_base)
    if isinstance(data, pa.Table):
        for i, column in enumerate(data.columns):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                rebased = pc.replace_substring_regex(column, pattern, new_base.replace("\\", "\\\\"))
                data = data.set_column(i, data.schema.field(i), rebased)
        return data
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        out = data.copy()
        for name in out.columns:
            if pd.api.types.is_object_dtype(out[name]) or pd.api.types.is_string_dtype(out[name]):
                out[name] = out[name].map(lambda x: rebase_urls(x, old_base, new_base) if isinstance(x, str) else x)
        return out
    raise TypeError(f"cannot rebase URLs in a {type(data).__name__}")


def rebase_world(root: str | os.PathLike, new_base: str) -> str:
    """Rewrite the world's metadata and ground truth in place to point at `new_base`; returns the old base."""
    import pyarrow.parquet as pq

    root = Path(root)
    world = _world_json(root)
    old_base = world["base_url"]
    if new_base == old_base:
        return old_base
    for name in ("laion.parquet", "ground_truth.parquet"):
        pq.write_table(rebase_urls(pq.read_table(root / name), old_base, new_base), root / name)
    webvid = root / "webvid.csv"
    with webvid.open(newline="") as f:
        table = list(csv.reader(f))
    url_column = table[0].index("contentUrl")  # only there, so that a caption is never touched
    for row in table[1:]:
        row[url_column] = rebase_urls(row[url_column], old_base, new_base)
    with webvid.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)
    hdvila = root / "hdvila.jsonl"
    rows = [json.loads(line) for line in hdvila.read_text().splitlines() if line]
    hdvila.write_text("".join(json.dumps(rebase_urls(r, old_base, new_base)) + "\n" for r in rows))
    world["base_url"] = new_base
    world["config"]["base_url"] = new_base
    (root / "world.json").write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    return old_base
