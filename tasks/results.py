"""Task results and cache entries as JSON records, never pickles.

Prefect persists the result of a cached task under ``<PREFECT_HOME>/storage`` and loads it on a
cache hit. Its default serializer is cloudpickle, and even with a JSON serializer the record on
disk names the serializer that reads it back (``{"serializer": {"type": "pickle"}}``) and the
classes its decoder imports: whoever can write to the home (in Kubernetes, the shared volume)
would run code in the next flow run. So:

- :class:`RecordSerializer` (type ``alignflow-json``) is Prefect's JSON serializer with a decoder
  that rebuilds only pydantic models (not Prefect blocks) of alignflow's own, already imported
  modules (``tasks.*``, ``alignment.*``), paths, dates and UUIDs, and exceptions of builtins or
  those modules. It ignores every setting a record carries (``jsonlib``, ``object_decoder``) and
  imports nothing. Models are written in Python mode, so NaN and inf survive the round trip.
- :class:`RecordKeys` stores the cache entries' metadata (``<storage>/keys/<cache key>``) and
  refuses, on read, any entry whose serializer is not ``alignflow-json`` or that points at a
  storage block: a planted or rewritten entry is a cache miss (the stage runs again and
  overwrites it), never a load. The result file it points at is read from the result storage
  folder only (Prefect's ``LocalFileSystem`` refuses paths outside its base path) and decoded
  with :class:`RecordSerializer`.

Use :func:`cached_records` in a cached task's decorator. ``flows.cli`` also sets Prefect's
default serializer to its stock ``json`` (``PREFECT_RESULTS_DEFAULT_SERIALIZER``) for anything
else that persists a result. Assumes the local result storage (the embedded default and the
process worker's shared volume); a remote default storage block would need the same guard.
"""

from __future__ import annotations

import builtins
import json
import sys
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, ClassVar
from uuid import UUID

from prefect.blocks.core import Block
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer, prefect_json_object_encoder
from prefect.settings import get_current_settings
from pydantic import BaseModel, Field, TypeAdapter

SERIALIZER_TYPE = "alignflow-json"
ALLOWED_MODULES = ("tasks.", "alignment.")
"""Modules whose pydantic models (and exceptions) a record may rebuild."""
_PLAIN_TYPES: dict[str, type] = {
    "pathlib.Path": Path, "pathlib.PosixPath": PosixPath, "pathlib.PurePosixPath": PurePosixPath,
    "datetime.datetime": datetime, "datetime.date": date, "uuid.UUID": UUID,
}


class UnsafeRecordError(ValueError):
    """A persisted result or cache entry that alignflow refuses to load."""


def _loaded_class(qualified: str) -> Any:
    """The class named ``module.Name`` if its module is one of ours and already imported.

    Nothing is imported: a record cannot make the process import a module."""
    module_name, _, name = str(qualified).rpartition(".")
    if not module_name.startswith(ALLOWED_MODULES) or module_name not in sys.modules:
        return None
    return getattr(sys.modules[module_name], name, None)


def decode_object(obj: dict[str, Any]) -> Any:
    """``json.loads`` object hook: rebuild the objects :func:`prefect_json_object_encoder` wrote,
    for allowed classes only. Raises UnsafeRecordError for any other class."""
    if "__class__" in obj:
        name = obj["__class__"]
        cls = _PLAIN_TYPES.get(name) or _loaded_class(name)
        plain = cls in _PLAIN_TYPES.values()
        if not (isinstance(cls, type) and (plain or (issubclass(cls, BaseModel) and not issubclass(cls, Block)))):
            raise UnsafeRecordError(f"record holds an object of class {name!r}, which alignflow does not load")
        return TypeAdapter(cls).validate_python(obj["data"])
    if "__exc_type__" in obj:
        name = str(obj["__exc_type__"])
        module_name, _, short = name.rpartition(".")
        exc = getattr(builtins, short, None) if module_name == "builtins" else _loaded_class(name)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            exc = RuntimeError
        try:
            return exc(obj.get("message", ""))
        except Exception:  # an exception class with another constructor
            return RuntimeError(f"{name}: {obj.get('message', '')}")
    return obj


def encode_object(obj: Any) -> Any:
    """``json.dumps`` default: a pydantic model as ``{"__class__", "data"}`` with its fields in
    Python mode (nested objects come back through here), so NaN and inf survive the round trip
    (pydantic's JSON mode writes them as null); anything else as Prefect's encoder writes it."""
    if isinstance(obj, BaseModel):
        cls = type(obj)
        return {"__class__": f"{cls.__module__}.{cls.__qualname__}", "data": obj.model_dump(mode="python")}
    return prefect_json_object_encoder(obj)


class RecordSerializer(JSONSerializer):
    """Prefect's JSON serializer, restricted on load (see the module docstring).

    The inherited ``jsonlib`` / ``object_encoder`` / ``object_decoder`` fields are kept for
    Prefect's metadata format but never used: they would come from the file on load."""

    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, default=encode_object).encode()

    def loads(self, blob: bytes) -> Any:
        try:
            return json.loads(blob.decode(), object_hook=decode_object)
        except UnicodeDecodeError as err:
            raise UnsafeRecordError(f"record is not UTF-8 JSON: {err}") from None


RECORDS = RecordSerializer()


def check_cache_entry(content: bytes, where: str = "cache entry", result_base: Path | None = None) -> bytes:
    """Return ``content`` if it is the metadata of an ``alignflow-json`` record on local storage
    and (with ``result_base``, the result storage folder) the result it points at, inside that
    folder, decodes with :class:`RecordSerializer`.

    Raises UnsafeRecordError (or ValueError for a path outside ``result_base``) naming ``where``."""
    try:
        meta = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise UnsafeRecordError(f"{where}: not a JSON cache entry (a pickle or a planted file?)") from None
    serializer = meta.get("serializer") if isinstance(meta, dict) else None
    kind = serializer.get("type") if isinstance(serializer, dict) else None
    if kind != SERIALIZER_TYPE:
        raise UnsafeRecordError(f"{where}: serializer {kind!r} refused (only {SERIALIZER_TYPE!r} is loaded)")
    if meta.get("storage_block_id") is not None:
        raise UnsafeRecordError(f"{where}: entries pointing at a storage block are refused")
    if result_base is not None:  # the result it points at must load too, or the entry is a miss
        result = LocalFileSystem(basepath=str(result_base))._resolve_path(str(meta.get("storage_key") or ""))
        if not result.is_file():
            raise UnsafeRecordError(f"{where}: its result file {result} is missing")
        RECORDS.loads(result.read_bytes())
    return content


class RecordKeys(LocalFileSystem):
    """Where cache entries (result metadata) live: ``<results.local_storage_path>/keys`` of the
    current Prefect settings, resolved at each call (the home is known only at run time).

    Reads go through :func:`check_cache_entry`; a refused entry raises, which Prefect's cache
    lookup treats as a miss."""

    _block_type_slug: ClassVar[str] = "alignflow-record-keys"
    _block_type_name: ClassVar[str] = "alignflow record keys"

    @staticmethod
    def results_folder() -> Path:
        """The local result storage folder of the current Prefect settings."""
        return Path(get_current_settings().results.local_storage_path).expanduser()

    def _resolve_path(self, path: str) -> Path:
        if not self.basepath:
            return LocalFileSystem(basepath=str(self.results_folder() / "keys"))._resolve_path(path)
        return super()._resolve_path(path)

    def _checked(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist.")
        return check_cache_entry(resolved.read_bytes(), f"cache entry {path}", self.results_folder())

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # noqa: ARG002 (Prefect passes _sync)
        return self._checked(path)


def cached_records(cache_key_fn: Callable[..., str | None]) -> dict[str, Any]:
    """Decorator arguments of a cached task: its key function, entries kept by :class:`RecordKeys`,
    results written by :class:`RecordSerializer`. ``@task(name=..., **cached_records(key_fn))``."""
    policy = CacheKeyFnPolicy(cache_key_fn=cache_key_fn).configure(key_storage=RecordKeys())
    return {"cache_policy": policy, "result_serializer": RECORDS, "persist_result": True}


def pickles_under(folder: Path) -> list[Path]:
    """Files under ``folder`` that hold a pickle: a raw pickle stream (protocol 2+ starts with
    ``\\x80``) or a base64 one inside a JSON record (Prefect's pickle serializer, ``gASV`` /
    ``gAJ`` / ``gAN``...), or a record naming the pickle serializer. For tests and audits."""
    found = []
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        head = file.read_bytes()
        if head[:1] == b"\x80" or b'"pickle"' in head or b"compressed/pickle" in head \
                or any(marker in head for marker in (b'"gASV', b'"gAJ', b'"gAN', b'"gAR', b"cloudpickle")):
            found.append(file)
    return found
