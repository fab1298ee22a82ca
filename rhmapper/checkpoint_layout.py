"""Where a checkpoint's files are and what they hold: its location on a ``pyarrow.fs`` filesystem,
the manifest, and the shards of results, each written whole or not at all.

```text
<uri>/manifest.json                       format, version, fingerprint, created-at, total,
                                          complete count
<uri>/shards/<first index>-<uuid8>.arrow  an Arrow IPC file of runs, by first index: a run is
                                          the results of one call, a row of
                                            indexes  list<int64>   ascending
                                            digests  large_binary  16 bytes per index
                                            values   large_binary  the pickled list of results
                                          in record batches of about 256 KiB (a larger run alone)
```

A run's values are saved as the replica pickled them for the driver, and its digests as the
replica made them (`rhmapper.digests`): saving a call's results costs the driver no work per
result. A shard is whole or absent: on a filesystem that renames atomically (local, HDFS) it is
written as ``….arrow.tmp`` and renamed into place; on an object store (S3, GCS, Azure), where an
upload appears whole when it completes, it is written under its final name. Readers ignore
``.tmp`` files and any name not of a shard.
"""

from __future__ import annotations

import array
import datetime
import itertools
import json
import logging
import operator
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rhmapper.digests import DIGEST_SIZE
from rhmapper.errors import CheckpointCorruptError, CheckpointMismatchError

_log = logging.getLogger(__name__)

FORMAT = "rhmapper-checkpoint"
"""The manifest's ``format``: what tells a checkpoint from other files."""
VERSION = 2
"""The layout's version: a reader refuses another (version 1 saved a row per result)."""
MANIFEST = "manifest.json"
SHARDS = "shards"
RESULT_BYTES = 8 + DIGEST_SIZE
"""Bytes a result takes besides its value: its index and its digest."""
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

    def read_manifest(self, any_version: bool = False) -> dict | None:
        """The manifest, or None if there is none; a manifest of another format, or of another
        layout version unless ``any_version``, raises `CheckpointMismatchError`."""
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
        version = manifest.get("version", 0)
        if version != VERSION and not any_version:
            newer = version > VERSION
            advice = ("upgrade rhmapper" if newer else "read it with the rhmapper that wrote "
                      "it, or pass overwrite=True to start afresh")
            raise CheckpointMismatchError(
                f"checkpoint {self.uri} was written by {'a newer' if newer else 'an older'} "
                f"rhmapper (layout version {version}, this one reads {VERSION}): {advice}.")
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

    def write_shard(self, runs: PendingRuns) -> Shard:
        """Write ``runs`` as one shard, by first index. Empties ``runs`` (their buffers now
        belong to the shard's record batches)."""
        shard = Shard(f"{self.shards_path}/{runs.first_index:08d}-{uuid.uuid4().hex[:8]}.arrow",
                      runs.first_index)
        self._write_whole(shard.path, self._shard_writer(runs))
        # The shard's record batches are freed: Arrow's allocator keeps their pages unless asked.
        self._pyarrow.default_memory_pool().release_unused()
        return shard

    def read_shard(self, shard: Shard, values: bool = True) -> Iterator[Any]:
        """The record batches of ``shard``, one at a time; without their ``values`` column (not
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

    def _corrupt(self, shard: Shard, error: Exception) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"shard {shard.path} of checkpoint {self.uri} cannot be read ({error}): it was cut "
            "short, e.g. by a machine crash before it reached the disk. Delete that file: a run "
            "of the map with this checkpoint computes its results again.")

    def _shard_writer(self, runs: PendingRuns) -> Callable[[Any], None]:
        """What writes ``runs`` into a stream as an Arrow IPC file (``runs`` emptied)."""
        schema = _schema(self._pyarrow)
        batches = _record_batches(self._pyarrow, schema, runs.take())

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


@dataclass(frozen=True, eq=False)
class Run:
    """The results of one call: their input indexes (ascending), the inputs' digests one after
    another, and the pickled list of their values.

    Examples:
        >>> import pickle
        >>> run = Run(array.array("q", [4, 5]), bytes(32), pickle.dumps(["four", "five"]))
        >>> run.first_index, len(run)
        (4, 2)
    """

    indexes: array.array
    digests: bytes
    values: bytes

    @property
    def first_index(self) -> int:
        """The smallest index of the run."""
        return self.indexes[0]

    def __len__(self) -> int:
        return len(self.indexes)


class PendingRuns:
    """The runs of the next shard as they come.

    Examples:
        >>> import pickle
        >>> runs = PendingRuns()
        >>> runs.add(range(4, 6), bytes(32), pickle.dumps(["four", "five"]))
        >>> runs.add([2], bytes(16), pickle.dumps(["two"]))
        >>> len(runs), runs.first_index, [run.first_index for run in runs.take()], len(runs)
        (3, 2, [2, 4], 0)
    """

    def __init__(self) -> None:
        self._runs: list[Run] = []
        self._count = 0
        self.first_index = -1
        """The smallest index (-1 when empty)."""

    def add(self, indexes: Sequence[int], digests: bytes, values: bytes) -> None:
        """Add the run of inputs ``indexes``, their ``digests`` and the pickled list of their
        ``values`` (as `check_run` checks them)."""
        run = Run(array.array("q", indexes), bytes(digests), values)
        self._runs.append(run)
        self._count += len(run)
        if run.first_index < self.first_index or self.first_index < 0:
            self.first_index = run.first_index

    def take(self) -> list[Run]:
        """The runs, by first index; empties this."""
        runs = sorted(self._runs, key=lambda run: run.first_index)
        self._runs, self._count, self.first_index = [], 0, -1
        return runs

    def __len__(self) -> int:
        return self._count


def check_run(indexes: Sequence[int], digests: bytes) -> None:
    """Raise ValueError unless ``indexes`` (of a run) are 0 or more and ascend, and ``digests``
    has `DIGEST_SIZE` bytes for each of them.

    Examples:
        >>> check_run(range(3), bytes(48)); check_run([1, 5], bytes(32))
        >>> check_run([5, 1], bytes(32))
        Traceback (most recent call last):
        ...
        ValueError: a run's indexes ascend, each once (they are the inputs of one call): [5, 1]
        >>> check_run(range(5, 0, -1), bytes(80))
        Traceback (most recent call last):
        ...
        ValueError: a run's indexes as a range have a step of 1, not -1: give them as a list
    """
    if len(digests) != DIGEST_SIZE * len(indexes):
        raise ValueError(f"a digest has {DIGEST_SIZE} bytes (rhmapper.digests.input_digest): "
                         f"{len(indexes)} indexes need {DIGEST_SIZE * len(indexes)} bytes of "
                         f"digests, not {len(digests)}")
    if len(indexes) and indexes[0] < 0:
        raise ValueError(f"an input's index is 0 or more, not {indexes[0]}")
    if isinstance(indexes, range) and indexes.step != 1:
        raise ValueError(f"a run's indexes as a range have a step of 1, not {indexes.step}: give "
                         "them as a list")
    if not isinstance(indexes, range) and not all(map(operator.lt, indexes, indexes[1:])):
        raise ValueError(f"a run's indexes ascend, each once (they are the inputs of one call): "
                         f"{list(indexes)[:10]}")


def gapless(indexes: Sequence[int]) -> Sequence[int]:
    """Ascending ``indexes`` as a ``range`` when none is missing between the first and the last
    (the usual run: one call's inputs), else as they are.

    Examples:
        >>> gapless([3, 4, 5]), gapless([3, 5]), gapless([])
        (range(3, 6), [3, 5], [])
    """
    if len(indexes) and indexes[-1] - indexes[0] == len(indexes) - 1:
        return range(indexes[0], indexes[-1] + 1)
    return indexes


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


def _schema(pyarrow: ModuleType) -> Any:
    """A shard's schema."""
    return pyarrow.schema([("indexes", pyarrow.list_(pyarrow.int64())),
                           ("digests", pyarrow.large_binary()),
                           ("values", pyarrow.large_binary())])


def _record_batches(pyarrow: ModuleType, schema: Any, runs: list[Run]) -> list:
    """``runs`` as record batches of about `BATCH_BYTES` of values each, a larger run alone
    (its buffers not copied)."""
    groups: list[list[Run]] = []
    group_bytes = 0
    for run in runs:
        if not groups or group_bytes >= BATCH_BYTES or len(run.values) >= BATCH_BYTES:
            groups.append([])
            group_bytes = 0
        groups[-1].append(run)
        group_bytes += len(run.values)
    return [_record_batch(pyarrow, schema, group) for group in groups]


def _record_batch(pyarrow: ModuleType, schema: Any, runs: list[Run]) -> Any:
    """One record batch of ``runs``, a row each."""
    counts = array.array("i", itertools.accumulate(map(len, runs), initial=0))
    indexes = pyarrow.Array.from_buffers(pyarrow.int64(), counts[-1], [None, _joined(
        pyarrow, [run.indexes for run in runs])])
    return pyarrow.record_batch([
        pyarrow.ListArray.from_arrays(pyarrow.Array.from_buffers(
            pyarrow.int32(), len(counts), [None, pyarrow.py_buffer(counts)]), indexes),
        _binary_array(pyarrow, [run.digests for run in runs]),
        _binary_array(pyarrow, [run.values for run in runs]),
    ], schema=schema)


def _binary_array(pyarrow: ModuleType, blobs: list[bytes]) -> Any:
    """A ``large_binary`` array of ``blobs`` (a single blob not copied)."""
    offsets = array.array("q", itertools.accumulate(map(len, blobs), initial=0))
    return pyarrow.Array.from_buffers(pyarrow.large_binary(), len(blobs),
                                      [None, pyarrow.py_buffer(offsets), _joined(pyarrow, blobs)])


def _joined(pyarrow: ModuleType, parts: list) -> Any:
    """One Arrow buffer of ``parts`` (buffers), a single part not copied."""
    return pyarrow.py_buffer(parts[0] if len(parts) == 1 else b"".join(parts))
