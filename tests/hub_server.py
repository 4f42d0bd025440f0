"""A fake Hugging Face Hub on loopback, for tests of the real download and upload paths.

It speaks the part of the Hub HTTP API that ``huggingface_hub`` 2.x uses for
``snapshot_download`` / ``hf_hub_download`` / ``model_info`` / ``list_repo_tree`` and for
``create_repo`` / ``create_branch`` / ``create_commit``:

- ``HEAD|GET /{owner}/{name}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob
  sha1), and for LFS-like files (weights, pickles, images) ``X-Linked-Etag`` (sha256) and
  ``X-Linked-Size`` with a ``302`` to a second "CDN" listener on another port (another origin,
  so huggingface_hub takes the metadata from the redirect itself, as on the real Hub).
- ``GET /api/models/{repo}[/revision/{rev}]`` and ``GET /api/models/{repo}/tree/{rev}``.
- ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{name}``, ``POST /api/validate-yaml``,
  ``POST /api/models/{repo}/preupload/{rev}`` (always answers upload mode "regular", so file
  contents come inline, base64, in the commit) and ``POST /api/models/{repo}/commit/{rev}`` (ndjson).
- Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) the way the Hub
  does, so huggingface_hub raises its usual exception classes.

Xet is never advertised (no ``X-Xet-Hash`` header, no ``xetHash`` in trees), and uploads never go
through LFS, so neither ``hf_xet`` nor an LFS server is needed.

Repos live in memory as commits (a pinned sha keeps its files when ``main`` moves on). The hub can
go :meth:`FakeHub.down` (both listeners stop, connections are refused) and come back :meth:`up` on
the same ports, or :meth:`FakeHub.stall` (connections are accepted, never answered). Every request
is recorded in :attr:`FakeHub.requests`.

Pointing huggingface_hub at it: its endpoint is read once, at import, from ``HF_ENDPOINT``. In
process use :meth:`FakeHub.patch_huggingface_hub` (monkeypatches ``huggingface_hub.constants``);
for a subprocess pass :meth:`FakeHub.environment` as its environment.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Suffixes the fake serves as LFS files (as the Hub's default .gitattributes does).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)
DATE = "2024-01-01T00:00:00.000Z"
# variables that would send huggingface_hub elsewhere (another cache, offline, a real token)
_CLEARED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted path, without the query
    query: dict
    authorization: str | None

    def is_download(self, filename: str) -> bool:
        """A request that fetches or asks for ``filename``'s content (resolve or CDN)."""
        return ("/resolve/" in self.path and self.path.endswith("/" + filename)) or (
            self.path.startswith("/cdn/") and self.path.endswith("/" + filename)
        )


class HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.body = body or {}  # extra JSON fields of the error answer


class FakeHub:
    """In-memory Hub on ``127.0.0.1`` (random ports). Use as a context manager or start()/stop().

    Args:
        token: the only token accepted for writes (and for reading private repos).
        owner: the user name create_repo assigns when the payload names no organization.
    """

    def __init__(self, *, token: str = "hf_fake_token", owner: str = "tester"):
        self.token = token
        self.owner = owner
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._ports: tuple[int, int] | None = None
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.stalled = False
        self._release = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "FakeHub":
        self.up()
        return self

    def up(self) -> None:
        """Start listening (again, on the same ports after :meth:`down`)."""
        if self._servers:
            return
        hub = self

        class Handler(_Handler):
            fake = hub

        ports = self._ports or (0, 0)
        self._servers = [ThreadingHTTPServer(("127.0.0.1", port), Handler) for port in ports]
        for server in self._servers:
            server.daemon_threads = True
        self._ports = tuple(s.server_address[1] for s in self._servers)  # type: ignore[assignment]
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in self._servers
        ]
        for thread in self._threads:
            thread.start()

    def stall(self, stalled: bool = True) -> None:
        """Accept connections but never answer (a network that drops packets), until unstalled."""
        self.stalled = stalled
        if not stalled:
            self._release.set()
            self._release = threading.Event()

    def down(self) -> None:
        """Stop listening: from now on connections are refused, as with a Hub that is down."""
        self.stall(False)
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    stop = down

    @property
    def is_up(self) -> bool:
        return bool(self._servers)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def url(self) -> str:
        if self._ports is None:
            raise RuntimeError("FakeHub was never started")
        return f"http://127.0.0.1:{self._ports[0]}"

    @property
    def cdn_url(self) -> str:
        if self._ports is None:
            raise RuntimeError("FakeHub was never started")
        return f"http://127.0.0.1:{self._ports[1]}"

    # -- pointing huggingface_hub at it -------------------------------------------------
    def patch_huggingface_hub(self, monkeypatch, hf_home: Path) -> Path:
        """Point this process's huggingface_hub at the fake, with an isolated HF_HOME.

        huggingface_hub copies HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into module constants at
        import, so setting the environment now would not be seen: patch the constants it reads at
        call time instead. Returns the hub cache folder (``hf_home / "hub"``).
        """
        from huggingface_hub import constants

        hf_home = Path(hf_home)
        cache = hf_home / "hub"
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        # the environment too, for code that reads it at call time (ours does, for HF_HUB_OFFLINE)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        for name in _CLEARED_ENV:
            monkeypatch.delenv(name, raising=False)
        return cache

    def environment(self, hf_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess whose huggingface_hub should talk to this fake."""
        env = dict(base or {})
        for name in _CLEARED_ENV:
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        return env

    # -- repository state ---------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False) -> str:
        """Create a repo whose first commit holds a .gitattributes (as the Hub does); return its sha."""
        with self._lock:
            if repo_id in self.repos:
                # the Hub's 409 carries the url; create_repo(exist_ok=True) reads it
                url = f"{self.url}/{repo_id}"
                raise HubError(409, f"You already created this model repo: {repo_id}", body={"url": url})
            self.repos[repo_id] = Repo(repo_id, private=private)
            return self._commit(repo_id, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")

    def add_commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "update"
    ) -> str:
        """Commit ``files`` (added or replaced) on ``branch``, creating the repo if needed; return the sha."""
        with self._lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id)
            return self._commit(repo_id, branch, files, [], message)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self._resolve_revision(repo, revision)].files)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self, filename: str) -> list[Request]:
        """Recorded requests that fetched or asked for ``filename``."""
        with self._lock:
            return [r for r in self.requests if r.is_download(filename)]

    def _commit(self, repo_id: str, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        repo = self.repos[repo_id]
        parent = repo.branches.get(branch)
        if parent is None and repo.commits:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        files.update(added)
        digest = hashlib.sha1()
        digest.update(f"{parent}\0{message}\0{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\0".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, parent, message, files)
        repo.branches[branch] = sha
        return sha

    def _resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _repo(self, repo_id: str, authorization: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        # the Hub answers 401 RepoNotFound for both missing and private-without-access repos
        if repo is None or (repo.private and authorization != f"Bearer {self.token}"):
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _check_write(self, authorization: str | None) -> None:
        if authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    # -- HTTP API (called by the handler, under the lock) -----------------------------------
    def _resolve_file(self, repo_id: str, revision: str, path: str, auth: str | None) -> tuple[int, dict, bytes]:
        repo = self._repo(repo_id, auth)
        sha = self._resolve_revision(repo, revision)
        data = repo.commits[sha].files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        if is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
            headers["Location"] = f"{self.cdn_url}/cdn/{sha256}/{quote(path)}"
            return 302, headers, b""
        return 200, headers, data

    def _cdn(self, sha256: str) -> bytes:
        for repo in self.repos.values():
            for commit in repo.commits.values():
                for data in commit.files.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return data
        raise HubError(404, "NoSuchKey")

    def _model_info(self, repo_id: str, revision: str, auth: str | None) -> dict:
        repo = self._repo(repo_id, auth)
        sha = self._resolve_revision(repo, revision)
        files = repo.commits[sha].files
        return {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "library_name": "ghibli-studio",
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    def _tree(self, repo_id: str, revision: str, prefix: str, auth: str | None) -> list[dict]:
        repo = self._repo(repo_id, auth)
        sha = self._resolve_revision(repo, revision)
        entries = []
        for path, data in sorted(repo.commits[sha].files.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            entry: dict = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _preupload(self, repo_id: str, revision: str, payload: dict, auth: str | None) -> dict:
        self._check_write(auth)
        repo = self._repo(repo_id, auth)
        sha = self._resolve_revision(repo, revision)
        current = repo.commits[sha].files
        answer = []
        for f in payload.get("files", []):
            old = current.get(f["path"])
            # "regular" for every file: contents then come inline in the commit, no LFS/Xet transfer
            oid = git_blob_sha1(old) if old is not None else None
            answer.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return {"files": answer, "commitOid": sha}

    def _commit_ndjson(self, repo_id: str, revision: str, body: bytes, auth: str | None) -> dict:
        self._check_write(auth)
        repo = self._repo(repo_id, auth)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        message, added, deleted = "", {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.branches[revision]:
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                # we never hand out "lfs" upload mode, so an lfsFile line is a client bug
                raise HubError(400, f"unsupported commit operation {key!r}")
        sha = self._commit(repo_id, revision, added, deleted, message)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}

    def _create_repo_api(self, payload: dict, auth: str | None) -> dict:
        self._check_write(auth)
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "only model repos are faked")
        repo_id = f"{payload.get('organization') or self.owner}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _create_branch(self, repo_id: str, branch: str, payload: dict, auth: str | None) -> dict:
        self._check_write(auth)
        repo = self._repo(repo_id, auth)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self._resolve_revision(repo, start)
        return {}

    def handle(
        self, method: str, raw_path: str, query: dict, auth: str | None, body: bytes, port: int
    ) -> tuple[int, dict, bytes]:
        """Route one request; returns (status, headers, body). Raises HubError for API errors."""
        parts = [unquote(p) for p in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        with self._lock:
            self.requests.append(Request(method, "/" + "/".join(parts), query, auth))
            if self._ports is not None and port == self._ports[1]:
                if method in ("GET", "HEAD") and len(parts) >= 2 and parts[0] == "cdn":
                    data = self._cdn(parts[1])
                    return 200, {"ETag": f'"{parts[1]}"', "Accept-Ranges": "bytes"}, data
                raise HubError(404, "not a CDN path")
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), auth)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if method == "GET" and not rest:
                    return _json(self._model_info(repo_id, "main", auth))
                if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                    return _json(self._model_info(repo_id, rest[1], auth))
                if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                    return _json(self._tree(repo_id, rest[1], "/".join(rest[2:]), auth))
                if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                    return _json(self._preupload(repo_id, rest[1], json.loads(body or b"{}"), auth))
                if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                    return _json(self._commit_ndjson(repo_id, rest[1], body, auth))
                if method == "POST" and rest[0] == "branch" and len(rest) == 2:
                    return _json(self._create_branch(repo_id, rest[1], json.loads(body or b"{}"), auth))
            if method == "POST" and parts == ["api", "repos", "create"]:
                return _json(self._create_repo_api(json.loads(body or b"{}"), auth))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            raise HubError(404, f"the fake Hub does not serve {method} {raw_path}")


def _json(obj) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no pooled connection outlives a "down" hub
    protocol_version = "HTTP/1.0"
    fake: FakeHub

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def _serve(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.fake.stalled:
            with self.fake._lock:
                self.fake.requests.append(Request(self.command, unquote(split.path), query, None))
            self.fake._release.wait(timeout=60)
            return  # close the connection without a word
        try:
            status, headers, data = self.fake.handle(
                self.command, split.path, query, self.headers.get("Authorization"), body, self.server.server_address[1]
            )
        except HubError as err:
            status, data = err.status, json.dumps({"error": err.message, **err.body}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve
