"""A local Hugging Face Hub for tests: the subset of the Hub HTTP API that huggingface_hub 2.4 calls (HUB_API.md).

Standard library + PyYAML, served by a `ThreadingHTTPServer` on 127.0.0.1 (a free port) in a daemon thread. It keeps
repos, commits and LFS objects in memory and implements: `whoami-v2`, repo create/delete, `validate-yaml` (with the
real Hub's rules that `base_model` and `datasets` are Hub ids, not local paths, and that
`model-index[..].dataset.config` is a string), `preupload`, the legacy LFS batch / PUT / verify protocol (clients run
with `HF_HUB_DISABLE_XET=1`), `commit` (ndjson), repo info, tree, paths-info, refs, commits, branch and tag creation,
and `resolve` with the
headers `hf_hub_download` relies on (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `X-Error-Code`,
`Range`). Writes need `Authorization: Bearer <token>`; private repos also need it to be read. Model repos, Space
repos (`repo_type="space"`, what `evaluate.load("<namespace>/<metric>")` reads from `/spaces/<id>/resolve/...`) and
dataset repos (`repo_type="dataset"`, what `datasets.load_dataset("<namespace>/<name>")` reads through HfFileSystem:
`GET /api/datasets/<id>` and `/revision/<sha>`, `/tree/<sha>[/<dir>]`, then `HEAD` of `README.md`, `<name>.py`,
`.huggingface.yaml`, `dataset_infos.json` (404s it expects) and `HEAD`/`GET` of the data files under
`/datasets/<id>/resolve/<sha>/...`); a Space is held under the key `spaces/<namespace>/<name>` of `HubState.repos`,
a dataset repo under `datasets/<namespace>/<name>` (`REPO_PREFIXES`).

huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported, and the test suite runs offline, so
clients of this server run in subprocesses started with [`hub_env`].
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml

USER = "hfkd-test"
# Where each repo type lives in `HubState.repos` and in URLs (`/api/spaces/...`, `/datasets/<id>/resolve/...`).
REPO_PREFIXES = {"model": "", "space": "spaces/", "dataset": "datasets/"}
LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".zip", ".gz", ".png")
LFS_MIN_SIZE = 10 * 2**20
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_hub_id(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= 96
        and bool(_HUB_ID.match(value))
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def validate_card(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a README, with the rules of the Hub's validate-yaml that hf_kd relies on."""
    match = _YAML_BLOCK.search(content)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as error:
        return [f"Invalid YAML: {error}"], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["Metadata must be a YAML mapping"], []
    errors = []
    for key in ("base_model", "datasets"):
        values = data.get(key)
        if values is None:
            continue
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            if not is_hub_id(value):
                errors.append(f'"{key}[{i}]" with value "{value}" is not valid. It must be a valid {key} id.')
    model_index = data.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            errors.append('"model-index" must be an array')
        for i, entry in enumerate(model_index or []):
            if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), list):
                errors.append(f'"model-index[{i}]" must have a "name" and a "results" array')
                continue
            for j, result in enumerate(entry["results"]):
                where = f"model-index[{i}].results[{j}]"
                dataset = result.get("dataset") or {}
                if "type" not in (result.get("task") or {}):
                    errors.append(f'"{where}.task.type" is required')
                if "type" not in dataset or "name" not in dataset:
                    errors.append(f'"{where}.dataset" must have a "type" and a "name"')
                if "config" in dataset and not isinstance(dataset["config"], str):
                    errors.append(f'"{where}.dataset.config" must be a string')
                for k, metric in enumerate(result.get("metrics") or []):
                    if "type" not in metric or "value" not in metric:
                        errors.append(f'"{where}.metrics[{k}]" must have a "type" and a "value"')
    return errors, []


@dataclass
class StoredFile:
    content: bytes
    lfs_oid: str | None = None  # sha256 of an LFS file

    @property
    def oid(self) -> str:
        return self.lfs_oid or git_blob_sha1(self.content)


@dataclass
class Commit:
    sha: str
    files: dict[str, StoredFile]
    title: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, self.tags.get(revision, revision))
        return self.commits.get(sha)


class HubState:
    """Everything the server holds, shared with the tests (read it to check what a client sent)."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.received_bodies: list[bytes] = []
        self.fail_next_commits = 0  # answer the next N commits with a 500 (an interrupted push)
        self.lock = threading.Lock()

    def new_commit(self, repo: Repo, files: dict[str, StoredFile], title: str, branch: str = "main") -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(
            json.dumps([parent, title, sorted((p, f.oid) for p, f in files.items()), time.time_ns()]).encode()
        ).hexdigest()
        commit = Commit(digest, files, title, parent, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[digest] = commit
        repo.branches[branch] = digest
        return commit


def _entry(path: str, stored: StoredFile) -> dict:
    entry = {"type": "file", "path": path, "size": len(stored.content), "oid": git_blob_sha1(stored.content)}
    if stored.lfs_oid:
        # For LFS files the git blob is the pointer file; clients use the lfs block.
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{stored.lfs_oid}\nsize {len(stored.content)}\n"
        )
        entry["oid"] = git_blob_sha1(pointer.encode())
        entry["lfs"] = {"oid": stored.lfs_oid, "size": len(stored.content), "pointerSize": len(pointer)}
    return entry


class _Handler(BaseHTTPRequestHandler):
    server_version = "hfkd-test-hub/1.0"
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # silence stderr; requests are recorded in state.requests
        pass

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.state.received_bodies.append(body)
        return body

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.state.requests.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _require_auth(self) -> bool:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self._require_auth():
            return None
        return repo

    # ---- routing -----------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def do_PUT(self):
        self._route()

    def do_DELETE(self):
        self._route()

    def _route(self):
        try:
            with self.state.lock:
                self._dispatch()
        except Exception as error:  # a bug in the test server must show up as a 500, not hang the client
            self._error(500, f"test hub server error: {type(error).__name__}: {error}")

    def _dispatch(self):
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        method = self.command
        if path == "/api/agent-harnesses":
            return self._error(404, "Not found")
        if path == "/api/whoami-v2" and method == "GET":
            if not self._require_auth():
                return
            return self._send(200, {"name": USER, "type": "user", "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(self._body() or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            errors, warnings = validate_card(json.loads(self._body()).get("content", ""))
            messages = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self._send(400 if errors else 200, messages)
        match = re.fullmatch(r"/lfs/([0-9a-f]{64})(/verify)?", path)
        if match:
            return self._lfs_object(match.group(1), verify=bool(match.group(2)))
        match = re.fullmatch(r"/((?:spaces/|datasets/)?[^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if match and method == "POST":
            return self._lfs_batch(match.group(1), json.loads(self._body()))
        match = re.fullmatch(r"/api/(models|spaces|datasets)/([^/]+/[^/]+)(?:/(.*))?", path)
        if match:
            prefix = "" if match.group(1) == "models" else match.group(1) + "/"
            return self._api(prefix + match.group(2), match.group(3) or "", query)
        match = re.fullmatch(r"/((?:spaces/|datasets/)?[^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and method in ("GET", "HEAD"):
            return self._resolve(*match.groups())
        return self._error(404, f"Not found: {method} {path}")

    # ---- repos -------------------------------------------------------------------------------------------------

    def _create_repo(self, request: dict):
        if not self._require_auth():
            return
        repo_type = request.get("type", "model")
        if repo_type not in REPO_PREFIXES:
            return self._error(400, f"unknown repo type {repo_type!r}")
        if repo_type == "space" and not request.get("sdk"):
            return self._error(400, "a Space needs an sdk")
        repo_id = f"{request.get('organization') or USER}/{request['name']}"
        if not is_hub_id(repo_id):
            return self._error(400, f"Invalid repo name {repo_id!r}")
        repo_id = REPO_PREFIXES[repo_type] + repo_id
        endpoint = f"http://{self.headers.get('Host')}"
        if repo_id in self.state.repos:
            return self._send(409, {"error": f"You already created this {repo_type} repo",
                                    "url": f"{endpoint}/{repo_id}"})
        private = request.get("private") or request.get("visibility") == "private"
        repo = Repo(repo_id, bool(private))
        self.state.repos[repo_id] = repo
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
        self.state.new_commit(repo, {".gitattributes": StoredFile(attributes)}, "initial commit")
        return self._send(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: dict):
        if not self._require_auth():
            return
        repo_id = f"{request.get('organization') or USER}/{request['name']}"
        repo_id = REPO_PREFIXES.get(request.get("type") or "model", "") + repo_id
        if self.state.repos.pop(repo_id, None) is None:
            return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self._send(200, {})

    def _info(self, repo: Repo, commit: Commit) -> dict:
        card_data = None
        readme = commit.files.get("README.md")
        if readme is not None:
            match = _YAML_BLOCK.search(readme.content.decode("utf-8", "replace"))
            card_data = yaml.safe_load(match.group(2)) if match else None
        repo_id = repo.repo_id.removeprefix("spaces/").removeprefix("datasets/")
        return {
            "_id": repo_id,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": (card_data or {}).get("tags") or [],
            "cardData": card_data,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }

    def _api(self, repo_id: str, rest: str, query: dict):
        method = self.command
        write = method == "POST" and rest.split("/")[0] in ("preupload", "commit", "branch", "tag")
        repo = self._repo(repo_id, write=write)
        if repo is None:
            return None
        parts = rest.split("/") if rest else []
        if method == "GET" and (not parts or parts[0] == "revision"):
            commit = repo.resolve("/".join(parts[1:]) if parts else "main")
            if commit is None:
                return self._error(404, f"Revision not found: {rest}", "RevisionNotFound")
            return self._send(200, self._info(repo, commit))
        if method == "GET" and parts[0] == "tree":
            commit = repo.resolve(parts[1])
            if commit is None:
                return self._error(404, f"Revision not found: {parts[1]}", "RevisionNotFound")
            return self._send(200, self._tree(commit, "/".join(parts[2:]), query.get("recursive", ["false"])[0]))
        if method == "POST" and parts[0] == "paths-info":
            commit = repo.resolve(parts[1])
            if commit is None:
                return self._error(404, f"Revision not found: {parts[1]}", "RevisionNotFound")
            body = self._body().decode()
            fields = parse_qs(body) if "application/x-www-form-urlencoded" in self.headers.get("Content-Type", "") \
                else json.loads(body or "{}")
            paths = fields.get("paths", [])
            return self._send(200, [_entry(p, commit.files[p]) for p in paths if p in commit.files])
        if method == "GET" and parts[0] == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()]
            return self._send(200, {"branches": branches, "tags": tags, "converts": []})
        if method == "POST" and parts[0] in ("branch", "tag"):
            request = json.loads(self._body() or b"{}")
            name = unquote("/".join(parts[1:]))
            if parts[0] == "branch":
                start, refs, new = request.get("startingPoint") or "main", repo.branches, name
            else:
                start, refs, new = name, repo.tags, request["tag"]
            commit = repo.resolve(start)
            if commit is None:
                return self._error(404, f"Revision not found: {start}", "RevisionNotFound")
            if new in refs:
                return self._error(409, f"Reference already exists: {new}")
            refs[new] = commit.sha
            return self._send(200, {})
        if method == "GET" and parts[0] == "commits":
            commit, history = repo.resolve(parts[1]), []
            while commit is not None:
                history.append({"id": commit.sha, "title": commit.title, "message": "",
                                "authors": [{"user": USER}], "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._send(200, history)
        if method == "POST" and parts[0] == "preupload":
            return self._preupload(repo, unquote(parts[1]), json.loads(self._body()))
        if method == "POST" and parts[0] == "commit":
            return self._commit(repo, unquote("/".join(parts[1:])), self._body())
        return self._error(404, f"Not found: {method} /api/.../{repo_id}/{rest}")

    def _tree(self, commit: Commit, prefix: str, recursive: str) -> list[dict]:
        prefix = prefix.strip("/")
        entries, directories = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                directories.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if recursive == "true" or len(parts) == 1:
                entries.append(_entry(path, commit.files[path]))
        for directory in sorted(directories):
            depth = directory.count("/") - (prefix.count("/") + 1 if prefix else 0)
            if recursive == "true" or depth == 0:
                entries.append({"type": "directory", "path": directory, "oid": git_blob_sha1(directory.encode()),
                                "size": 0})
        return entries

    # ---- uploads -----------------------------------------------------------------------------------------------

    def _preupload(self, repo: Repo, revision: str, request: dict):
        head = repo.resolve(revision)
        if head is None:
            return self._error(404, f"Revision not found: {revision}", "RevisionNotFound")
        answers = []
        for item in request.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            binary = b"\0" in sample
            try:
                sample.decode("utf-8")
            except UnicodeDecodeError:
                binary = True
            lfs = item["size"] >= LFS_MIN_SIZE or item["path"].endswith(LFS_EXTENSIONS) or binary
            existing = head.files.get(item["path"])
            answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": existing.oid if existing is not None else None})
        return self._send(200, {"files": answers, "commitOid": head.sha})

    def _lfs_batch(self, repo_id: str, request: dict):
        if self._repo(repo_id, write=True) is None:
            return None
        endpoint = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in request.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{endpoint}/lfs/{obj['oid']}"},
                    "verify": {"href": f"{endpoint}/lfs/{obj['oid']}/verify"},
                }
            objects.append(answer)
        return self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_object(self, oid: str, verify: bool):
        if verify:
            request = json.loads(self._body())
            stored = self.state.lfs_objects.get(oid)
            if stored is None or len(stored) != request.get("size"):
                return self._error(404, f"LFS object {oid} not found")
            return self._send(200, {})
        if self.command != "PUT":
            return self._error(405, "LFS objects are uploaded with PUT")
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "LFS object content does not match its oid")
        self.state.lfs_objects[oid] = content
        return self._send(200, {})

    def _commit(self, repo: Repo, revision: str, body: bytes):
        if self.state.fail_next_commits > 0:
            self.state.fail_next_commits -= 1
            return self._error(500, "Internal Error - simulated interrupted push")
        head = repo.resolve(revision)
        if head is None:
            return self._error(404, f"Revision not found: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "the first ndjson line of a commit must be its header")
        header, files = lines[0]["value"], dict(head.files)
        if header.get("parentCommit") and header["parentCommit"] != head.sha:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(content, lfs_oid=value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return self._error(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                for path in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[path]
            else:
                return self._error(400, f"unknown commit operation {key!r}")
        if "README.md" in files:
            errors, _ = validate_card(files["README.md"].content.decode("utf-8", "replace"))
            if errors:
                return self._error(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
        commit = self.state.new_commit(repo, files, header.get("summary", ""), branch=revision)
        endpoint = f"http://{self.headers.get('Host')}"
        return self._send(200, {"commitUrl": f"{endpoint}/{repo.repo_id}/commit/{commit.sha}",
                                "commitOid": commit.sha, "success": True})

    # ---- downloads ---------------------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_id)
        if repo is None:
            return None
        commit = repo.resolve(unquote(revision))
        if commit is None:
            return self._error(404, f"Revision not found: {revision}", "RevisionNotFound")
        stored = commit.files.get(path)
        if stored is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.oid}"', "Accept-Ranges": "bytes"}
        if stored.lfs_oid:
            headers["X-Linked-Etag"] = f'"{stored.lfs_oid}"'
            headers["X-Linked-Size"] = len(stored.content)
        content, status = stored.content, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        return self._send(status, headers=headers, body=content)


class HubServer:
    """A running local Hub. `url` is its endpoint; `state` is what it holds."""

    def __init__(self, token: str):
        self.state = HubState(token)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state  # type: ignore[attr-defined]
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hfkd-test-hub", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Content of a file at a revision, for assertions."""
        return self.state.repos[repo_id].resolve(revision).files[path].content


def hub_env(server: HubServer, home: str | os.PathLike, token: str | None = None) -> dict[str, str]:
    """Environment for a subprocess that talks to `server`: online, no Xet, a fresh cache and HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    home = Path(home)
    env.update(
        HF_ENDPOINT=server.url,
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(home / "hf_home"),
        HF_HUB_CACHE=str(home / "hub_cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env
