"""Downloads of published weights, their caches and checksums (`pretrained`'s registry says what
to fetch; see its module docstring for the rules): OpenAI's URLs through urllib into
`weights_dir()`, Hugging Face Hub files through huggingface_hub into its own cache."""

import hashlib
import importlib.util
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from email.message import Message
from typing import Any

from clip_jax.infra import cache, hub
from clip_jax.infra.errors import UsageError

_TIMEOUT_S = 60  # per socket operation, so a dead mirror fails over instead of hanging
_TORCH_EXTS = (".pt", ".pth", ".bin")


def weights_dir(cache_dir: str | None = None) -> str:
    """Where downloaded weights live: `cache_dir`, `$CLIP_JAX_CACHE/weights` or
    `~/.cache/clip_jax/weights`."""
    if cache_dir is not None:
        return os.path.expanduser(cache_dir)
    root = os.environ.get("CLIP_JAX_CACHE") or os.path.join("~", ".cache", "clip_jax")
    return os.path.join(os.path.expanduser(root), "weights")


def fetch(
    sources: Sequence[Any], folder: str, what: str, *, cache_dir: str | None, verify: bool
) -> str:
    """The local path of the first of `sources` (`pretrained.Source`s) that is cached or can be
    downloaded and checked (see the module).

    Args:
      sources: the files of one checkpoint, in order of preference.
      folder: where URL files land under the weights directory, e.g. "ViT-B-32/openai".
      what: the checkpoint's name in errors, e.g. "ViT-B-32 'openai'".
      cache_dir: the weights directory (default: see `weights_dir`).
      verify: False also accepts a file for which no sha256 is known (a known one is checked).
    """
    folder = os.path.join(weights_dir(cache_dir), folder)
    sources = [s for s in sources if not _needs_torch(s.url) or _has_torch()]
    if not sources:
        raise UsageError(
            f"{what} is published as PyTorch files only: pip install torch to read them"
        )
    for source in sources:
        if source.hub_repo is not None:
            cached = _hub_cached(source, cache_dir)
            if cached is not None:
                return _check_hub_blob(cached, cache_dir, verify)
        elif _is_cached(_target(folder, source), source.sha256, verify):
            return _target(folder, source)
    failures = []
    for source in sources:
        try:
            if source.hub_repo is not None:
                return _hub_fetch(source, cache_dir, verify)
            cache.make_dir(folder, "the weights cache", "set CLIP_JAX_CACHE or pass cache_dir=")
            return _fetch(source, _target(folder, source), verify)
        except hub.fetch_errors() as e:  # URLError, HTTPError, timeouts, resets, the Hub's errors
            failures.append(f"{source.url}: {hub.first_line(e)}")
    raise UsageError(
        f"could not download {what}: {'; '.join(failures)}. Check the network, or "
        "download one of these files by hand and pass its path to load_pretrained"
    )


def _hub_cache(cache_dir: str | None) -> str | None:
    """huggingface_hub's cache for Hub files: its own default (shared with open_clip and timm), or
    `CACHE_DIR/hub` when the caller names a cache."""
    return None if cache_dir is None else os.path.join(os.path.expanduser(cache_dir), "hub")


def _hub_cached(source: Any, cache_dir: str | None) -> str | None:
    """The Hub file's path in huggingface_hub's cache, or None; no network."""
    return hub.cached(source.hub_repo, _filename(source.url), _hub_cache(cache_dir))


def _hub_fetch(source: Any, cache_dir: str | None, verify: bool) -> str:
    """Downloads a Hub file with huggingface_hub and checks it (`_check_hub_blob`)."""
    path = hub.download(source.hub_repo, _filename(source.url), _hub_cache(cache_dir))
    return _check_hub_blob(path, cache_dir, verify)


def _check_hub_blob(path: str, cache_dir: str | None, verify: bool) -> str:
    """A Hub file whose blob is named by its sha256 (LFS) is hashed once and checked; a marker
    remembers it. A mismatch removes the blob and its link: nothing corrupt stays cached."""
    blob = os.path.realpath(path)
    name = os.path.basename(blob).lower()
    if not (len(name) == 64 and all(c in "0123456789abcdef" for c in name)):
        if verify:
            raise UsageError(
                f"no checksum is known for {path} (the Hub stores it as a non-LFS file); pass "
                "verify=False to accept it unchecked"
            )
        return path
    marker = os.path.join(weights_dir(cache_dir), ".hub-verified", name)
    if os.path.isfile(marker):
        return path
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != name:
        for stale in (blob, path):
            if os.path.lexists(stale):
                os.remove(stale)
        raise UsageError(
            f"checksum mismatch for {path}: expected {name}, got {digest.hexdigest()}; the file "
            "was not kept"
        )
    cache.make_dir(os.path.dirname(marker), "the weights cache", "set CLIP_JAX_CACHE")
    with open(marker, "w") as f:
        f.write(f"{name}  {os.path.basename(path)}\n")
    print(f"{os.path.basename(path)}: sha256 {name} verified", file=sys.stderr)
    return path


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _needs_torch(url: str) -> bool:
    return os.path.splitext(_filename(url))[1].lower() in _TORCH_EXTS


def _filename(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def _target(folder: str, source: Any) -> str:
    return os.path.join(folder, _filename(source.url))


def _is_cached(path: str, pinned: str | None, verify: bool) -> bool:
    sidecars = [path + ".sha256"] + ([] if verify else [path + ".sha256.unverified"])
    for sidecar in sidecars:
        if os.path.isfile(path) and os.path.isfile(sidecar):
            with open(sidecar) as f:
                recorded = f.read().split(maxsplit=1)[:1]
            if recorded and (pinned is None or recorded[0] == pinned):
                return True
    return False


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of each redirect: Hugging Face declares the file's sha256 there."""

    def __init__(self) -> None:
        self.headers: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _declared_sha256(headers: list[Message]) -> str | None:
    """The first 64-hex `X-Linked-Etag`, else `ETag`, along the redirect chain."""
    for key in ("X-Linked-Etag", "ETag"):
        for h in headers:
            value = (h.get(key) or "").removeprefix("W/").strip('"').lower()
            if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
                return value
    return None


def _fetch(source: Any, path: str, verify: bool) -> str:
    from clip_jax import __version__

    redirects = _RecordRedirects()
    request = urllib.request.Request(source.url, headers={"User-Agent": f"clip_jax/{__version__}"})
    with urllib.request.build_opener(redirects).open(request, timeout=_TIMEOUT_S) as response:
        expected = source.sha256 or _declared_sha256([*redirects.headers, response.headers])
        if expected is None and verify:
            raise UsageError(
                f"no checksum is known for {source.url} (none in the registry, no sha256 ETag from "
                "the server); pass verify=False to accept it unchecked"
            )
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{_filename(path)}.")
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _copy(response, out, total, source.url, path)
            if expected is not None and digest != expected:
                raise UsageError(
                    f"checksum mismatch for {source.url}: expected {expected}, got {digest}; "
                    "the file was not kept"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    checked = expected is not None
    _write_sidecar(path, digest, ".sha256" if checked else ".sha256.unverified")
    print(
        f"{_filename(path)}: sha256 {digest} {'verified' if checked else 'NOT verified'}",
        file=sys.stderr,
    )
    return path


def _copy(response: Any, out: Any, total: int | None, url: str, path: str) -> str:
    """Streams the body to `out` with a progress line on stderr; returns its sha256."""
    print(f"downloading {url}\n  -> {path}", file=sys.stderr)
    tty = sys.stderr.isatty()
    digest, done = hashlib.sha256(), 0
    start = last = time.monotonic()
    while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if time.monotonic() - last >= (0.5 if tty else 10.0):
            last = time.monotonic()
            _progress(done, total, last - start, "\r" if tty else "\n")
    seconds = time.monotonic() - start
    print(
        f"  {done / 1e6:.1f} MB in {seconds:.1f} s, {done / 1e6 / max(seconds, 1e-6):.1f} MB/s",
        file=sys.stderr,
    )
    if total is not None and done != total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")
    return digest.hexdigest()


def _progress(done: int, total: int | None, seconds: float, end: str) -> None:
    """`  120.3 MB of 351.7 MB (34%), ETA 9 s, 25.1 MB/s`."""
    rate = done / max(seconds, 1e-6)
    line = f"  {done / 1e6:.1f} MB"
    if total:
        eta = (total - done) / rate if rate else 0.0
        line += f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%), ETA {eta:.0f} s"
    print(f"{line}, {rate / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)


def _write_sidecar(path: str, digest: str, suffix: str) -> None:
    tmp = f"{path}{suffix}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, path + suffix)
    stale = ".sha256.unverified" if suffix == ".sha256" else ".sha256"
    if os.path.exists(path + stale):
        os.remove(path + stale)
