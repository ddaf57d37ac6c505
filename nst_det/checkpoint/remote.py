"""Weights by URL: download once into a cache, verified and written atomically, then load locally.

`resolve_weights(path)` returns `path` unchanged when it is not a URL, and otherwise the local
cached copy of it, downloading it first when the cache lacks it. The caller then loads that file
with the same strict checks as any local file. Accepted:

- `https://...` (and `http://`), e.g. torchvision's published ImageNet weights
  `https://download.pytorch.org/models/resnet50-0676ba61.pth`. A file name carrying a hex digest
  after its last `-` (torch.hub's convention: the first digits of the file's sha256) is verified
  against it, as `torch.hub.load_state_dict_from_url(check_hash=True)` does. Such files are cached
  under their file name in torch.hub's folder, so both share one copy; other URLs under
  `url/<host>/<path>`, or `url/<host>/q-<digest of the query>/<path>` for a URL with a query
  (`.../uc?id=1` and `.../uc?id=2` are two files).
- `detectron2://<path>`: detectron2's model zoo (`https://dl.fbaipublicfiles.com/detectron2/`),
  cached under `detectron2/<path>`.

The cache is `$NST_DET_WEIGHTS_CACHE` when set, else torch.hub's checkpoint folder
(`$TORCH_HOME/hub/checkpoints`, by default `~/.cache/torch/hub/checkpoints`).

Why not `torch.hub.download_url_to_file`: it reads until the connection ends, and Python's HTTP
client ends a body that the server cut short without an error, so a truncated download of a file
without a digest in its name would be cached as if complete. Here the byte count is checked
against Content-Length, the file is written to a temporary sibling and renamed only once complete
and read as weights (a body cut short without a Content-Length, or a web page, is not cached),
and a file lock lets one process download while the others (DDP ranks, pipeline stages) wait and
reuse the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import pickletools
import re
import urllib.error
import urllib.parse
import urllib.request

import torch
from filelock import FileLock

from ..utils.atomic import DiskFullError, atomic_write
from .weights_file import WeightsFileError, check_weights_file

__all__ = ["WeightsDownloadError", "cache_dir", "cached_path", "is_url", "resolve_weights"]

logger = logging.getLogger(__name__)

CACHE_ENV = "NST_DET_WEIGHTS_CACHE"
DETECTRON2_PREFIX = "detectron2://"
# where detectron2's PathManager resolves detectron2:// (detectron2.utils.file_io)
DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# torch.hub's digest-in-the-name convention (torch.hub.HASH_REGEX), at least 6 hex digits here
HASH_REGEX = re.compile(r"-([a-f0-9]{6,})\.")
_CHUNK = 1 << 20
TIMEOUT_S = 60


class WeightsDownloadError(RuntimeError):
    """A weights URL that could not be downloaded or verified (nothing was cached)."""


def is_url(path: str) -> bool:
    """Whether `path` is a weights URL `resolve_weights` downloads."""
    return str(path).startswith(("https://", "http://", DETECTRON2_PREFIX))


def cache_dir() -> str:
    """`$NST_DET_WEIGHTS_CACHE`, else torch.hub's checkpoint folder."""
    return os.environ.get(CACHE_ENV) or os.path.join(torch.hub.get_dir(), "checkpoints")


def _download_url(path: str) -> str:
    if path.startswith(DETECTRON2_PREFIX):
        return DETECTRON2_URL + path[len(DETECTRON2_PREFIX):]
    return path


def cached_path(path: str) -> str:
    """Where the cache keeps the file of the URL `path` (whether or not it is there yet)."""
    if path.startswith(DETECTRON2_PREFIX):
        rel = [p for p in path[len(DETECTRON2_PREFIX):].split("/") if p not in ("", ".", "..")]
        return os.path.join(cache_dir(), "detectron2", *rel)  # (.. would leave the cache)
    parsed = urllib.parse.urlparse(path)
    name = os.path.basename(parsed.path)
    if not name:
        raise WeightsDownloadError(f"weights URL {path} names no file")
    if HASH_REGEX.search(name):  # torch.hub's layout: the digest makes the name unique
        return os.path.join(cache_dir(), name)
    parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    if parsed.query:  # a query can name the file (e.g. uc?id=...): each its own copy
        parts.insert(0, "q-" + hashlib.sha256(parsed.query.encode()).hexdigest()[:16])
    return os.path.join(cache_dir(), "url", parsed.netloc.replace(":", "_"), *parts)


def _fetch(url: str, dest: str, key: str) -> None:
    """Download `url` to `dest` atomically, checking its length and the digest in its name."""
    expected = HASH_REGEX.search(os.path.basename(urllib.parse.urlparse(url).path))
    expected = expected.group(1) if expected else None
    request = urllib.request.Request(url, headers={"User-Agent": "nst_det"})
    sha256, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            logger.info(f"Downloading {url} ({length or '?'} bytes) -> {dest}")
            with atomic_write(dest) as f:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    sha256.update(chunk)
                    received += len(chunk)
                if length is not None and received != length:
                    raise WeightsDownloadError(
                        f"download of {key}={url} was interrupted: {received} of {length} bytes "
                        "received. Nothing was cached; run again to retry")
                digest = sha256.hexdigest()
                if expected and not digest.startswith(expected):
                    raise WeightsDownloadError(
                        f"checksum mismatch for {key}={url}: its file name promises a sha256 "
                        f"starting {expected!r}, the download's is {digest!r}. Nothing was cached;"
                        " check the URL (or the network's proxy)")
                f.flush()
                _check_whole(f.name, dest, url, key)
    except (WeightsDownloadError, DiskFullError):  # (a full disk is not the network's fault)
        raise
    except urllib.error.HTTPError as e:
        raise WeightsDownloadError(
            f"cannot download {key}={url}: HTTP {e.code} {e.reason}. Check the URL") from None
    # refused, unreachable, timeout, cut off (a chunked body: IncompleteRead), a bad answer, a
    # URL urllib cannot send (non-ASCII: UnicodeEncodeError)
    except (urllib.error.URLError, OSError, http.client.HTTPException, UnicodeError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsDownloadError(
            f"cannot download {key}={url} ({type(e).__name__}: {reason}). Check the URL and the "
            f"network, or download the file yourself and give its local path") from None
    logger.info(f"Cached {url} as {dest} ({received} bytes"
                + (f", sha256 {digest[:len(expected)]} verified)" if expected else ")"))


def _check_whole(tmp: str, dest: str, url: str, key: str) -> None:
    """Raise WeightsDownloadError unless the download `tmp` (to be cached as `dest`) is a whole
    weights file: a body cut short without a Content-Length, or a web page answered with 200,
    must not be cached as weights."""
    try:
        if dest.endswith(".pkl"):  # its opcodes only: unpickling it would run its code
            with open(tmp, "rb") as f:
                for _ in pickletools.genops(f):
                    pass
        else:
            check_weights_file(tmp, key, name=dest)
    except (WeightsFileError, ValueError) as e:
        reason = str(e).replace(tmp, "the download")
        raise WeightsDownloadError(
            f"download of {key}={url} is not a whole weights file ({reason}). Nothing was "
            "cached; check the URL (it must give the file itself), or run again to retry") from None


def resolve_weights(path: str, key: str = "weights") -> str:
    """The local file for `path`: `path` itself if it is not a URL, else its cached download.

    Args:
        path: a local path, an https:// (http://) URL or a detectron2:// model-zoo path.
        key: the config key `path` came from, named in errors (e.g. "MODEL.WEIGHTS").
    Raises:
        WeightsDownloadError: the server cannot be reached or answers with an error, the download
            was cut short, or its sha256 does not start with the digest in the file name. Nothing
            is left in the cache then.
    """
    if not path or not is_url(path):
        return path
    try:
        dest = cached_path(path)
    except ValueError as e:  # urlparse: e.g. an unclosed [ of an IPv6 host
        raise WeightsDownloadError(f"{key}={path} is not a valid URL ({e})") from None
    if os.path.isfile(dest):
        return dest
    # lock files live apart (.locks/), so a failed download leaves nothing beside the weights
    locks = os.path.join(cache_dir(), ".locks")
    lock_name = hashlib.sha256(dest.encode()).hexdigest()[:16] + ".lock"
    try:
        os.makedirs(locks, exist_ok=True)
        lock = FileLock(os.path.join(locks, lock_name))
        lock.acquire()
    except OSError as e:
        raise _cache_unwritable(e, path, key) from None
    try:
        if not os.path.isfile(dest):  # another process may have downloaded it while we waited
            try:
                try:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                except OSError as e:
                    raise _cache_unwritable(e, path, key) from None
                _fetch(_download_url(path), dest, key)
            except BaseException:
                with contextlib.suppress(OSError):  # the folders made for it, when left empty
                    os.removedirs(os.path.dirname(dest))
                raise
    finally:
        lock.release()
    return dest


def _cache_unwritable(error: OSError, path: str, key: str) -> WeightsDownloadError:
    return WeightsDownloadError(
        f"cannot download {key}={path}: the weights cache {cache_dir()} cannot be written "
        f"({type(error).__name__}: {error}). Make it writable, or set {CACHE_ENV} to a folder "
        "that is")
