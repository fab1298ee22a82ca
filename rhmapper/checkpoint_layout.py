"""Where a checkpoint's files are and what they hold: its location on a ``pyarrow.fs`` filesystem,
the manifest, and the shards of results, each written whole or not at all.

```text
<uri>/manifest.json                       format, version, fingerprint, created-at, total,
                                          complete count
<uri>/shards/<first index>-<uuid8>.arrow  an Arrow IPC file: index int64, digest
                                          fixed_size_binary(16), value large_binary (pickled),
                                          sorted by index, in record batches of about 256 KiB
```

A shard is whole or absent: on a filesystem that renames atomically (local, HDFS) it is written as
``….arrow.tmp`` and renamed into place; on an object store (S3, GCS, Azure), where an upload
appears whole when it completes, it is written under its final name. Readers ignore ``.tmp``
files and any name not of a shard.
"""

from __future__ import annotations

import array
import bisect
import datetime
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rhmapper.digests import DIGEST_SIZE
from rhmapper.errors import CheckpointCorruptError, CheckpointMismatchError

_log = logging.getLogger(__name__)

FORMAT = "rhmapper-checkpoint"
"""The manifest's ``format``: what tells a checkpoint from other files."""
VERSION = 1
"""The layout's version; a reader refuses a newer one."""
MANIFEST = "manifest.json"
SHARDS = "shards"
ROW_BYTES = 8 + DIGEST_SIZE + 8
"""Bytes a row takes besides its value: its index, its digest, where its value starts."""
BATCH_BYTES = 256 * 1024
"""Bytes of results per record batch: a reader holds one batch per shard it reads."""
_SHARD_NAME = re.compile(r"^(\d+)-[0-9a-f]{8}\.arrow$")
_OBJECT_STORES = ("s3", "gcs", "abfs")
"""`pyarrow.fs.FileSystem.type_name` of stores where a finished upload appears whole."""


def import_pyarrow() -> ModuleType:
    """``pyarrow`` with its ``fs`` and ``ipc`` modules loaded, or an ImportError saying how to
    install it.

    Examples:
        >>> import_pyarrow().fs.LocalFileSystem().type_name
        'local'
    """
    try:
        import pyarrow
        import pyarrow.fs
        import pyarrow.ipc
    except ImportError as error:
        raise ImportError("checkpoint= needs pyarrow: pip install 'rhmapper[durable]'") from error
    return pyarrow


@dataclass(frozen=True)
class Shard:
    """One shard file: its path on the filesystem and the smallest index it holds.

    Examples:
        >>> Shard("ckpt/shards/00000042-0a1b2c3d.arrow", 42).first_index
        42
    """

    path: str
    first_index: int


class CheckpointLocation:
    """A checkpoint's place: the ``pyarrow.fs`` filesystem of ``uri`` and the path under it.

    ``uri`` is a local path (made absolute) or any URI ``pyarrow.fs.FileSystem.from_uri`` takes:
    ``file://``, ``s3://bucket/prefix`` (endpoint and credentials from the standard AWS
    environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), ``gs://bucket/prefix``.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> location = CheckpointLocation(folder.name)
        >>> location.read_manifest() is None, location.names()
        (True, [])
        >>> location.write_manifest(new_manifest({"target": "f"}, total=3))
        >>> location.read_manifest()["fingerprint"], location.names()
        ({'target': 'f'}, ['manifest.json'])
    """

    def __init__(self, uri: str) -> None:
        pyarrow = import_pyarrow()
        self.uri = uri
        if "://" in uri:
            self.filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
            self.path = path.rstrip("/")
        else:  # a plain path, relative to the working directory or the home directory
            self.filesystem = pyarrow.fs.LocalFileSystem()
            self.path = os.path.abspath(os.path.expanduser(uri))
        self.in_place = self.filesystem.type_name in _OBJECT_STORES
        """Files are written under their final name (an object store), not renamed into place."""
        self.shards_path = f"{self.path}/{SHARDS}"
        self._pyarrow = pyarrow

    def names(self) -> list[str]:
        """The names directly under the location, but ``.tmp`` leftovers; empty if it does not
        exist."""
        selector = self._pyarrow.fs.FileSelector(self.path, allow_not_found=True)
        names = (info.base_name for info in self.filesystem.get_file_info(selector))
        return sorted(name for name in names if not name.endswith(".tmp"))

    def read_manifest(self) -> dict | None:
        """The manifest, or None if there is none; a manifest of another format or a newer version
        raises `CheckpointMismatchError`."""
        path = f"{self.path}/{MANIFEST}"
        try:
            with self.filesystem.open_input_stream(path, compression=None) as stream:
                text = stream.read()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
        except ValueError as error:
            raise CheckpointCorruptError(
                f"{path} of checkpoint {self.uri} is not JSON ({error}): it was damaged outside "
                "rhmapper. Delete the checkpoint and run the map again.") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{self.uri} holds a {MANIFEST} that is not an rhmapper checkpoint's: rhmapper "
                "neither writes there nor deletes it. Use a new or empty location.")
        if manifest.get("version", 0) > VERSION:
            raise CheckpointMismatchError(
                f"checkpoint {self.uri} was written by a newer rhmapper (layout version "
                f"{manifest['version']}, this one reads up to {VERSION}): upgrade rhmapper.")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        """Write the manifest, replacing any: readers see the old one or the new one."""
        self._write_whole(f"{self.path}/{MANIFEST}", lambda stream: stream.write(
            json.dumps(manifest, indent=1, sort_keys=True).encode()))

    def delete(self) -> None:
        """Delete the checkpoint's files (its shards first, then the manifest): nothing else."""
        self.filesystem.delete_dir_contents(self.shards_path, missing_dir_ok=True)
        for path in (f"{self.path}/{MANIFEST}", f"{self.path}/{MANIFEST}.tmp"):
            try:
                self.filesystem.delete_file(path)
            except FileNotFoundError:
                pass  # never written, or renamed into place: nothing to delete

    def shards(self) -> list[Shard]:
        """The whole shards, by their first index (``.tmp`` files and other names ignored)."""
        selector = self._pyarrow.fs.FileSelector(self.shards_path, allow_not_found=True)
        shards = []
        for info in self.filesystem.get_file_info(selector):
            match = _SHARD_NAME.match(info.base_name)
            if match and info.type == self._pyarrow.fs.FileType.File:
                shards.append(Shard(info.path, int(match.group(1))))
        return sorted(shards, key=lambda shard: (shard.first_index, shard.path))

    def write_shard(self, rows: ShardRows) -> Shard:
        """Write ``rows`` as one shard, sorted by index. Empties ``rows``: their buffers now
        belong to the shard's record batches (no copy when they came in index order)."""
        shard = Shard(f"{self.shards_path}/{rows.first_index:08d}-{uuid.uuid4().hex[:8]}.arrow",
                      rows.first_index)
        self._write_whole(shard.path, self._shard_writer(rows))
        # The shard's record batches are freed: Arrow's allocator keeps their pages unless asked.
        self._pyarrow.default_memory_pool().release_unused()
        return shard

    def read_shard(self, shard: Shard, values: bool = True) -> Iterator[Any]:
        """The record batches of ``shard``, one at a time; without their ``value`` column (not
        read) if ``values`` is False. A shard that is not a whole Arrow file raises
        `CheckpointCorruptError`."""
        options = self._pyarrow.ipc.IpcReadOptions(included_fields=None if values else [0, 1])
        try:
            with self.filesystem.open_input_file(shard.path) as file:
                reader = self._pyarrow.ipc.open_file(file, options=options)
                for number in range(reader.num_record_batches):
                    yield reader.get_batch(number)
        except self._pyarrow.ArrowInvalid as error:
            raise self._corrupt(shard, error) from error

    def shard_rows(self, shard: Shard) -> int:
        """How many results ``shard`` holds (read from its footer, not its data)."""
        try:
            with self.filesystem.open_input_file(shard.path) as file:
                return int(self._pyarrow.ipc.open_file(file).schema.metadata[b"rows"])
        except self._pyarrow.ArrowInvalid as error:
            raise self._corrupt(shard, error) from error

    def _corrupt(self, shard: Shard, error: Exception) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"shard {shard.path} of checkpoint {self.uri} cannot be read ({error}): it was cut "
            "short, e.g. by a machine crash before it reached the disk. Delete that file: a run "
            "of the map with this checkpoint computes its results again.")

    def _shard_writer(self, rows: ShardRows) -> Callable[[Any], None]:
        """What writes ``rows`` into a stream as an Arrow IPC file (``rows`` emptied)."""
        schema = _schema(self._pyarrow, rows=len(rows))
        batches = _record_batches(self._pyarrow, schema, rows)

        def write(stream: Any) -> None:
            with self._pyarrow.ipc.new_file(stream, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)

        return write

    def _write_whole(self, path: str, write: Callable[[Any], None]) -> None:
        """``write(stream)`` into ``path`` so that readers see the file whole or not at all."""
        if self.in_place:  # object stores have no directories, only names
            target = path
        else:
            self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
            target = f"{path}.tmp"
        try:
            with self.filesystem.open_output_stream(target, compression=None) as stream:
                write(stream)
        except BaseException:
            if not self.in_place:
                self._delete_leftover(target)
            raise
        if not self.in_place:
            self.filesystem.move(target, path)

    def _delete_leftover(self, path: str) -> None:
        try:
            self.filesystem.delete_file(path)
        except FileNotFoundError:
            pass  # the write failed before it created the file
        except OSError:  # the storage is down: readers ignore the .tmp file
            _log.warning("rhmapper: could not delete %s after a failed write", path, exc_info=True)


class ShardRows:
    """The rows of a shard as they come: indexes, input digests and pickled values, each kind in
    one growing buffer (no Python object per row), ready to become a record batch without a copy.

    Examples:
        >>> rows = ShardRows()
        >>> rows.append(4, bytes(16), b"four"); rows.append(2, bytes(16), b"two")
        >>> len(rows), bytes(rows.values), rows.first_index, rows.in_order
        (2, b'fourtwo', 2, False)
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Start afresh, with new buffers (the old ones may be a record batch's now)."""
        self.indexes = array.array("q")
        self.digests = bytearray()
        self.values = bytearray()
        self.offsets = array.array("q", [0])
        """Where each value starts in ``values``, and where the last ends."""
        self.in_order = True
        self.first_index = -1
        """The smallest index (-1 when empty)."""
        self._last = -1

    def append(self, index: int, digest: bytes, value: bytes) -> None:
        """Add the row of input ``index``: its ``digest`` (`DIGEST_SIZE` bytes) and its pickled
        ``value``."""
        self.extend([index], [digest], [value])

    def extend(self, indexes: list[int], digests: list[bytes], values: list[bytes]) -> int:
        """`append` each row of ``indexes``, ``digests`` and ``values``; the bytes of values
        added."""
        if indexes[0] < self._last or any(a > b for a, b in zip(indexes, indexes[1:])):
            self.in_order = False
        lowest = min(indexes)
        if lowest < self.first_index or self.first_index < 0:
            self.first_index = lowest
        self._last = indexes[-1]
        self.indexes.extend(indexes)
        self.digests += b"".join(digests)
        offset = len(self.values)
        self.values += b"".join(values)
        self.offsets.extend(itertools.islice(
            itertools.accumulate(map(len, values), initial=offset), 1, None))
        return len(self.values) - offset

    def __len__(self) -> int:
        return len(self.indexes)


def new_manifest(fingerprint: dict[str, str], total: int | None = None) -> dict:
    """The manifest of a new checkpoint: not complete.

    Examples:
        >>> manifest = new_manifest({"target": "f"}, total=10)
        >>> manifest["format"], manifest["total"], manifest["complete_count"]
        ('rhmapper-checkpoint', 10, None)
    """
    return {"format": FORMAT, "version": VERSION, "fingerprint": dict(fingerprint),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "total": total, "complete_count": None}


def _schema(pyarrow: ModuleType, rows: int) -> Any:
    """A shard's schema; its metadata counts the shard's rows (read from the footer alone)."""
    return pyarrow.schema([("index", pyarrow.int64()), ("digest", pyarrow.binary(DIGEST_SIZE)),
                           ("value", pyarrow.large_binary())], metadata={"rows": str(rows)})


def _record_batches(pyarrow: ModuleType, schema: Any, rows: ShardRows) -> list:
    """``rows``, sorted by index, as record batches of about `BATCH_BYTES` each (one row if it
    is larger), slices of one batch built on the rows' buffers; ``rows`` are emptied."""
    count = len(rows)
    offsets = pyarrow.py_buffer(rows.offsets)
    whole = pyarrow.record_batch([
        pyarrow.Array.from_buffers(pyarrow.int64(), count, [None, pyarrow.py_buffer(rows.indexes)]),
        pyarrow.Array.from_buffers(pyarrow.binary(DIGEST_SIZE), count,
                                   [None, pyarrow.py_buffer(rows.digests)]),
        pyarrow.Array.from_buffers(pyarrow.large_binary(), count,
                                   [None, offsets, pyarrow.py_buffer(rows.values)]),
    ], schema=schema)
    if not rows.in_order:
        whole = whole.sort_by("index")  # a copy: the unsorted buffers go with ``rows``
        offsets = whole.column(2).buffers()[1]
    rows.clear()
    ends = memoryview(offsets).cast("q")  # ends[i]: where value i starts; ends[count]: the end
    batches, start = [], 0
    while start < count:
        stop = min(bisect.bisect_left(ends, ends[start] + BATCH_BYTES, start + 1, count + 1),
                   count)
        batches.append(whole.slice(start, stop - start))
        start = stop
    return batches
