"""Where the job's input and output live: a local path or a URI of any filesystem pyarrow supports (``s3://``,
``gs://``, ``hdfs://``, ``file://``), as one ``Location`` type the readers and writers share.

Contract:
- Credentials come from the standard environment of the store (for S3: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``~/.aws/credentials`` and ``~/.aws/config``, an instance
  role), never from the URI: a URI carrying a key is refused, so no secret reaches a command line, the output
  or a log. Non-secret options may ride in the URI's query (``?region=...&endpoint_override=...``).
- An S3 endpoint comes from the URI's ``endpoint_override``, else from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (pyarrow's S3 client does not read those itself).
- ``write_atomically`` publishes a complete file or nothing: it writes ``<name>.<pid>.tmp`` and then moves it
  to its name (a rename on a local disk, after an fsync; on an object store, which has no rename, a
  server-side copy of the finished object, then a delete of the temporary one: the final key appears whole).
  A killed writer leaves only ``*.tmp`` files, which ``remove_leftovers`` deletes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

SECRET_OPTIONS = {"access_key", "secret_key", "session_token"}
TMP_SUFFIX = ".tmp"


class StorageError(ValueError):
    """A location that cannot be used: a malformed URI, a secret in it, a missing bucket."""


def _with_env_endpoint(uri: str) -> str:
    """An s3:// URI, with the environment's endpoint added to its query unless it names one."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "@" in urlsplit(endpoint).netloc:  # it would ride in the URI handed to the workers
        raise StorageError("AWS_ENDPOINT_URL(_S3) carries credentials; set them in AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY instead")
    if endpoint and "endpoint_override" not in query:
        query["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            query.setdefault("scheme", "http")
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class Location:
    """A file or directory: ``fs`` and ``path`` for pyarrow, ``uri`` as the user gave it (shown in messages), and
    the URI's query options (``query``: never a secret, see ``resolve``)."""

    fs: pafs.FileSystem
    path: str
    uri: str
    query: str = ""

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def source(self) -> str:
        """What ``resolve`` takes to open this location again in another process (a worker, maybe on another
        node): a local path made absolute, or the URI with its options (an endpoint from the environment
        included)."""
        return self.path if self.local else self.uri + (f"?{self.query}" if self.query else "")

    def reachable_from(self, node_id: str | None, driver_node_id: str | None) -> bool:
        """Whether a process on Ray node ``node_id`` reaches this location as the driver (on ``driver_node_id``)
        does: a URI from any node; a local path only on the driver's node (elsewhere it is another disk)."""
        return not self.local or (node_id is not None and node_id == driver_node_id)

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}", self.query)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def listing(self) -> list[tuple[Location, int]]:
        """The files directly in this directory with their sizes in bytes, sorted by name (none when it does
        not exist)."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        return [(self.child(i.base_name), i.size) for i in sorted(infos, key=lambda i: i.base_name)]

    def files(self) -> list[Location]:
        return [f for f, _ in self.listing()]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def make_dir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        self.fs.delete_file(self.path)

    def move_to(self, other: Location) -> None:
        self.fs.move(self.path, other.path)

    def write_atomically(self, write: Callable[[Location], None]) -> Location:
        """Call ``write(tmp)`` to write a temporary file beside this one, then publish it under this name."""
        tmp = Location(self.fs, f"{self.path}.{os.getpid()}{TMP_SUFFIX}", f"{self.uri}.{os.getpid()}{TMP_SUFFIX}")
        write(tmp)
        if self.local:
            with open(tmp.path, "rb") as f:  # on disk before the rename makes it count as done
                os.fsync(f.fileno())
        tmp.move_to(self)
        return self

    def write_bytes_atomically(self, data: bytes) -> Location:
        def write(tmp: Location) -> None:
            with tmp.fs.open_output_stream(tmp.path) as f:
                f.write(data)

        return self.write_atomically(write)

    def remove_leftovers(self) -> int:
        """Delete the ``*.tmp`` files a killed writer left in this directory; returns how many."""
        leftovers = [f for f in self.files() if f.name.endswith(TMP_SUFFIX)]
        for f in leftovers:
            f.delete()
        return len(leftovers)


@functools.lru_cache(maxsize=16)
def resolve_cached(where: str) -> Location:
    """``resolve``, once per process for each ``where``: a worker resolves its job's input and output once, not per
    shard (an object store's client set-up and bucket check are requests)."""
    return resolve(where)


def resolve(where: str | os.PathLike) -> Location:
    """A local path (relative ones from the working directory) or a URI, as a Location.

    Raises StorageError for a URI with credentials in it, one pyarrow cannot open, or an S3 bucket that does
    not exist."""
    text = os.fspath(where)
    if "://" not in text:
        path = os.path.abspath(text)
        return Location(pafs.LocalFileSystem(), path, path)
    parts = urlsplit(text)
    secrets = SECRET_OPTIONS & {k for k, _ in parse_qsl(parts.query)}
    # "user:secret@host" (a secret may hold "/", which urlsplit takes for the end of the host): refused without
    # echoing any of it. A bare "user@host" (hdfs) carries no secret.
    userinfo = text.split("://", 1)[1].split("?", 1)[0].split("@", 1)[0] if "@" in text.split("?", 1)[0] else ""
    if ":" in userinfo or secrets:
        raise StorageError(f"{parts.scheme}://...: credentials do not belong in the URI "
                           "(they would reach the command line and the logs); set them in the store's standard "
                           "environment instead, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or ~/.aws")
    opened = _with_env_endpoint(text) if parts.scheme == "s3" else text
    shown = urlunsplit(parts._replace(query=""))
    try:
        fs, path = pafs.FileSystem.from_uri(opened)
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid (a ValueError) or OSError
        raise StorageError(f"{shown}: cannot open this URI ({type(exc).__name__})") from None
    location = Location(fs, path, shown, urlsplit(opened).query)
    if parts.scheme in ("s3", "gs", "gcs"):
        bucket = path.split("/", 1)[0]
        try:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as exc:
            raise StorageError(f"{location.uri}: cannot reach the bucket {bucket!r}: {exc}") from None
        if not found:
            raise StorageError(f"{location.uri}: the bucket {bucket!r} does not exist")
    return location
