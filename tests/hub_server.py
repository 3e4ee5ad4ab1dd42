"""A small local server that speaks enough of the Hugging Face Hub HTTP API for tests.

The real `huggingface_hub` client and diffusers run unmodified against it (see docs/hub_api.md for the facts
it honours). It is test infrastructure only: standard library, one process, no authentication, no pull requests.

Storage: file contents live content-addressed (by sha256) under `<root>/blobs/`; each repo's branches and commit
history live in `<root>/repos/<type>s/<namespace>/<name>.json`, so a server restarted on the same root (manual use)
sees the same repos. Every commit records the full file map of the repo, which keeps revision lookups trivial.

Manual use::

    python tests/hub_server.py --port 8765 --root /tmp/hub
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 python -c "..."
"""

from __future__ import annotations

import argparse
import base64
import codecs
import fnmatch
import hashlib
import itertools
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# URL segment after /api/ -> repo type as the client names it, and the prefix of web URLs for that type.
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

USER_NAME = "user"
COMMIT_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Like the Hub, a new repo starts with one commit holding a `.gitattributes`; its `filter=lfs` patterns are also
# what decides (with size and binary content) whether a file must go through LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.ckpt", "*.gz", "*.h5", "*.joblib", "*.msgpack", "*.npy", "*.npz",
        "*.onnx", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar",
        "*.tflite", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


def git_blob_sha1(data: bytes) -> str:
    """Return the git blob id of `data` (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the git-lfs pointer file that stands for an LFS object in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_binary(sample: bytes) -> bool:
    """Guess like git does: a NUL byte, or bytes that are not UTF-8 (a cut-off trailing character is fine)."""
    if b"\0" in sample:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    return False


def check_front_matter(content: str) -> tuple[list[str], list[str]]:
    """Cheaply check that the YAML front matter of a repo card looks syntactically plausible.

    This is no YAML parser: it catches the mistakes a generated card can realistically have (unterminated block,
    tab indentation, a top-level line that is not `key: value`, duplicate top-level keys, unbalanced brackets).

    Returns:
        `(errors, warnings)` as lists of messages.
    """
    lines = content.lstrip("\ufeff").splitlines()
    if not lines or lines[0].rstrip() != "---":
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].rstrip() == "---")
    except StopIteration:
        return ["YAML front matter is not terminated by a '---' line"], []
    errors: list[str] = []
    keys: set[str] = set()
    depth = 0
    for number, line in enumerate(lines[1:end], start=2):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if "\t" in indent:
            errors.append(f"line {number}: tabs are not allowed for indentation")
        # Brackets inside quoted strings do not count; flow collections may span lines, hence a running depth.
        in_flow = depth > 0
        unquoted = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'", "", stripped)
        depth += unquoted.count("[") + unquoted.count("{") - unquoted.count("]") - unquoted.count("}")
        # Only top-level mapping lines are checked; list items and nested content are taken as they come.
        if indent or in_flow or stripped.startswith("-"):
            continue
        match = re.match(r"^(\"[^\"]*\"|'[^']*'|[^\s:#\"'][^:#]*?)\s*:(\s|$)", stripped)
        if match is None:
            errors.append(f"line {number}: expected 'key: value', got {stripped[:40]!r}")
            continue
        key = match.group(1).strip("\"'")
        if key in keys:
            errors.append(f"line {number}: duplicate key {key!r}")
        keys.add(key)
    if depth != 0:
        errors.append("unbalanced brackets in YAML front matter")
    return errors, []


def _expect(value: Any, kind: type, what: str) -> Any:
    """Return `value` if it is a `kind`, else answer 400: malformed input is the client's fault, not a server bug."""
    if not isinstance(value, kind):
        raise HubError(400, f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _b64decode(text: Any, what: str) -> bytes:
    """Decode base64 sent by the client, answering 400 when it is not."""
    try:
        return base64.b64decode(_expect(text, str, what), validate=True)
    except ValueError as e:
        raise HubError(400, f"{what} is not valid base64: {e}") from e


class HubError(Exception):
    """An error answered to the client as a 4xx, optionally typed through the `X-Error-Code` header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class FileEntry:
    """One file of a commit: its content is the blob `sha256`; `blob_id` is its git id (of the pointer if LFS)."""

    sha256: str
    size: int
    lfs: bool
    blob_id: str

    def tree_item(self, path: str) -> dict[str, Any]:
        """The JSON shape of this file in tree listings and paths-info."""
        item: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return item

    @property
    def pointer_size(self) -> int:
        """Size of the git-lfs pointer file that stands for this file in git."""
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        """What the Hub puts in `ETag`: the git blob id for regular files, the sha256 for LFS ones."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    """A commit: its message, parent and the complete file map of the repo at that point."""

    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    """A repo with its branches (name -> commit sha) and every commit ever made (sha -> commit)."""

    repo_type: str
    repo_id: str
    private: bool = False
    sdk: str | None = None
    created_at: str = field(default_factory=_now_iso)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Resolve a branch name or a full commit sha, or raise a typed RevisionNotFound."""
        revision = revision.removeprefix("refs/heads/")
        sha = self.branches.get(revision) or (revision if revision in self.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def to_json(self) -> dict[str, Any]:
        """Serialisable form, for persistence under the server root."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Repo:
        """Inverse of `to_json`."""
        commits = {
            sha: Commit(**{**c, "files": {p: FileEntry(**e) for p, e in c["files"].items()}})
            for sha, c in data.pop("commits").items()
        }
        return cls(**data, commits=commits)


class HubState:
    """All repos and blobs, behind one lock (requests arrive on several threads)."""

    LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses larger regular (non-LFS) files

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = itertools.count()
        for path in sorted((self.root / "repos").glob("*/*/*.json")):
            repo = Repo.from_json(json.loads(path.read_text()))
            self.repos[(repo.repo_type, repo.repo_id)] = repo

    # --- storage -------------------------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store `data` content-addressed; return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.blobs / sha
        if not target.exists():
            # Write then rename so a concurrent reader never sees a partial blob.
            fd, tmp = tempfile.mkstemp(dir=self.blobs)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return sha

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob is stored (and has `size` bytes, when given)."""
        path = self.blobs / sha256
        return path.is_file() and (size is None or path.stat().st_size == size)

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives."""
        return self.blobs / sha256

    def _save(self, repo: Repo) -> None:
        path = self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo.to_json()))
        os.replace(tmp, path)

    # --- repos and commits ---------------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        """Return the repo, or raise a typed RepoNotFound."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool, sdk: str | None) -> Repo:
        """Create a repo with an initial `.gitattributes` commit on `main`; 409 if it exists."""
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, "You already created this repo")
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, sdk=sdk)
        self.repos[(repo_type, repo_id)] = repo
        data = DEFAULT_GITATTRIBUTES.encode()
        entry = FileEntry(self.put_blob(data), len(data), False, git_blob_sha1(data))
        self._add_commit(repo, "main", None, "initial commit", "", {".gitattributes": entry})
        return repo

    def _add_commit(
        self, repo: Repo, branch: str, parent: str | None, title: str, message: str, files: dict[str, FileEntry]
    ) -> Commit:
        # The sha only has to be unique and look like git's: hash what makes the commit plus a counter.
        tree = "".join(f"{p} {e.blob_id}\n" for p, e in sorted(files.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n{next(self._counter)}\n{tree}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now_iso(), files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        self._save(repo)
        return commit

    def commit(self, repo: Repo, branch: str, lines: list[dict[str, Any]]) -> Commit:
        """Apply an ndjson commit payload (already parsed into lines) to `branch`."""
        if branch not in repo.branches:
            if COMMIT_SHA_RE.match(branch) and branch in repo.commits:
                raise HubError(400, "Commits can only be made on a branch, not on a commit sha")
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [_expect(line, dict, "Each commit line") for line in lines]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = _expect(lines[0].get("value") or {}, dict, "The commit header")
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.sha:
            raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head.sha})")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), _expect(line.get("value") or {}, dict, "A commit line's value")
            path = _clean_repo_path(value.get("path"))
            if key in ("file", "lfsFile", "deletedFile") and path.endswith("/"):
                raise HubError(400, f"A file path cannot end with '/': {path}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                data = _b64decode(value.get("content") or "", f"The content of {path}")
                files[path] = FileEntry(self.put_blob(data), len(data), False, git_blob_sha1(data))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_RE.match(oid):
                    raise HubError(400, f"Invalid LFS oid for {path}")
                if not self.has_blob(oid, size):
                    raise HubError(422, f"LFS object {oid} for {path} was not uploaded (or has another size)")
                size = self.blob_path(oid).stat().st_size
                files[path] = FileEntry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        folders = {str(folder) for p in files for folder in list(Path(p).parents)[:-1]}
        if clash := sorted(folders & files.keys()):
            raise HubError(400, f"Paths used both as a file and as a folder: {clash}")
        title = header.get("summary") or "Upload files"
        return self._add_commit(repo, branch, head.sha, title, header.get("description") or "", files)

    def upload_mode(self, path: str, sample: bytes, size: int, files: dict[str, FileEntry]) -> str:
        """Decide like the Hub: LFS for large files, binary content, or paths matching `.gitattributes` LFS rules."""
        if size >= self.LFS_SIZE_THRESHOLD or _is_binary(sample):
            return "lfs"
        attributes = files.get(".gitattributes")
        if attributes is not None:
            for line in self.blob_path(attributes.sha256).read_text(errors="replace").splitlines():
                pattern, *attrs = line.split() or [""]
                if "filter=lfs" in attrs:
                    # git matches slash-less patterns against the basename, others against the whole path.
                    target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                    if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                        return "lfs"
        return "regular"


def _clean_repo_path(path: Any) -> str:
    """Validate a path inside a repo (relative, no `..`, not inside `.git`)."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _folder_item(files: dict[str, FileEntry], folder: str) -> dict[str, Any]:
    """The JSON shape of a folder in tree listings; its oid only has to change when its content does."""
    content = "".join(f"{p} {e.blob_id}\n" for p, e in sorted(files.items()) if p.startswith(folder + "/"))
    return {"type": "directory", "oid": hashlib.sha1(content.encode()).hexdigest(), "size": 0, "path": folder}


def _tree_items(files: dict[str, FileEntry], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing of folder `base` ("" for the root): folders first, like the Hub. KeyError if `base` is absent."""
    prefix = base + "/" if base else ""
    below = sorted(p for p in files if p.startswith(prefix))
    if base and not below:
        raise KeyError(base)
    folders: set[str] = set()
    items: list[dict[str, Any]] = []
    for path in below:
        parts = path[len(prefix) :].split("/")
        # Every folder between `base` and the file (only the first one when not recursive).
        folders.update(
            prefix + "/".join(parts[:depth]) for depth in range(1, len(parts) if recursive else min(len(parts), 2))
        )
        if recursive or len(parts) == 1:
            items.append(files[path].tree_item(path))
    return [_folder_item(files, folder) for folder in sorted(folders)] + items


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to the handlers below; every failure becomes a 4xx (a 5xx makes clients retry)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _HubHTTPServer

    # --- plumbing ------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            # Streamed uploads (a file object handed to the HTTP client) may arrive chunked.
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(max(int(self.headers.get("Content-Length") or 0), 0))

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        with hub.log_lock:
            hub.request_log.append((self.command, split.path))
        try:
            self.body = self._read_body()
        except ValueError:
            self.close_connection = True  # the stream is out of sync: do not reuse it
            self._send_error(HubError(400, "Malformed request body"))
            return
        self.query = parse_qs(split.query)
        try:
            self._route(self.command, split.path.split("/")[1:])
        except HubError as e:
            self._send_error(e)
        except Exception as e:  # a bug in this server: report it to the test, but never as a 5xx
            with hub.log_lock:
                hub.internal_errors.append(f"{self.command} {self.path}: {type(e).__name__}: {e}")
            self._send_error(HubError(400, f"Server could not handle the request: {type(e).__name__}: {e}"))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        with self.server.hub.log_lock:
            self.server.hub.status_log.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        # Header values must be latin-1; the message is only informative.
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, error.status, headers)

    def _json_body(self) -> dict[str, Any]:
        try:
            return _expect(json.loads(self.body or b"{}"), dict, "The JSON body")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    @property
    def _base_url(self) -> str:
        # Links handed back (LFS hrefs, repo urls) use the host the client reached us on.
        return f"http://{self.headers.get('Host') or self.server.hub.netloc}"

    # --- routing -------------------------------------------------------------------------------------------------

    def _route(self, method: str, segs: list[str]) -> None:
        hub = self.server.hub
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and method == "GET":
                # Fetched for the user agent when telemetry is on: an empty registry means "no agent detected".
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if len(rest) >= 3 and rest[0] in API_TYPES:
                repo_type, repo_id = API_TYPES[rest[0]], f"{unquote(rest[1])}/{unquote(rest[2])}"
                return self._repo_api(method, repo_type, repo_id, rest[3:])
        elif segs[:1] == ["_lfs"] and len(segs) >= 2:
            return self._lfs_object(method, segs[1], segs[2:])
        else:
            repo_type = "model"
            if segs[:1] in (["datasets"], ["spaces"]) and len(segs) >= 4:
                repo_type, segs = API_TYPES[segs[0]], segs[1:]
            if len(segs) >= 3 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
                if method == "POST":
                    return self._lfs_batch(repo_type, f"{unquote(segs[0])}/{unquote(segs[1][:-4])}")
            if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
                return self._resolve(repo_type, repo_id, unquote(segs[3]), unquote("/".join(segs[4:])))
        with hub.log_lock:
            hub.unhandled.append((method, self.path))
        raise HubError(404, f"This test server does not implement {method} {urlsplit(self.path).path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        hub = self.server.hub
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        # The revision is URL-quoted by the client (refs/pr/1 -> refs%2Fpr%2F1): one raw segment.
        revision = unquote(args[0]) if args else "main"
        with hub.state.lock:
            repo = hub.state.get_repo(repo_type, repo_id)
            if method == "GET" and (action == "" or (action == "revision" and len(args) == 1)):
                return self._send_json(self._repo_info(repo, repo.resolve(revision)))
            if method == "GET" and action == "tree" and args:
                return self._tree(repo, repo.resolve(revision), unquote("/".join(args[1:])).strip("/"))
            if method == "POST" and action == "preupload" and len(args) == 1:
                return self._preupload(repo, repo.resolve(revision))
            if method == "POST" and action == "commit" and len(args) == 1:
                return self._commit(repo, revision)
            if method == "POST" and action == "paths-info" and len(args) == 1:
                return self._paths_info(repo, repo.resolve(revision))
            if method == "GET" and action == "refs" and not args:
                return self._refs(repo)
            if method == "GET" and action == "commits" and len(args) == 1:
                return self._list_commits(repo, repo.resolve(revision))
            if method in ("POST", "DELETE") and action == "branch" and args:
                return self._branch(method, repo, unquote("/".join(args)))
        with hub.log_lock:
            hub.unhandled.append((method, self.path))
        raise HubError(404, f"This test server does not implement {method} {urlsplit(self.path).path}")

    # --- account and repo management -----------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER_NAME,
                "fullname": "Test User",
                "email": "user@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content")
        if not isinstance(content, str):
            raise HubError(400, "'content' must be a string")
        errors, warnings = check_front_matter(content)
        body = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        self._send_json(body, 400 if errors else 200)

    def _repo_identity(self) -> tuple[str, str, dict[str, Any]]:
        payload = self._json_body()
        name, namespace = payload.get("name"), payload.get("organization") or USER_NAME
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if not all(isinstance(part, str) and NAME_RE.match(part) for part in (namespace, name)):
            raise HubError(400, f"Invalid repo name {namespace}/{name}")
        return repo_type, f"{namespace}/{name}", payload

    def _create_repo(self) -> None:
        repo_type, repo_id, payload = self._repo_identity()
        url = f"{self._base_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if repo_type == "space" and payload.get("sdk") is None:
            raise HubError(400, "A space needs an 'sdk'")
        with self.server.hub.state.lock:
            if (repo_type, repo_id) in self.server.hub.state.repos:
                # `create_repo(exist_ok=True)` reads the 409 and then the `url` of this body.
                return self._send_json({"error": "You already created this repo", "url": url}, 409)
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            self.server.hub.state.create_repo(repo_type, repo_id, private, payload.get("sdk"))
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        repo_type, repo_id, _ = self._repo_identity()
        state = self.server.hub.state
        with state.lock:
            state.get_repo(repo_type, repo_id)
            del state.repos[(repo_type, repo_id)]
            (state.root / "repos" / f"{repo_type}s" / f"{repo_id}.json").unlink(missing_ok=True)
        self._send(200)

    def _branch(self, method: str, repo: Repo, branch: str) -> None:
        if method == "DELETE":
            if branch not in repo.branches or branch == "main":
                raise HubError(404 if branch not in repo.branches else 403, f"Cannot delete branch {branch}")
            del repo.branches[branch]
        else:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = repo.resolve(_expect(self._json_body().get("startingPoint") or "main", str, "'startingPoint'"))
            repo.branches[branch] = start.sha
        self.server.hub.state._save(repo)
        self._send_json({})

    # --- read API ------------------------------------------------------------------------------------------------

    def _repo_info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        namespace = repo.repo_id.split("/")[0]
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.blob_id}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        return info

    def _tree(self, repo: Repo, commit: Commit, base: str) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        try:
            items = _tree_items(commit.files, base, recursive)
        except KeyError:
            raise HubError(
                404, f"{base} does not exist on {commit.sha}", "EntryNotFound", {"X-Repo-Commit": commit.sha}
            ) from None
        self._send_json(items)

    def _paths_info(self, repo: Repo, commit: Commit) -> None:
        if "json" in self.headers.get("Content-Type", ""):
            paths = _expect(self._json_body().get("paths") or [], list, "'paths'")
        else:  # the client sends a form, `paths` repeated
            paths = parse_qs(self.body.decode(errors="replace")).get("paths", [])
        items = []
        for path in dict.fromkeys(
            _expect(p, str, "Each path").strip("/") for p in paths
        ):  # unknown paths are skipped, like the Hub
            if path in commit.files:
                items.append(commit.files[path].tree_item(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append(_folder_item(commit.files, path))
        self._send_json(items)

    def _refs(self, repo: Repo) -> None:
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items())]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _list_commits(self, repo: Repo, head: Commit) -> None:
        history = []
        commit: Commit | None = head
        while commit is not None:
            history.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": USER_NAME}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(history)

    # --- upload --------------------------------------------------------------------------------------------------

    def _preupload(self, repo: Repo, commit: Commit) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "This test server does not support pull requests")
        answers = []
        for item in _expect(self._json_body().get("files") or [], list, "'files'"):
            item = _expect(item, dict, "Each file")
            path = _clean_repo_path(item.get("path"))
            sample = _b64decode(item.get("sample") or "", "'sample'")
            size = _expect(item.get("size") or 0, int, "'size'")
            mode = self.server.hub.state.upload_mode(path, sample, size, commit.files)
            # `shouldIgnore` is mandatory; `oid` of the current file lets the client skip unchanged files.
            answer: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in commit.files:
                answer["oid"] = commit.files[path].etag
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": commit.sha})

    def _commit(self, repo: Repo, branch: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "This test server does not support pull requests")
        try:
            lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid ndjson commit payload: {e}") from e
        commit = self.server.hub.state.commit(repo, branch, lines)
        url = f"{self._base_url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url, "commitMessage": commit.title})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        state = self.server.hub.state
        with state.lock:
            state.get_repo(repo_type, repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported (downloads go through /resolve)")
        objects = []
        for obj in _expect(payload.get("objects") or [], list, "'objects'"):
            oid, size = _expect(obj, dict, "Each object").get("oid"), obj.get("size")
            answer: dict[str, Any] = {"oid": str(oid), "size": size if isinstance(size, int) else 0}
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                answer["error"] = {"code": 422, "message": "oid must be a sha256 and size a non-negative int"}
            elif not state.has_blob(oid, size):  # an object without `actions` is already stored
                href = f"{self._base_url}/_lfs/{oid}"
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_object(self, method: str, oid: str, rest: list[str]) -> None:
        state = self.server.hub.state
        if not SHA256_RE.match(oid):
            raise HubError(400, f"Invalid LFS oid {oid!r}")
        if method == "PUT" and not rest:
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match oid {oid}")
            state.put_blob(self.body)
            return self._send(200)
        if method == "POST" and rest == ["verify"]:
            size = self._json_body().get("size")
            if not state.has_blob(oid, size if isinstance(size, int) else None):
                raise HubError(404, f"LFS object {oid} not found (or has another size)")
            return self._send_json({"message": "ok"})
        raise HubError(405, f"{method} not allowed here")

    # --- download ------------------------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        state = self.server.hub.state
        with state.lock:
            commit = state.get_repo(repo_type, repo_id).resolve(revision)
            entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'.encode("ascii", "replace").decode(),
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):  # anything else is ignored, as RFC 9110 allows
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
            else:  # suffix range: the last N bytes
                start = max(entry.size - int(match.group(2)), 0)
            if start >= entry.size or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        if self.command == "HEAD":
            return self._send(status, b"", headers)
        with state.blob_path(entry.sha256).open("rb") as f:
            f.seek(start)
            self._send(status, f.read(length), headers)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client connection must not keep the test process alive
    hub: HubServer


class HubServer:
    """A local Hub-compatible HTTP server on a background thread.

    Args:
        root: folder holding blobs and repo histories (created if missing).
        host: interface to bind.
        port: port to bind; 0 picks a free one (see `url`).
        verbose: log each request to stderr.

    Attributes:
        request_log: `(method, path)` of every request received, in order (path without the query string).
        status_log: `(method, path, status)` of every response sent.
        unhandled: `(method, raw path)` of requests no route matched (answered 404): what a new client flow needs.
        internal_errors: exceptions raised by this server's own code (answered 400, never 5xx); should stay empty.

    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.state = HubState(Path(root))
        self.host, self.port, self.verbose = host, port, verbose
        self.request_log: list[tuple[str, str]] = []
        self.status_log: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.internal_errors: list[str] = []
        self.log_lock = threading.Lock()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def netloc(self) -> str:
        """`host:port` the server listens on."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL to use as `HF_ENDPOINT`."""
        return f"http://{self.netloc}"

    def start(self) -> HubServer:
        """Bind and serve on a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        self._httpd = _HubHTTPServer((self.host, self.port), HubRequestHandler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None

    def clear_logs(self) -> None:
        """Forget logged requests, e.g. before the part of a test that asserts on them."""
        with self.log_lock:
            self.request_log.clear()
            self.status_log.clear()
            self.unhandled.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Serve until interrupted: `python tests/hub_server.py --port 8765 --root /tmp/hub`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--root", type=Path, required=True, help="folder for repos and blobs (kept across runs)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args()
    with HubServer(args.root, args.host, args.port, verbose=not args.quiet) as server:
        print(
            f"Serving a local Hub at {server.url} (root {args.root}); use HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1"
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
