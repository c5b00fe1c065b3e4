"""A local stand-in for the Hugging Face hub on 127.0.0.1, and the small repositories it serves.

`HubStub` answers the requests huggingface_hub makes for `hf_hub_download` and the model API the
way huggingface.co does:

* `HEAD`/`GET /{repo}/resolve/{revision}/{file}`: a small file answers 200 with its git blob id as
  `ETag`, `X-Repo-Commit` and `Content-Length`; a large (LFS) file answers 302 to a second server on
  another port (the CDN), carrying `X-Linked-Etag` (its sha256) and `X-Linked-Size`;
* a legacy repository name (`gpt2`) answers 307 with a relative `Location` to its canonical name
  (`openai-community/gpt2`), as the hub does since repositories moved under organisations;
* a missing file answers 404 with `X-Error-Code: EntryNotFound`, an unknown revision 404 with
  `RevisionNotFound`, an unknown repository 401 with `RepoNotFound`;
* `GET /api/models/{repo}[/revision/{rev}]` and `/api/models/{repo}/tree/{rev}[/{path}]`.

Two failure modes stand in for a broken endpoint: `mode="404"` answers 404 without hub headers to
every request, `mode="hang"` accepts connections and never answers. Every request is logged in
`requests` as (method, path, status).

The repositories carry small random weights under the exact names open_clip and transformers ask
for: `gpt2_repo` (a small GPT-2 and a byte-level BPE trained here) and `open_clip_repo` (an open_clip
model, either under `hf-hub:` naming with its own `open_clip_config.json` or under the name a
pretrained tag resolves to).
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
EOS = "<|endoftext|>"

# A small open_clip configuration with the layout of ViT-B-32 (224 px, 32 px patches, the CLIP BPE
# vocabulary and 77-token context) at a width and depth a CPU test can run.
SMALL_VIT_B_32 = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


class _Repo:
    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.id = repo_id
        self.files = dict(files)
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.commit = digest.hexdigest()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


class HubStub:
    """The hub on one port, its CDN on another; use as a context manager."""

    def __init__(self, mode: str = "ok"):
        if mode not in ("ok", "404", "hang"):
            raise ValueError(f"mode must be ok, 404 or hang, got {mode!r}")
        self.mode = mode
        self.repos: dict[str, _Repo] = {}
        self.aliases: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._release = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []

    def add_repo(self, repo_id: str, files: dict[str, bytes], alias: str | None = None) -> "HubStub":
        repo = _Repo(repo_id, files)
        self.repos[repo_id] = repo
        for data in repo.files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        if alias:
            self.aliases[alias] = repo_id
        return self

    def commit(self, repo_id: str) -> str:
        return self.repos[self.aliases.get(repo_id, repo_id)].commit

    # ------------------------------------------------------------------ serving

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> "HubStub":
        for handler in (_HubHandler, _CdnHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            server.stub = self
            server.handle_error = lambda request, address: None  # clients that gave up on a hang
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        self._release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fetched(self, repo_id: str, filename: str) -> bool:
        """A GET of the file answered 200 or a redirect (its bytes were then fetched from the CDN)."""
        path = f"/{repo_id}/resolve/"
        return any(m == "GET" and p.startswith(path) and p.endswith("/" + filename) and s in (200, 302)
                   for m, p, s in self.requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def stub(self) -> HubStub:
        return self.server.stub

    def log_message(self, format, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.stub.requests.append((self.command, self.path, status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(),
                   {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, head)

    def _failure_mode(self, head: bool) -> bool:
        if self.stub.mode == "hang":
            self.stub.requests.append((self.command, self.path, 0))
            self.stub._release.wait()
            self.close_connection = True
            return True
        if self.stub.mode == "404":
            self._send(404, b"Not Found", {"Content-Type": "text/plain"}, head)
            return True
        return False

    def do_HEAD(self):
        self.route(head=True)

    def do_GET(self):
        self.route(head=False)


class _HubHandler(_Handler):
    RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
    API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")

    def route(self, head: bool) -> None:
        if self._failure_mode(head):
            return
        path = unquote(urlsplit(self.path).path)
        if path in ("", "/"):
            self._send(200, b"<html>hub stub</html>", {"Content-Type": "text/html"}, head)
        elif m := self.RESOLVE.match(path):
            self.resolve(m["repo"], m["rev"], m["file"], head)
        elif m := self.API.match(path):
            self.api(m["repo"], m["kind"], m["rev"], m["path"], head)
        else:
            self._send(404, b"Not Found", {"Content-Type": "text/plain"}, head)

    def _repo(self, repo_id: str, rest: str, head: bool) -> _Repo | None:
        """The repository, or None once the answer (redirect to the canonical name, 401) is sent."""
        stub = self.stub
        if repo_id in stub.aliases:
            self._send(307, b"", {"Location": rest.replace(f"/{repo_id}/", f"/{stub.aliases[repo_id]}/", 1)
                                  if not rest.startswith("/api/") else
                                  rest.replace(f"/api/models/{repo_id}", f"/api/models/{stub.aliases[repo_id]}", 1)},
                       head)
            return None
        if repo_id not in stub.repos:
            self._json(401, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head)
            return None
        return stub.repos[repo_id]

    def _revision_ok(self, repo: _Repo, rev: str | None, head: bool) -> bool:
        if rev in (None, "main", repo.commit):
            return True
        self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound",
                                                       "X-Error-Message": "Invalid rev id"}, head)
        return False

    def resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, self.path, head)
        if repo is None or not self._revision_ok(repo, rev, head):
            return
        data = repo.files.get(filename)
        if data is None:
            self._json(404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                        "X-Repo-Commit": repo.commit}, head)
            return
        common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(filename):
            sha = hashlib.sha256(data).hexdigest()
            pointer = _lfs_pointer(data)
            self._send(302, b"", {**common, "Location": f"{self.stub.cdn}/blobs/{sha}?download=true",
                                  "ETag": f'"{git_blob_id(pointer)}"', "X-Linked-Etag": f'"{sha}"',
                                  "X-Linked-Size": len(data)}, head)
        else:
            self._send(200, data, {**common, "ETag": f'"{git_blob_id(data)}"',
                                   "Content-Type": "text/plain; charset=utf-8"}, head)

    def api(self, repo_id: str, kind: str | None, rev: str | None, path: str | None, head: bool) -> None:
        repo = self._repo(repo_id, self.path, head)
        if repo is None or not self._revision_ok(repo, rev, head):
            return
        if kind == "tree":
            prefix = (path or "").strip("/")
            entries, folders = [], set()
            for name in sorted(repo.files):
                if prefix and not name.startswith(prefix + "/"):
                    continue
                rest = name[len(prefix) + 1:] if prefix else name
                if "/" in rest:
                    folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                    continue
                data = repo.files[name]
                entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                if repo.is_lfs(name):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": len(_lfs_pointer(data))}
                entries.append(entry)
            if prefix and not entries and not folders:
                self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
                return
            entries += [{"type": "directory", "path": f, "size": 0, "oid": git_blob_id(f.encode())}
                        for f in sorted(folders)]
            self._json(200, entries, head=head)
            return
        self._json(200, {"_id": repo.commit[:24], "id": repo.id, "modelId": repo.id, "sha": repo.commit,
                         "private": False, "gated": False, "disabled": False, "tags": [], "downloads": 0,
                         "likes": 0, "siblings": [{"rfilename": n} for n in sorted(repo.files)]}, head=head)


class _CdnHandler(_Handler):
    def route(self, head: bool) -> None:
        if self._failure_mode(head):
            return
        sha = urlsplit(self.path).path.rsplit("/", 1)[-1]
        data = self.stub.blobs.get(sha)
        if data is None:
            self._send(404, b"Not Found", {"Content-Type": "text/plain"}, head)
            return
        start = 0
        if m := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
            start = int(m[1])
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(206 if start else 200, data[start:], headers, head)


# ---------------------------------------------------------------------- repositories


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def gpt2_repo(texts: list[str], width: int = 64, layers: int = 2, seed: int = 0) -> tuple[dict[str, bytes], object]:
    """The files of the `gpt2` repository that transformers reads, at a small width and depth.

    The tokenizer is a byte-level BPE trained on `texts` (the real GPT-2 vocabulary is not available
    to tests), saved as gpt2 ships it: vocab.json, merges.txt, tokenizer.json and a tokenizer_config.json
    holding only model_max_length; `<|endoftext|>` is its one special token. The model is a randomly
    initialised GPT2LMHeadModel on that vocabulary with gpt2's 1024 positions. Returns the files and
    the `tokenizers.Tokenizer`, the reference for what a loaded tokenizer must produce."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=[EOS], show_progress=False)
    eos = bpe.token_to_id(EOS)
    config = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=1024, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 32), bos_token_id=eos, eos_token_id=eos)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        folder = Path(tmp)
        GPT2LMHeadModel(config).save_pretrained(folder)
        bpe.save_model(str(folder))
        bpe.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
        files = _read_folder(folder)
    return files, bpe._tokenizer


def small_clip_weights(config: dict, seed: int = 0) -> bytes:
    """Seeded random weights of an open_clip CLIP built from `config`, as safetensors bytes. The model
    is built from the config directly, so this process's open_clip registry is left as it is."""
    import open_clip
    import torch
    from safetensors.torch import save

    cfg = dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                               quick_gelu=cfg.get("quick_gelu", False))
    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def open_clip_hub_repo(config: dict, seed: int = 0) -> dict[str, bytes]:
    """An `hf-hub:ORG/NAME` open_clip repository: open_clip_config.json and open_clip_model.safetensors."""
    cfg = {k: v for k, v in config.items()}
    hub_config = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                       "std": [0.26862954, 0.26130258, 0.27577711]}}
    return {"open_clip_config.json": json.dumps(hub_config, indent=2).encode(),
            "open_clip_model.safetensors": small_clip_weights(config, seed)}


def model_config_dir(folder: Path, name: str, config: dict) -> Path:
    """A folder holding `name`.json, for a subprocess to register with open_clip (see `sitecustomize`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(config, indent=2))
    return folder


SITECUSTOMIZE = '''\
"""Test hook: register the open_clip architectures in $HUB_STUB_MODEL_CONFIGS before anything runs,
so the installed `clipposter` script loads a small ViT-B-32 under its real name."""
import os

if os.environ.get("HUB_STUB_MODEL_CONFIGS"):
    import open_clip

    open_clip.add_model_config(os.environ["HUB_STUB_MODEL_CONFIGS"])
'''


def write_sitecustomize(folder: Path) -> Path:
    """A folder to put first on PYTHONPATH of a subprocess; see SITECUSTOMIZE."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder
