"""A small local stand-in for the Hugging Face Hub HTTP API, so pushes and pulls are tested without the network.

It serves what ``huggingface_hub`` 2.4 sends for ``create_repo``, ``upload_folder`` / ``create_commit`` and the
downloads behind ``hf_hub_download``, ``snapshot_download`` and ``from_pretrained``:

- ``POST /api/repos/create``                                    create a model repo (409 when it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``                  repo info (sha, siblings)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``               file listing (snapshot_download)
- ``POST /api/models/{repo}/preupload/{rev}``                   upload mode per file: always ``regular``
- ``POST /api/models/{repo}/commit/{rev}``                      ndjson commit (header, file, deletedFile, deletedFolder)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``                     file metadata / content
- ``POST /api/validate-yaml``                                   README.md metadata check (upload_folder sends it)

Answering ``regular`` for every file makes the client send contents inline (base64) in the commit, so neither
Git LFS nor Xet storage is involved, and no Xet headers are ever returned on downloads, so plain HTTP is used.
Writes need ``Authorization: Bearer <token>``; so do reads of private repos. It listens on 127.0.0.1 only, and
bounds request bodies and the total stored bytes. Every request is recorded in ``log`` (method, path, status).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

USER = "user"
"""The account the token belongs to."""


def git_blob_sha1(content: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as the oid / ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Optional[Commit]:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubStandIn:
    """Start with :meth:`start` (returns the endpoint URL), stop with :meth:`stop`; state lives in ``repos``."""

    def __init__(self, token: str, max_request_bytes: int = 32 * 2**20, max_stored_bytes: int = 256 * 2**20):
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.max_stored_bytes = max_stored_bytes
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        stand_in = self

        class Handler(_Handler):
            hub = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def stored_bytes(self) -> int:
        return sum(len(b) for r in self.repos.values() for c in r.commits for b in c.files.values())

    def routes(self) -> set[str]:
        """The kinds of request served successfully, e.g. ``POST commit``, ``HEAD resolve``."""
        kinds = set()
        for method, path, status in self.log:
            if status >= 400:
                continue
            p = urlsplit(path).path
            name = next((n for n in ("resolve", "preupload", "commit", "tree", "revision") if f"/{n}/" in p), None)
            name = name or {"/api/repos/create": "create", "/api/validate-yaml": "validate-yaml"}.get(p, "repo-info")
            kinds.add(f"{method} {name}")
        return kinds

    def unhandled(self) -> list[tuple[str, str, int]]:
        """Requests answered 400/404/405/501 (an endpoint the client needs that the stand-in lacks shows up here)."""
        return [
            entry
            for entry in self.log
            if entry[2] in (400, 405, 501) or (entry[2] == 404 and "/resolve/" not in entry[1])
        ]


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stay silent before the connection is dropped

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean; requests go to hub.log
        pass

    # ---- plumbing -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.log.append((self.command, self.path, status))

    def _json(self, status: int, payload, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False, headers: Optional[dict] = None) -> None:
        body = b"" if head else json.dumps({"error": message}).encode()
        self._send(
            status,
            body,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(headers or {})},
            head,
        )

    def _body(self) -> Optional[bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_request_bytes:
            self._error(413, "PayloadTooLarge", f"request body over {self.hub.max_request_bytes} bytes")
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str, head: bool = False) -> Optional[Repo]:
        """The repo if it exists and may be read; otherwise answer as the Hub does (404 RepoNotFound / 401)."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if self._authorized() else 401, "RepoNotFound", "Repository not found", head)
            return None
        return repo

    # ---- routing --------------------------------------------------------------------------------

    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = self._repo("/".join(parts[2:4]), head)
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._repo_info(repo, rest[1] if len(rest) > 1 else "main")
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]))
        self._error(404, "NotFound", f"no such endpoint in the Hub stand-in: GET {self.path}", head)

    def do_POST(self):
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        body = self._body()
        if body is None:
            return
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        if parts == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body).get("content", ""))
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo = self._repo("/".join(parts[2:4]))
            if repo is None:
                return
            if parts[5] != "main":
                return self._error(400, "RevisionNotFound", "the stand-in only has the main branch")
            return self._preupload(repo, json.loads(body)) if parts[4] == "preupload" else self._commit(repo, body)
        self._error(404, "NotFound", f"no such endpoint in the Hub stand-in: POST {self.path}")

    # ---- endpoints ------------------------------------------------------------------------------

    def _create(self, payload: dict) -> None:
        if payload.get("type", "model") != "model":
            return self._error(400, "BadRequest", "the stand-in hosts model repos only")
        namespace = payload.get("organization") or USER
        if namespace != USER:
            return self._error(403, "Forbidden", f"no write access to namespace {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
            repo = Repo(repo_id, private)
            repo.commits.append(Commit(hashlib.sha1(repo_id.encode()).hexdigest(), "initial commit", {}))
            self.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, content: str) -> None:
        """Check the card's YAML header as the Hub does for what is used here: a mapping, and a parsable model-index."""
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        if not content.startswith("---\n") or "\n---" not in content[4:]:
            return self._json(
                200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
            )
        errors = []
        try:
            meta = yaml.safe_load(content[4 : content.index("\n---", 4)])
        except yaml.YAMLError as err:
            meta, errors = None, [{"message": f"invalid YAML: {err}"}]
        if meta is not None and not isinstance(meta, dict):
            errors.append({"message": "metadata must be a mapping"})
        elif meta and "model-index" in meta:
            try:
                model_index_to_eval_results(meta["model-index"])
            except Exception as err:  # noqa: BLE001
                errors.append({"message": f"model-index is invalid: {type(err).__name__}: {err}"})
        for key in ("license", "base_model", "library_name", "pipeline_tag"):
            if meta and key in meta and not isinstance(meta[key], str):
                errors.append({"message": f"{key} must be a string"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = repo.at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"revision {revision} not found")
        self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                "tags": [],
            },
        )

    def _tree(self, repo: Repo, revision: str, prefix: str) -> None:
        commit = repo.at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"revision {revision} not found")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            entries.append(
                {
                    "type": "file",
                    "path": path,
                    "size": len(commit.files[path]),
                    "oid": git_blob_sha1(commit.files[path]),
                }
            )
            folders.update("/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1))
        entries += [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)
        ]
        self._json(200, entries)

    def _preupload(self, repo: Repo, payload: dict) -> None:
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(repo.head.files[f["path"]]) if f["path"] in repo.head.files else None,
            }
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": repo.head.oid})

    def _commit(self, repo: Repo, body: bytes) -> None:
        files = dict(repo.head.files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and not repo.head.oid.startswith(parent):
                    return self._error(412, "PreconditionFailed", "parent commit is not the head of main")
            elif key == "file":
                files[value["path"]] = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, "BadRequest", f"the stand-in accepts only regular (inline) files, not {key!r}")
        with self.hub.lock:
            added = sum(len(c) for c in files.values())
            if self.hub.stored_bytes() + added > self.hub.max_stored_bytes:
                return self._error(507, "InsufficientStorage", "the stand-in's storage bound is reached")
            digest = hashlib.sha1(repo.head.oid.encode() + message.encode())
            for path in sorted(files):
                digest.update(path.encode() + git_blob_sha1(files[path]).encode())
            repo.commits.append(Commit(digest.hexdigest(), message, files))
        self._json(
            200,
            {
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{repo.head.oid}",
                "commitOid": repo.head.oid,
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        commit = repo.at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"revision {revision} not found", head)
        if path not in commit.files:
            return self._error(
                404, "EntryNotFound", f"{path} does not exist at {revision}", head, {"X-Repo-Commit": commit.oid}
            )
        content = commit.files[path]
        self._send(
            200,
            content,
            {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{git_blob_sha1(content)}"',
            },
            head,
        )
