"""A fake Hugging Face hub and ModelScope site over a local HTTP server, serving model folders from disk.

It answers the requests the real clients (huggingface_hub, modelscope) make for a snapshot download,
with the headers they read (commit, etag, linked size, ranges), and can misbehave on purpose: cut a
file short once, serve wrong bytes or a wrong size, answer 401/403/404.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".tiktoken")


@dataclass
class FakeFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class FakeHub:
    repos: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # repo -> 401 / 403 / 404 for everything
    cut_once: set[str] = field(default_factory=set)  # file paths sent half then dropped, the first time
    corrupt: set[str] = field(default_factory=set)  # file paths served with wrong bytes (right size)
    short: set[str] = field(default_factory=set)  # file paths served with fewer bytes than listed
    fail_get: set[str] = field(default_factory=set)  # file paths whose GET answers 500
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_folder(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = {
            str(p.relative_to(folder)): FakeFile(str(p.relative_to(folder)), p.read_bytes())
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    def downloads(self, name: str) -> list[str | None]:
        """The Range header of every GET of a file called ``name`` (None: the whole file)."""
        return [rng for method, path, rng in self.log if method == "GET" and _file_of(path) == name]


def _file_of(path: str) -> str | None:
    parts = urlsplit(path)
    if "/resolve/" in parts.path:
        return unquote(parts.path.split("/resolve/", 1)[1].split("/", 1)[1])
    query = parse_qs(parts.query)
    if parts.path.endswith("/repo") and "FilePath" in query:
        return query["FilePath"][0]
    return None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _json(self, value: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, text in (headers or {}).items():
                self.send_header(name, text)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, head: bool) -> None:
            code = {401: "RepoNotFound", 403: "GatedRepo", 404: "RepoNotFound"}.get(status, "")
            headers = {"X-Error-Code": code} if code else {}
            if status == 403:
                headers["X-Error-Message"] = "Access to this model is restricted: you must accept its conditions"
            if head:
                self.send_response(status)
                for name, text in headers.items():
                    self.send_header(name, text)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._json({"error": code or "error", "Code": status, "Message": "not available", "Success": False},
                       status, headers)

        def _serve(self, head: bool) -> None:
            with hub.lock:
                hub.log.append((self.command, self.path, self.headers.get("Range")))
            url = urlsplit(self.path)
            path = unquote(url.path)
            if path.startswith("/api/v1/models/"):  # ModelScope
                return self._modelscope(path.removeprefix("/api/v1/models/"), parse_qs(url.query), head)
            if path.startswith("/api/models/"):
                rest = path.removeprefix("/api/models/")
                repo_id = "/".join(rest.split("/")[:2])
                if repo_id not in hub.repos or repo_id in hub.status:
                    return self._error(hub.status.get(repo_id, 404), head)
                files = hub.repos[repo_id]
                if "/tree/" in rest:
                    return self._json([self._tree_entry(f) for f in files.values()])
                return self._json({"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": p} for p in files]})
            if "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                name = rest.split("/", 1)[1]
                if repo_id in hub.status or repo_id not in hub.repos:
                    return self._error(hub.status.get(repo_id, 404), head)
                if name not in hub.repos[repo_id]:
                    return self._error(404, head)
                return self._file(hub.repos[repo_id][name], head, hf=True)
            self._error(404, head)

        @staticmethod
        def _tree_entry(f: FakeFile) -> dict:
            entry = {"type": "file", "oid": f.git_sha1, "size": len(f.data), "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            return entry

        def _modelscope(self, rest: str, query: dict[str, list[str]], head: bool) -> None:
            parts = rest.split("/")
            repo_id = "/".join(parts[:2])
            if repo_id in hub.status or repo_id not in hub.repos:
                status = hub.status.get(repo_id, 404)
                return self._json({"Code": status, "Message": "model not found", "Success": False}, status)
            files = hub.repos[repo_id]
            tail = "/".join(parts[2:])
            if tail == "repo/files":
                listing = [{"Path": f.path, "Name": Path(f.path).name, "Type": "blob", "Size": len(f.data),
                            "Sha256": f.sha256} for f in files.values()]
                return self._json({"Code": 200, "Data": {"Files": listing}, "Success": True})
            if tail == "repo" and "FilePath" in query:
                name = query["FilePath"][0]
                if name not in files:
                    return self._json({"Code": 404, "Message": "file not found", "Success": False}, 404)
                return self._file(files[name], head, hf=False)
            if tail == "":
                return self._json({"Code": 200, "Data": {"Path": parts[0], "Name": parts[1]}, "Success": True})
            self._json({"Code": 404, "Message": "not found", "Success": False}, 404)

        def _file(self, f: FakeFile, head: bool, *, hf: bool) -> None:
            data = f.data
            if f.path in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data)
            if f.path in hub.short:
                data = data[: len(data) // 2]
            if not head and f.path in hub.fail_get:
                return self._json({"error": "boom"}, 500)
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and not head:
                start = int(rng.removeprefix("bytes=").split("-")[0])
            body = data[start:]
            self.send_response(206 if start else 200)
            if hf:
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{f.etag}"')
                if f.lfs:
                    self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                    self.send_header("X-Linked-Size", str(len(f.data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            with hub.lock:
                cut = f.path in hub.cut_once and not start
                if cut:
                    hub.cut_once.discard(f.path)
            if cut:  # promise the whole file, send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


class FakeHubServer:
    """``with FakeHubServer(hub) as url:`` serves ``hub`` on a free local port."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
