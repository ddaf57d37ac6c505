"""Pretrained weights by URL, against a loopback HTTP server the test starts (no outside network):
download once into the cache, cache hit, checksum mismatch, interrupted download, server missing,
detectron2:// model-zoo paths, and the same strict loading as local files for every weights key."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import socket
import threading

import pytest
import torch
from _detection_common import R18_FPN_TOY, make_cfg
from detectron2.modeling import build_model

from nst_det.checkpoint import remote
from nst_det.checkpoint.remote import WeightsDownloadError, cached_path, resolve_weights
from nst_det.engine.checkpointer import ReliableCheckpointer
from nst_det.modeling.classification import build_classifier
from nst_det.modeling.classification.weights import load_classifier_weights
from nst_det.modeling.teacher import read_weights


class _Server:
    """Serves `files` ({url path with its query: bytes}) on 127.0.0.1. Prefixes that send half
    the body and hang up: /cut/<path> after announcing the whole length, /nolen/<path> without a
    Content-Length, /chunked/<path> as one chunk announced whole."""

    def __init__(self):
        self.files, self.hits = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.hits.append(self.path)
                how, _, rest = self.path[1:].partition("/")
                cut = how in ("cut", "nolen", "chunked")
                body = server.files.get("/" + rest if cut else self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if how == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                elif how != "nolen":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if how == "chunked":
                    self.wfile.write(f"{len(body):x}\r\n".encode())
                self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(remote.CACHE_ENV, str(folder))
    return folder


def _cached_files(folder):
    """Every file in the cache except the lock files (kept apart in .locks/)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and ".locks" not in p.parts)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _hub_name(stem: str, data: bytes, ext=".pth") -> str:
    """torchvision's naming: <stem>-<first 8 hex digits of the sha256>.pth"""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{ext}"


def test_download_once_then_cache_hit(server, cache):
    data = _torch_bytes({"w": torch.randn(3 << 18)})  # 3 MiB: several reads
    name = _hub_name("resnet18", data)
    server.files[f"/models/{name}"] = data
    url = f"{server.url}/models/{name}"
    local = resolve_weights(url, "MODEL.WEIGHTS")
    assert local == str(cache / name)  # torch.hub's layout: shared with load_state_dict_from_url
    assert open(local, "rb").read() == data
    assert _cached_files(cache) == [name]
    assert resolve_weights(url) == local and server.hits == [f"/models/{name}"]  # cache hit
    assert resolve_weights("some/local.pth") == "some/local.pth"  # local paths pass through


def test_url_without_digest_cached_by_host_and_path(server, cache):
    data = _torch_bytes({"w": torch.ones(10)})
    server.files["/a/model_final.pth"] = data
    local = resolve_weights(f"{server.url}/a/model_final.pth")
    assert local.startswith(str(cache / "url")) and local.endswith(os.path.join("a",
                                                                                "model_final.pth"))
    assert open(local, "rb").read() == data


def test_a_cached_path_stays_in_the_cache(cache):
    for url in ("detectron2://../../etc/x.pkl", "https://h/../../x/model.pth"):
        assert os.path.realpath(cached_path(url)).startswith(os.path.realpath(cache) + os.sep)
    assert cached_path("detectron2://COCO-Detection/m.pkl") == os.path.join(
        cache, "detectron2", "COCO-Detection", "m.pkl")


def test_urls_differing_in_their_query_are_two_files(server, cache):
    """Hosts such as Google Drive name the file in the query (uc?export=download&id=...)."""
    one, two = (_torch_bytes({"w": torch.full((2,), v)}) for v in (1.0, 2.0))
    server.files["/uc?export=download&id=1"], server.files["/uc?export=download&id=2"] = one, two
    first = resolve_weights(f"{server.url}/uc?export=download&id=1")
    second = resolve_weights(f"{server.url}/uc?export=download&id=2")
    assert first != second
    assert open(first, "rb").read() == one and open(second, "rb").read() == two
    assert resolve_weights(f"{server.url}/uc?export=download&id=1") == first  # a cache hit
    assert len(server.hits) == 2


@pytest.mark.parametrize("name", ["model_final.pth", "model_final.pkl"])
def test_a_download_cut_short_without_its_length_or_a_web_page_is_not_cached(
        server, cache, name):
    """Without a Content-Length a body cut short ends like a whole one: the bytes are read as
    weights (a .pkl only walked through, not unpickled) before they are cached."""
    whole = _torch_bytes({"w": torch.randn(1 << 16)}) if name.endswith(".pth") else \
        pickle.dumps({"model": {"w": list(range(1 << 14))}}, protocol=2)
    server.files[f"/w/{name}"] = whole
    url = f"{server.url}/nolen/w/{name}"
    with pytest.raises(WeightsDownloadError, match=f"download of MODEL.WEIGHTS={url} is not a "
                                                   "whole weights file"):
        resolve_weights(url, "MODEL.WEIGHTS")
    assert _cached_files(cache) == []
    server.files[f"/page/{name}"] = b"<!DOCTYPE html><html>Sign in to download</html>"
    with pytest.raises(WeightsDownloadError, match="is not a whole weights file"):
        resolve_weights(f"{server.url}/page/{name}", "MODEL.WEIGHTS")
    assert _cached_files(cache) == []
    local = resolve_weights(f"{server.url}/w/{name}")  # the whole file is cached
    assert open(local, "rb").read() == whole


def test_a_chunked_download_cut_short_names_the_url(server, cache):
    server.files["/w/model_final.pth"] = _torch_bytes({"w": torch.randn(1 << 16)})
    url = f"{server.url}/chunked/w/model_final.pth"
    with pytest.raises(WeightsDownloadError, match=f"cannot download MODEL.WEIGHTS={url} "
                                                   r"\(IncompleteRead"):
        resolve_weights(url, "MODEL.WEIGHTS")
    assert _cached_files(cache) == []


def test_checksum_mismatch_leaves_nothing(server, cache):
    data = os.urandom(100_000)
    name = _hub_name("resnet50", b"other bytes")  # the digest of something else
    server.files[f"/models/{name}"] = data
    url = f"{server.url}/models/{name}"
    with pytest.raises(WeightsDownloadError, match=r"checksum mismatch for MODEL.TEACHER.WEIGHTS="
                       + url.replace(".", r"\.") + ".*sha256 starting"):
        resolve_weights(url, "MODEL.TEACHER.WEIGHTS")
    assert _cached_files(cache) == []


def test_interrupted_download_leaves_nothing(server, cache):
    server.files["/w/model_final.pkl"] = os.urandom(2 << 20)
    url = f"{server.url}/cut/w/model_final.pkl"
    with pytest.raises(WeightsDownloadError, match=f"{url}.*interrupted|cannot download {url}"):
        resolve_weights(url)
    assert _cached_files(cache) == []


def test_missing_server_and_missing_file_name_the_url(server, cache):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/models/resnet18-f37072fd.pth"
    with pytest.raises(WeightsDownloadError, match=f"cannot download MODEL.WEIGHTS={url}"):
        resolve_weights(url, "MODEL.WEIGHTS")
    with pytest.raises(WeightsDownloadError, match=f"{server.url}/nothing.pth: HTTP 404"):
        resolve_weights(f"{server.url}/nothing.pth")
    assert _cached_files(cache) == []


def _folders(cache):
    """The cache's folders besides .locks/."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.is_dir() and ".locks" not in p.parts)


def test_a_url_urllib_cannot_send_names_the_url_and_leaves_no_folders(server, cache):
    url = f"{server.url}/mod\u00e8le/w.pth"  # non-ASCII: urllib raised a bare UnicodeEncodeError
    with pytest.raises(WeightsDownloadError, match=f"cannot download MODEL.WEIGHTS={url} "
                                                   r"\(UnicodeEncodeError"):
        resolve_weights(url, "MODEL.WEIGHTS")
    with pytest.raises(WeightsDownloadError, match=r"MODEL.WEIGHTS=http://\[::1/w.pth is not a "
                                                   "valid URL"):
        resolve_weights("http://[::1/w.pth", "MODEL.WEIGHTS")
    assert _folders(cache) == [] and _cached_files(cache) == []


def test_an_unwritable_cache_is_named_with_what_to_do(server, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(remote.CACHE_ENV, str(blocker / "cache"))  # (root ignores permissions)
    url = f"{server.url}/w/model.pth"
    with pytest.raises(WeightsDownloadError, match=f"cannot download MODEL.WEIGHTS={url}: the "
                       f"weights cache {blocker / 'cache'} cannot be written .*{remote.CACHE_ENV}"):
        resolve_weights(url, "MODEL.WEIGHTS")


def test_a_full_disk_is_a_disk_full_error_not_a_network_error(server, cache, monkeypatch):
    import contextlib
    import errno

    from nst_det.utils.atomic import DiskFullError

    @contextlib.contextmanager
    def full(path, *args, **kwargs):  # what atomic_write raises on ENOSPC
        raise DiskFullError(errno.ENOSPC, f"No space left on device while writing {path}")
        yield

    server.files["/w/model.pth"] = _torch_bytes({"w": torch.ones(2)})
    monkeypatch.setattr(remote, "atomic_write", full)
    with pytest.raises(DiskFullError, match="No space left"):
        resolve_weights(f"{server.url}/w/model.pth", "MODEL.WEIGHTS")
    assert _folders(cache) == []


def test_detectron2_zoo_path_downloads_from_the_zoo(server, cache, monkeypatch):
    monkeypatch.setattr(remote, "DETECTRON2_URL", f"{server.url}/detectron2/")
    zoo = pickle.dumps({"model": {"w": [1.0, 2.0]}, "__author__": "torchvision"})
    server.files["/detectron2/ImageNetPretrained/torchvision/R-50.pkl"] = zoo
    local = resolve_weights("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    assert local == cached_path("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    assert local == str(cache / "detectron2" / "ImageNetPretrained" / "torchvision" / "R-50.pkl")
    assert open(local, "rb").read() == zoo


def test_default_zoo_url_is_detectron2s():
    from detectron2.utils.file_io import Detectron2Handler

    # where detectron2's own PathManager handler resolves detectron2:// (it does not verify)
    assert Detectron2Handler.S3_DETECTRON2_PREFIX == remote.DETECTRON2_URL


# ---- every weights key: a URL loads with the same strict checks as a local file ----

def test_classifier_weights_by_url_load_strictly(server, cache):
    torch.manual_seed(0)
    source = build_classifier("resnet18", 5)
    data = _torch_bytes(source.state_dict())
    name = _hub_name("resnet18", data)
    server.files[f"/models/{name}"] = data
    target = build_classifier("resnet18", 5)
    load_classifier_weights(target, f"{server.url}/models/{name}")
    torch.testing.assert_close(target.state_dict(), source.state_dict())
    # a file for another network fails as it would locally, naming the keys
    with pytest.raises((KeyError, ValueError), match="fc"):
        load_classifier_weights(build_classifier("resnet18", 7), f"{server.url}/models/{name}")


def _toy_detector():
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.NORM", "FrozenBN"])
    torch.manual_seed(1)
    return cfg, build_model(cfg)


def test_teacher_and_detector_weights_by_url(server, cache, tmp_path):
    _, model = _toy_detector()
    data = _torch_bytes({"model": model.state_dict()})
    server.files["/runs/teacher/model_final.pth"] = data
    url = f"{server.url}/runs/teacher/model_final.pth"
    state = read_weights(url)  # MODEL.TEACHER.WEIGHTS
    torch.testing.assert_close(state, model.state_dict())
    student = build_model(make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.NORM", "FrozenBN"]))
    ReliableCheckpointer(student, str(tmp_path / "out")).resume_or_load(url, resume=False)
    torch.testing.assert_close(student.state_dict(), model.state_dict())
    assert server.hits.count("/runs/teacher/model_final.pth") == 1  # downloaded once


def test_zoo_pkl_by_url_initialises_backbone_strictly(server, cache, tmp_path, monkeypatch):
    """A detectron2:// model-zoo .pkl (backbone-only names, detectron2's matching heuristics)
    fills the student's bottom-up network; one missing backbone tensor is an error."""
    monkeypatch.setattr(remote, "DETECTRON2_URL", f"{server.url}/detectron2/")
    _, source = _toy_detector()
    bottom_up = {k: v.numpy() for k, v in source.backbone.bottom_up.state_dict().items()}
    zoo = {"model": bottom_up, "__author__": "torchvision", "matching_heuristics": True}
    server.files["/detectron2/ImageNetPretrained/toy/R-18.pkl"] = pickle.dumps(zoo)
    student = build_model(make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.NORM", "FrozenBN"]))
    ReliableCheckpointer(student, str(tmp_path / "a")).resume_or_load(
        "detectron2://ImageNetPretrained/toy/R-18.pkl", resume=False)
    torch.testing.assert_close(student.backbone.bottom_up.state_dict(),
                               source.backbone.bottom_up.state_dict())
    del bottom_up["res3.0.conv1.weight"]
    server.files["/detectron2/ImageNetPretrained/toy/R-18-partial.pkl"] = pickle.dumps(zoo)
    with pytest.raises(KeyError, match="res3.0.conv1.weight"):
        ReliableCheckpointer(student, str(tmp_path / "b")).resume_or_load(
            "detectron2://ImageNetPretrained/toy/R-18-partial.pkl", resume=False)


def test_torchvision_resnet_url_as_detector_weights(server, cache, tmp_path):
    """MODEL.WEIGHTS = torchvision's published ResNet file: converted once to detectron2 names
    (cached beside the download) and loaded strictly into the student's bottom-up network."""
    from nst_det.modeling.convert import convert_student

    torch.manual_seed(2)
    classifier = build_classifier("resnet18", 1000)
    state = classifier.state_dict()
    data = _torch_bytes(state)
    name = _hub_name("resnet18", data)
    server.files[f"/models/{name}"] = data
    student = build_model(make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.NORM", "FrozenBN"]))
    ReliableCheckpointer(student, str(tmp_path / "a")).resume_or_load(
        f"{server.url}/models/{name}", resume=False)
    expected, _ = convert_student(state, "resnet")
    got = student.backbone.bottom_up.state_dict()
    assert set(expected) <= set(got)
    torch.testing.assert_close({k: got[k] for k in expected}, expected)
    assert _cached_files(cache) == sorted([name, name[:-4] + ".d2.pth"])
