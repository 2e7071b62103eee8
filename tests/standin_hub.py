"""A stand-in for the Hugging Face Hub on loopback.

It speaks the part of the Hub's HTTP protocol that `huggingface_hub`'s
downloads use (repository info, tree listing, `resolve` with HEAD, ETag,
commit header and byte ranges), so the real client runs against it. It can cut
a file's first transfer short to exercise resume, and it records every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit sha -> files
    refs: dict[str, str]  # branch or tag -> commit sha


class _Loopback:
    """Serves `handler_base` on a free loopback port inside a `with` block;
    the handler sees this object as `state`."""

    handler_base: type[BaseHTTPRequestHandler]
    _server: ThreadingHTTPServer | None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):  # type: ignore[no-untyped-def]
        handler = type("Handler", (self.handler_base,), {"state": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


@dataclass
class StandInHub(_Loopback):
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent on its first GET
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Add (or add a new commit to) a repository; return the commit sha."""
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        sha = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def add_directory(self, repo_id: str, directory: Path, **kw: str) -> str:
        files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, **kw)

    def file_gets(self, name: str) -> list[str | None]:
        """The Range headers of every GET of `name`."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    state: StandInHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # -- routing ----------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.state.requests.append((self.command, path, self.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            return self._info(m.group(1), m.group(2))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(m.group(1), m.group(2))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._file(m.group(1), m.group(2), m.group(3), head)
        self._json(404, {"error": "not found"})

    def _lookup(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, code="RepoNotFound")
            return None
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            self._json(404, {"error": "Invalid rev id"}, code="RevisionNotFound")
            return None
        return sha, repo.commits[sha]

    def _info(self, repo_id: str, rev: str) -> None:
        found = self._lookup(repo_id, rev)
        if found:
            sha, files = found
            self._json(200, {"id": repo_id, "sha": sha, "siblings": [{"rfilename": n} for n in sorted(files)]})

    def _tree(self, repo_id: str, rev: str) -> None:
        found = self._lookup(repo_id, rev)
        if found:
            _sha, files = found
            entries = [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in sorted(files.items())
            ]
            self._json(200, entries)

    def _file(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        found = self._lookup(repo_id, rev)
        if not found:
            return
        sha, files = found
        if name not in files:
            self._json(404, {"error": "Entry not found"}, code="EntryNotFound")
            return
        body = files[name]
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = int(m.group(1))
            status = 206
        part = body[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if head:
            return
        cut = self.state.cut_after.pop(name, None)
        if cut is not None and start == 0:
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(part)

    def _json(self, status: int, body: object, code: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", body.get("error", "") if isinstance(body, dict) else "")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@dataclass
class StandInModelScope(_Loopback):
    """A stand-in for ModelScope's API on loopback: the file listing
    (`/api/v1/models/{id}/repo/files`) and file downloads
    (`/api/v1/models/{id}/repo?Revision=...&FilePath=...`), enough for the
    `modelscope` client's `snapshot_download` pointed at it by
    MODELSCOPE_ENDPOINT."""

    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, branch: str = "master") -> str:
        sha = hashlib.sha1(repr(sorted(files)).encode() + b"".join(files[k] for k in sorted(files))).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha


class _ModelScopeHandler(BaseHTTPRequestHandler):
    state: StandInModelScope
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        from urllib.parse import parse_qs

        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.state.requests.append((parts.path, parts.query))
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo(/files)?", unquote(parts.path))
        if not m:
            return self._json(404, {"Code": 404, "Message": "not found", "Success": False})
        repo = self.state.repos.get(m.group(1))
        rev = query.get("Revision", "master")
        sha = repo.refs.get(rev, rev) if repo else None
        if repo is None or sha not in repo.commits:
            return self._json(404, {"Code": 10010205001, "Message": "model or revision not found", "Success": False})
        files = repo.commits[sha]
        if m.group(2):
            entries = [
                {"Name": n.rsplit("/", 1)[-1], "Path": n, "Type": "blob", "Size": len(b), "Revision": sha,
                 "Sha256": hashlib.sha256(b).hexdigest()}
                for n, b in sorted(files.items())
            ]  # fmt: skip
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": entries}})
        body = files.get(query.get("FilePath", ""))
        if body is None:
            return self._json(404, {"Code": 404, "Message": "file not found", "Success": False})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


StandInHub.handler_base = _Handler
StandInModelScope.handler_base = _ModelScopeHandler
