"""A tiny stand-in for the Hugging Face hub on loopback: serves local folders as model repos through the
HTTP API that huggingface_hub's snapshot_download uses (repo info, tree listing, file resolve), so
`qora pull` runs its real download path with HF_ENDPOINT pointing here.

    with FakeHub({"org/tiny": Path("tests/fixtures/tiny-llama")}) as hub:
        env["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        listing = repr(sorted((k, p.stat().st_size) for k, p in self.files.items()))
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    def entry(self, name: str) -> dict:
        data = self.files[name].read_bytes()
        e = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
        if name.endswith(".safetensors"):  # weights are LFS objects on the hub
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    def etag(self, name: str) -> str:
        e = self.entry(name)
        return e["lfs"]["oid"] if "lfs" in e else e["oid"]


class FakeHub:
    """Serve {repo_id: folder} on 127.0.0.1 (a free port); `requests` records the paths asked for."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {rid: _Repo(rid, Path(folder)) for rid, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ── routing ──

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        if path.startswith("/api/models/"):
            return self._api(h, path[len("/api/models/") :])
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":  # /ORG/NAME/resolve/REV/FILE
            return self._resolve(h, "/".join(parts[:2]), "/".join(parts[4:]), head)
        self._json(h, 404, {"error": "not found"})

    def _repo(self, h, repo_id: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "RepoNotFound")
            h.send_header("X-Error-Message", "Repository not found")
            h.send_header("Content-Length", "0")
            h.end_headers()
        return repo

    def _api(self, h, rest: str) -> None:
        parts = rest.split("/")
        repo = self._repo(h, "/".join(parts[:2]))
        if repo is None:
            return
        kind = parts[2] if len(parts) > 2 else "revision"
        if kind == "revision":  # repo info: /api/models/ORG/NAME[/revision/REV]
            siblings = [{"rfilename": name} for name in repo.files]
            return self._json(
                h,
                200,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "siblings": siblings,
                },
            )
        if kind == "tree":  # /api/models/ORG/NAME/tree/REV[/PATH]?recursive=...
            prefix = "/".join(parts[4:])
            names = [n for n in repo.files if not prefix or n.startswith(prefix.rstrip("/") + "/")]
            return self._json(h, 200, [repo.entry(n) for n in names])
        self._json(h, 404, {"error": f"unknown api route {kind}"})

    def _resolve(self, h, repo_id: str, name: str, head: bool) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        if name not in repo.files:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = repo.files[name].read_bytes()
        h.send_response(200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{repo.etag(name)}"')
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if not head:
            h.wfile.write(data)

    @staticmethod
    def _json(h, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
