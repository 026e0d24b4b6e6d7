"""Where a store lives: a local path, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

Local paths keep the reader's fast path (kept descriptors, ``preadv``). A URL store is opened by Zarr on
its `FsspecStore` and read by `evl_cache.store.ChunkReader` with range GETs. Credentials and the endpoint
come from the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``) or from an options file named by
``--storage-options FILE`` (JSON or YAML, fsspec's keyword arguments for the filesystem). The CLI passes
that file on through the environment variable `OPTIONS_ENV`, so Ray workers started by the driver see it
too. Options are never written into a store or printed (docs/object-storage.md).
"""

from __future__ import annotations

import os
from typing import Any

from evl_cache.errors import UserError

OPTIONS_ENV = "EVL_CACHE_STORAGE_OPTIONS"  # path of a JSON/YAML file of fsspec storage options
_fs_cache: dict[tuple[int, str, str], Any] = {}


def is_url(path: str | os.PathLike) -> bool:
    """True for a ``scheme://`` location other than ``file://`` (those are plain local paths)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0]


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the options file (if any), then the endpoint from the environment."""
    opts: dict[str, Any] = {}
    path = os.environ.get(OPTIONS_ENV)
    if path:
        opts = read_options_file(path)
    if protocol(url) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client:
            client["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and "region_name" not in client:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
    return opts


def read_options_file(path: str) -> dict[str, Any]:
    """A JSON or YAML mapping of storage options; one clear line if it is missing or not a mapping."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)  # YAML is a superset of JSON
    except OSError as err:
        raise UserError(f"cannot read --storage-options file {path} ({err.strerror}); check the path") from None
    except yaml.YAMLError:
        raise UserError(f"--storage-options file {path} is not valid JSON or YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"--storage-options file {path} must hold a mapping of fsspec options (key: value)")
    return data


def use_options_file(path: str | os.PathLike | None) -> None:
    """Make ``path`` the options file of this process and the workers it starts (checked now)."""
    if path is None:
        return
    path = os.path.abspath(str(path))
    read_options_file(path)
    os.environ[OPTIONS_ENV] = path
    _fs_cache.clear()


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; one filesystem per process and options."""
    import fsspec

    opts = storage_options(url)
    key = (os.getpid(), protocol(url), repr(sorted(opts.items())))
    fs = _fs_cache.get(key)
    if fs is None:
        try:
            fs = _fs_cache[key] = fsspec.filesystem(protocol(url), **opts)
        except ImportError as err:
            raise UserError(f"cannot open {url}: {err}; install the storage extra: pip install 'evl-cache[s3]'") from None
    return fs, fs._strip_protocol(url)


def zarr_store(url: str, read_only: bool) -> Any:
    """Zarr's store on ``url`` (`FsspecStore`, on its own asynchronous filesystem), with the same options."""
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or URL (a URL always with ``/``)."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem(location)
    fs.invalidate_cache()
    return bool(fs.exists(path))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes [start, end) (one GET, a range GET with bounds)."""
    fs, path = filesystem(url)
    return fs.cat_file(path, start=start, end=end)


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` as the object at ``url``: one PUT (s3fs: a multipart upload for large data), so a
    reader sees the whole object or none of it, never a partial one."""
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return int(fs.info(path)["size"])


def count_entries(url: str) -> tuple[int, int]:
    """(objects + the folders their keys imply, bytes) under ``url``: the local count's equivalent."""
    fs, root = filesystem(url)
    fs.invalidate_cache()
    found = fs.find(root, detail=True)
    folders = {os.path.dirname(p) for p in found} - {root.rstrip("/")}
    return len(found) + len(folders), sum(int(v.get("size") or 0) for v in found.values())


def remove(url: str) -> None:
    fs, root = filesystem(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)
