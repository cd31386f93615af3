"""Pretrained weights by name: the registry, and download, cache and checksums against a local
HTTP server (nothing here reaches the internet)."""

import contextlib
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax.inference import load
from clip_jax.infra.errors import UsageError
from clip_jax.models import model_config
from clip_jax.weights import downloads, pretrained, state_dicts
from clip_jax.weights.pretrained import Source, Weights


class Server:
    """Serves `routes` (path -> (status, headers, body)) on 127.0.0.1 and records each request."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # A client that refuses a file before its body closes the connection.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # the Hub's metadata request: headers only
                server.hits.append(f"HEAD {self.path}")
                status, headers, body = server.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache (never ~/.cache) and a registry it may add entries to."""
    monkeypatch.setenv("CLIP_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "PRETRAINED", dict(pretrained.PRETRAINED))
    return tmp_path / "cache" / "weights"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A tiny clip_jax model exported as .safetensors: (bytes, sha256)."""
    cfg = model_config("tiny")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), state_dicts.abstract_variables(cfg)
    )
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    load.save_pretrained(str(path), variables, cfg)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def corrupt(data: bytes) -> bytes:
    return data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]


def register(tag: str, *sources: Source, **fields) -> None:
    pretrained.PRETRAINED["tiny"] = {
        **pretrained.PRETRAINED.get("tiny", {}),
        tag: Weights(sources, **fields),
    }


def files_under(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def test_download_lands_in_cache_verified_and_loads_once(server, weights_file, cache, capsys):
    data, sha = weights_file
    server.routes["/w/tiny.safetensors"] = (200, {}, data)
    register("local", Source(server.url("/w/tiny.safetensors"), sha), quick_gelu=True)

    model, variables = clip_jax.load_pretrained("tiny", pretrained="local")
    assert files_under(cache) == [
        "tiny/local/tiny.safetensors",
        "tiny/local/tiny.safetensors.sha256",
    ]
    assert (cache / "tiny/local/tiny.safetensors").read_bytes() == data
    assert (
        cache / "tiny/local/tiny.safetensors.sha256"
    ).read_text() == f"{sha}  tiny.safetensors\n"
    err = capsys.readouterr().err
    assert "downloading " + server.url("/w/tiny.safetensors") in err and "verified" in err
    assert model.quick_gelu  # the registry's setting, over the file's own config
    emb = model.apply(variables, np.zeros((2, 32, 32, 3), np.float32), method="encode_image")
    assert emb.shape == (2, 32) and np.isfinite(np.asarray(emb)).all()

    # Cached: no second request, whatever the tag's spelling.
    clip_jax.load_pretrained("tiny", pretrained="LOCAL")
    assert server.hits == ["/w/tiny.safetensors"]
    # The registry's fields yield to the caller's.
    model, _ = clip_jax.load_pretrained("tiny", pretrained="local", quick_gelu=False)
    assert not model.quick_gelu and len(server.hits) == 1


def test_checksum_mismatch_is_refused_and_nothing_is_kept(server, weights_file, cache):
    data, sha = weights_file
    bad = corrupt(data)
    server.routes["/bad.safetensors"] = (200, {}, bad)
    server.routes["/good.safetensors"] = (200, {}, data)
    url = server.url("/bad.safetensors")
    # A mismatch is final: the next source is not tried.
    register("local", Source(url, sha), Source(server.url("/good.safetensors"), sha))
    with pytest.raises(UsageError) as e:
        clip_jax.load_pretrained("tiny", pretrained="local")
    got = hashlib.sha256(bad).hexdigest()
    assert str(e.value) == (
        f"checksum mismatch for {url}: expected {sha}, got {got}; the file was not kept"
    )
    assert files_under(cache) == [] and server.hits == ["/bad.safetensors"]


def test_server_declared_sha256_verifies(server, weights_file, cache):
    data, sha = weights_file
    # A plain ETag that is a sha256.
    server.routes["/etag/tiny.safetensors"] = (200, {"ETag": f'"{sha}"'}, data)
    server.routes["/etag-bad/tiny.safetensors"] = (200, {"ETag": f'"{sha}"'}, corrupt(data))
    # Hugging Face's way: X-Linked-Etag on the redirect, a non-sha256 ETag on the CDN's answer.
    server.routes["/hf/resolve/main/tiny.safetensors"] = (
        302,
        {"Location": "/cdn/blob", "X-Linked-Etag": f'"{sha}"', "ETag": '"' + "a" * 40 + '"'},
        b"",
    )
    server.routes["/cdn/blob"] = (200, {"ETag": '"abc123"'}, data)
    register("etag", Source(server.url("/etag/tiny.safetensors")))
    register("etag_bad", Source(server.url("/etag-bad/tiny.safetensors")))
    register("hf", Source(server.url("/hf/resolve/main/tiny.safetensors")))

    assert pretrained.download("tiny", "etag").endswith("tiny/etag/tiny.safetensors")
    assert (cache / "tiny/etag/tiny.safetensors.sha256").read_text().split()[0] == sha
    path = pretrained.download("tiny", "hf")
    assert Path(path).read_bytes() == data and os.path.exists(path + ".sha256")
    with pytest.raises(UsageError, match=f"checksum mismatch .* expected {sha}, got"):
        pretrained.download("tiny", "etag_bad")
    assert not os.path.exists(cache / "tiny/etag_bad/tiny.safetensors")


def test_no_checksum_is_refused_unless_verify_false(server, weights_file, cache):
    data, _ = weights_file
    server.routes["/anon/tiny.safetensors"] = (200, {"ETag": '"d41d8cd98f00b204"'}, data)
    register("anon", Source(server.url("/anon/tiny.safetensors")))
    with pytest.raises(UsageError, match="no checksum is known .* pass verify=False"):
        clip_jax.load_pretrained("tiny", pretrained="anon")
    assert files_under(cache) == []

    clip_jax.load_pretrained("tiny", pretrained="anon", verify=False)
    assert files_under(cache) == [
        "tiny/anon/tiny.safetensors",
        "tiny/anon/tiny.safetensors.sha256.unverified",
    ]
    clip_jax.load_pretrained("tiny", pretrained="anon", verify=False)  # cached
    assert len(server.hits) == 2
    # An unchecked file is not trusted by a checking call.
    with pytest.raises(UsageError, match="no checksum is known"):
        pretrained.download("tiny", "anon")
    assert len(server.hits) == 3


# --- The Hugging Face Hub, through huggingface_hub, against a local server --------------------


def serve_hub_file(server, repo: str, filename: str, data: bytes, sha: str | None = None) -> None:
    """The Hub's answers for one file: the resolve URL redirects to a CDN on another host (here
    `localhost` for the Hub's 127.0.0.1) with the commit, the LFS file's sha256 as X-Linked-Etag
    and its size on the redirect itself (what huggingface_hub reads)."""
    etag = sha or hashlib.sha256(data).hexdigest()
    cdn = f"/cdn/{etag}"
    headers = {
        "Location": server.url(cdn).replace("127.0.0.1", "localhost"),
        "X-Repo-Commit": "c" * 40,
        "X-Linked-Etag": f'"{etag}"',
        "X-Linked-Size": str(len(data)),
        "ETag": f'"{etag}"',
    }
    server.routes[f"/{repo}/resolve/main/{filename}"] = (302, headers, b"")
    server.routes[cdn] = (200, {"ETag": f'"{etag}"'}, data)


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """huggingface_hub pointed at the local server (HF_ENDPOINT) with a cache of its own."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_ENDPOINT", server.url("").rstrip("/"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf"


def hub_source(repo: str, filename: str = "open_clip_model.safetensors") -> Source:
    return Source(f"https://huggingface.co/{repo}/resolve/main/{filename}", hub_repo=repo)


def test_hub_files_come_through_huggingface_hub_into_its_shared_cache(
    server, hub, weights_file, cache, capsys
):
    data, sha = weights_file
    serve_hub_file(server, "org/tiny", "open_clip_model.safetensors", data)
    register("hub", hub_source("org/tiny"))
    model, variables = clip_jax.load_pretrained("tiny", pretrained="hub")
    path = pretrained.download("tiny", "hub")
    assert path.startswith(str(hub)) and "models--org--tiny" in path
    assert os.path.basename(os.path.realpath(path)) == sha  # the Hub's blob, named by its sha256
    assert Path(path).read_bytes() == data and "verified" in capsys.readouterr().err
    assert files_under(cache) == [f".hub-verified/{sha}"]  # nothing else of ours: the Hub's cache
    gets = [h for h in server.hits if not h.startswith("HEAD")]
    assert gets == [f"/cdn/{sha}"]
    hits = len(server.hits)
    clip_jax.load_pretrained("tiny", pretrained="hub")  # cached: no request at all
    assert len(server.hits) == hits


def test_a_file_another_library_fetched_is_not_fetched_again(server, hub, weights_file, cache):
    from huggingface_hub import hf_hub_download

    data, sha = weights_file
    serve_hub_file(server, "org/tiny", "open_clip_model.safetensors", data)
    theirs = hf_hub_download("org/tiny", "open_clip_model.safetensors", endpoint=server.url(""))
    server.hits.clear()
    register("hub", hub_source("org/tiny"))
    assert pretrained.download("tiny", "hub") == theirs and server.hits == []


def test_a_corrupt_hub_file_is_refused_and_removed(server, hub, weights_file, cache):
    data, sha = weights_file
    serve_hub_file(server, "org/bad", "open_clip_model.safetensors", corrupt(data), sha=sha)
    register("bad", hub_source("org/bad"))
    with pytest.raises(UsageError, match=f"checksum mismatch .*: expected {sha}, got"):
        pretrained.download("tiny", "bad")
    assert not [f for f in files_under(hub) if "/blobs/" in f] and files_under(cache) == []


def test_hub_offline_mode_and_fall_over(server, hub, weights_file, cache, monkeypatch):
    data, sha = weights_file
    serve_hub_file(server, "org/tiny", "open_clip_model.safetensors", data)
    # The first file is missing on the Hub: the next source is tried.
    register("two", hub_source("org/tiny", "open_clip_pytorch_model.bin"), hub_source("org/tiny"))
    monkeypatch.setattr(downloads, "_has_torch", lambda: True)
    assert pretrained.download("tiny", "two").endswith("open_clip_model.safetensors")
    # Offline, a file not in the cache is one clear error; one in the cache loads.
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    register("other", hub_source("org/other"))
    with pytest.raises(UsageError, match="could not download tiny 'other': https://huggingface"):
        pretrained.download("tiny", "other")
    assert pretrained.download("tiny", "two").endswith("open_clip_model.safetensors")


def test_siglip_tags_load_with_their_preprocessing(server, hub):
    """`load_pretrained("ViT-B-16-SigLIP2", pretrained="webli")`: the file from the Hub repo
    open_clip names, the SigLIP architecture from its shapes, and open_clip's preprocessing."""
    weights = pretrained.lookup("ViT-B-16-SigLIP2", "webli")
    assert [s.hub_repo for s in weights.sources] == ["timm/ViT-B-16-SigLIP2"] * 2
    assert (weights.mean, weights.std, weights.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "squash")
    cfg = model_config("tiny-siglip")
    variables = jax.tree.map(
        lambda s: np.full(s.shape, 0.01, s.dtype), state_dicts.abstract_variables(cfg)
    )
    file = server_file = Path(hub).parent / "siglip.safetensors"
    load.save_pretrained(str(file), variables, cfg)
    serve_hub_file(
        server, "timm/tiny-siglip", "open_clip_model.safetensors", server_file.read_bytes()
    )
    register("webli", hub_source("timm/tiny-siglip"), mean=(0.5,) * 3, std=(0.5,) * 3)
    model, _ = clip_jax.load_pretrained("tiny", pretrained="webli")
    assert model.vision["pool_type"] == "map" and model.init_logit_bias is not None


def test_sources_fall_over_and_pytorch_files_are_skipped_without_torch(
    server, weights_file, cache, monkeypatch
):
    data, sha = weights_file
    server.routes["/b/tiny.safetensors"] = (200, {}, data)
    register(
        "mirrors",
        Source(server.url("/a/missing.safetensors"), sha),  # 404
        Source(server.url("/b/tiny.safetensors"), sha),
    )
    assert pretrained.download("tiny", "mirrors").endswith("tiny/mirrors/tiny.safetensors")
    assert server.hits == ["/a/missing.safetensors", "/b/tiny.safetensors"]
    assert pretrained.download("tiny", "mirrors")  # the second source's cached file
    assert len(server.hits) == 2

    register("none", Source(server.url("/x.safetensors"), sha), Source(server.url("/y.bin"), sha))
    with pytest.raises(UsageError) as e:
        pretrained.download("tiny", "none")
    assert "could not download tiny 'none'" in str(
        e.value
    ) and "/x.safetensors: HTTP Error 404" in str(e.value)
    assert "\n" not in str(e.value)

    monkeypatch.setattr(downloads, "_has_torch", lambda: False)
    server.hits.clear()
    register(
        "torch", Source(server.url("/m.pt"), sha), Source(server.url("/b/tiny.safetensors"), sha)
    )
    pretrained.download("tiny", "torch")
    assert server.hits == ["/b/tiny.safetensors"]
    register("torch_only", Source(server.url("/m.pt"), sha))
    with pytest.raises(UsageError, match="PyTorch files only: pip install torch"):
        pretrained.download("tiny", "torch_only")


def test_cache_location_and_stale_sidecar(server, weights_file, tmp_path, monkeypatch):
    data, sha = weights_file
    assert pretrained.weights_dir() == str(tmp_path / "cache" / "weights")
    assert pretrained.weights_dir("/some/dir") == "/some/dir"
    monkeypatch.delenv("CLIP_JAX_CACHE")
    assert pretrained.weights_dir() == os.path.expanduser("~/.cache/clip_jax/weights")

    server.routes["/tiny.safetensors"] = (200, {}, data)
    register("local", Source(server.url("/tiny.safetensors"), sha))
    mine = tmp_path / "mine"
    path = pretrained.download("tiny", "local", cache_dir=str(mine))
    assert path == str(mine / "tiny/local/tiny.safetensors")
    # A sidecar that disagrees with the registry's pinned hash is a cache miss.
    (mine / "tiny/local/tiny.safetensors.sha256").write_text("0" * 64 + "  tiny.safetensors\n")
    pretrained.download("tiny", "local", cache_dir=str(mine))
    assert len(server.hits) == 2
    assert (mine / "tiny/local/tiny.safetensors.sha256").read_text().split()[0] == sha


def test_unknown_names_and_tags_list_what_exists():
    with pytest.raises(
        UsageError,
        match="no pretrained weights 'nope' for ViT-B-32; its tags: openai, laion400m_e31",
    ):
        clip_jax.load_pretrained("ViT-B-32", pretrained="nope")
    with pytest.raises(
        UsageError,
        match="no pretrained weights for model 'ViT-B-99'; models with weights: RN50, .*ViT-B-32",
    ):
        pretrained.lookup("ViT-B-99", "openai")
    with pytest.raises(UsageError) as e:
        pretrained.lookup("ViT-B-32-quickgelu", "laion2b_s34b_b79k")
    assert "openai, laion400m_e31, laion400m_e32 " in str(e.value)
    with pytest.raises(
        UsageError, match="'ViT-B-32' is a model name, not a file: .*pretrained=TAG"
    ):
        clip_jax.load_pretrained("ViT-B-32")
    with pytest.raises(UsageError, match="apply to pretrained=TAG downloads only"):
        clip_jax.load_pretrained("model.safetensors", verify=False)


def test_registry_entries_are_models_we_have():
    pairs = clip_jax.list_pretrained()
    assert ("ViT-B-32", "openai") in pairs and ("ViT-B-32-quickgelu", "openai") in pairs
    assert ("ViT-L-14", "laion2b_s32b_b82k") in pairs and len(pairs) == len(set(pairs))
    for name, tag in pairs:
        cfg = model_config(name)  # -quickgelu names resolve to their base config
        weights = pretrained.lookup(name, tag)
        assert cfg.get("quick_gelu", False) <= weights.quick_gelu, (name, tag)
        assert weights.sources and all(s.url.startswith("https://") for s in weights.sources)
        for s in weights.sources:
            assert s.sha256 is None or len(s.sha256) == 64 and s.sha256 in s.url.split("/")
        if tag == "openai":  # OpenAI's own URL first, its sha256 in the path
            assert weights.quick_gelu and weights.sources[0].sha256
            assert weights.sources[0].url.startswith("https://openaipublic.azureedge.net/")
        assert any(s.url.endswith(".safetensors") for s in weights.sources)


def test_registry_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    theirs = set(open_clip.list_pretrained())
    for name, tag in clip_jax.list_pretrained():
        assert (name, tag) in theirs, (name, tag)
        cfg = open_clip.get_pretrained_cfg(name, tag)
        weights = pretrained.lookup(name, tag)
        assert weights.quick_gelu == cfg.get("quick_gelu", False), (name, tag)
        assert weights.mean == tuple(cfg["mean"]) and weights.std == tuple(cfg["std"]), (name, tag)
        assert weights.resize_mode == cfg.get("resize_mode", "shortest"), (name, tag)
        assert weights.interpolation == cfg.get("interpolation", "bicubic"), (name, tag)
        urls = [s.url for s in weights.sources]
        if cfg.get("url") and "openaipublic" in cfg["url"]:
            assert urls[0] == cfg["url"]
        repo = cfg["hf_hub"].rstrip("/")
        assert f"https://huggingface.co/{repo}/resolve/main/open_clip_pytorch_model.bin" in urls
        text = open_clip.get_model_config(name)["text_cfg"]
        if "hf_tokenizer_name" in text:  # SigLIP's: the tokenizer of the repository it names
            assert weights.tokenizer.endswith(f":hf-hub:{text['hf_tokenizer_name']}"), name
        else:
            assert weights.tokenizer == "clip_bpe", (name, tag)


def test_create_model_and_transforms_uses_the_weights_statistics(server, weights_file):
    data, sha = weights_file
    server.routes["/tiny.safetensors"] = (200, {}, data)
    register("half", Source(server.url("/tiny.safetensors"), sha), mean=(0.5,) * 3, std=(0.5,) * 3)
    model, variables, transform = clip_jax.create_model_and_transforms("tiny", pretrained="half")
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = transform(image)
    np.testing.assert_array_equal(
        x, clip_jax.preprocess(image, 32, mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    assert model.apply(variables, x, method="encode_image").shape == (1, 32)


def test_names_load_without_jax_torch_or_tensorflow():
    code = (
        "import sys, clip_jax; pairs = clip_jax.list_pretrained(); "
        "clip_jax.preprocess; assert ('ViT-B-32', 'openai') in pairs; "
        "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_a_siglip_tags_tokenizer_comes_from_its_hub_repository(server, hub, tmp_path, family):
    """`siglip2:hf-hub:REPO` reads REPO's tokenizer.json (what open_clip's configs load through
    transformers) and tokenizes as open_clip's SigLipTokenizer over the same Hugging Face
    tokenizer; each SigLIP tag names its repository."""
    transformers = pytest.importorskip("transformers")
    oc_tokenizer = pytest.importorskip("open_clip.tokenizer")
    from clip_jax.data import tokenizers
    from tests.test_siglip_tokenizers import AWKWARD, gemma_like, t5_like

    model = t5_like(tmp_path) if family == "siglip" else gemma_like(tmp_path)
    if family == "siglip":
        hf = transformers.T5TokenizerFast.from_pretrained(
            os.path.dirname(model), extra_ids=0, legacy=False
        )
    else:
        hf = transformers.GemmaTokenizerFast.from_pretrained(
            os.path.dirname(model),
            padding_side="right",
            add_bos_token=False,
            add_eos_token=True,
            legacy=False,
        )
    hf.save_pretrained(str(tmp_path / "saved"))
    data = (tmp_path / "saved" / "tokenizer.json").read_bytes()
    serve_hub_file(server, f"org/{family}", "tokenizer.json", data)
    hf.pad_token_id, hf.eos_token_id = (0 if family == "siglip2" else 1), 1
    ref = object.__new__(oc_tokenizer.SigLipTokenizer)
    ref.tokenizer, ref.context_length = hf, 16
    ours = tokenizers.get_tokenizer(f"{family}:hf-hub:org/{family}", 16)
    np.testing.assert_array_equal(ours(AWKWARD), ref(AWKWARD).numpy())
    hits = len(server.hits)
    tokenizers.get_tokenizer(f"{family}:hf-hub:org/{family}", 16)  # cached: no request
    assert len(server.hits) == hits
    with pytest.raises(UsageError, match="could not fetch org/none's tokenizer.json"):
        tokenizers.get_tokenizer(f"{family}:hf-hub:org/none")

    siglip2 = pretrained.lookup("ViT-B-16-SigLIP2", "webli").tokenizer
    assert siglip2 == "siglip2:hf-hub:timm/ViT-B-16-SigLIP2"
    assert pretrained.lookup("ViT-L-16-SigLIP-384", "webli").tokenizer == (
        "siglip:hf-hub:timm/ViT-B-16-SigLIP"
    )


def test_a_tag_loads_at_its_models_resolution(monkeypatch):
    """Shapes read 27 patches of 14 as 378 px; the -384 model takes 384 (open_clip's)."""
    monkeypatch.setattr(pretrained, "download", lambda *args, **kwargs: "file.safetensors")
    _, needs = pretrained.resolve("ViT-SO400M-14-SigLIP-384", "webli", cache_dir=None, verify=True)
    assert needs == {"quick_gelu": False, "vision": {"image_size": 384}}
    _, needs = pretrained.resolve("ViT-SO400M-14-SigLIP-378", "webli", cache_dir=None, verify=True)
    assert needs["vision"] == {"image_size": 378}
