"""The model registry: LightGBM text models with JSON manifests, and atomically moved aliases.

Layout under ``root``::

    models/<version>/model.txt          the LightGBM text model (never a pickle)
    models/<version>/preprocessor.json  the fitted preprocessing, deployed with the model
    models/<version>/manifest.json      version, sha256, params, features, metrics, lineage
    aliases.json                        {"champion": ..., "previous_champion": ..., "stack": [...]}
    decisions.jsonl                     every promote / reject / rollback, with its reason

A version directory is only visible once its manifest exists (written last). ``aliases.json``
is replaced atomically under a file lock, so ``champion`` and ``previous_champion`` always move
together, and a model whose bytes do not match its manifest's sha256 is refused.

``root`` may be a URL (``s3://bucket/prefix/registry``, any fsspec protocol, through
universal-pathlib). Then every file is one object written with a single PUT (an object store
has no rename; S3 shows an object only once its upload is complete, so readers see the old or
the new ``aliases.json``, never a mix), the manifest is still written last, and each decision
is its own object under ``decisions/`` (an object store has no append). What an object store
does not give is the file lock: version numbers and alias moves are serialized only within one
process, so one writer at a time is assumed (the Dagster runs that train and promote; limit
them to one at a time when the registry is on an object store).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from resources.storage import StoragePath, is_local, storage_path, write_text_atomic

MODEL_FILE = "model.txt"
PREPROCESSOR_FILE = "preprocessor.json"
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^m(\d{4,})$")
DECISIONS_FILE = "decisions.jsonl"
DECISIONS_DIR = "decisions"
RESERVED_MARKER = ".reserved"
# An object store has no file lock: registry writes on one are serialized within this process.
_OBJECT_STORE_LOCK = threading.RLock()


class ModelIntegrityError(RuntimeError):
    """A stored model does not match its manifest (corrupt, truncated or tampered)."""


class RegistryError(RuntimeError):
    """A registry operation that cannot be carried out (unknown version, nothing to roll back)."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoredModel:
    """A verified model: its text, preprocessing and manifest."""

    version: str
    model_text: str
    preprocessor_json: str
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def trained_months(self) -> list[str]:
        """The months whose labels the model learned from (early stopping included)."""
        months = self.manifest["training"]["months"]
        return sorted({*months["train"], *months["valid"]})

    @property
    def refit_of(self) -> str | None:
        """The gated model this one refits on every landed month, if it is such a refit."""
        return (self.manifest.get("refit_of") or {}).get("version")


class ModelRegistryResource(dg.ConfigurableResource):
    """Versioned LightGBM text models and their aliases, on the local disk or an object store."""

    root: str

    @property
    def _root(self) -> StoragePath:
        return storage_path(self.root)

    @property
    def on_object_store(self) -> bool:
        return not is_local(self._root)

    def _model_dir(self, version: str) -> StoragePath:
        if not _VERSION_RE.match(version):
            raise RegistryError(f"not a model version: {version!r}")
        return self._root / "models" / version

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.on_object_store:
            with _OBJECT_STORE_LOCK:
                yield
            return
        self._root.mkdir(parents=True, exist_ok=True)
        with open(self._root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- versions ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        models = self._root / "models"
        if not models.exists():
            return []
        found = [p.name for p in models.iterdir() if _VERSION_RE.match(p.name)]
        ready = [v for v in found if (models / v / MANIFEST_FILE).exists()]
        return sorted(ready, key=lambda v: int(v[1:]))

    def register(
        self, model_text: str, preprocessor_json: str, manifest: dict[str, Any]
    ) -> dict[str, Any]:
        """Store a new model version; returns its full manifest (with version and sha256)."""
        with self._locked():
            models = self._root / "models"
            models.mkdir(parents=True, exist_ok=True)
            names = [p.name for p in models.iterdir()] if models.exists() else []
            taken = [int(m[1]) for name in names if (m := _VERSION_RE.match(name))]
            version = f"m{max(taken, default=0) + 1:04d}"
            folder = models / version
            if self.on_object_store:
                # No directories on an object store: an object claims the version number.
                write_text_atomic("", folder / RESERVED_MARKER)
            else:
                folder.mkdir()
        full = {
            **manifest,
            "version": version,
            "sha256": sha256_text(model_text),
            "preprocessor_sha256": sha256_text(preprocessor_json),
            "created_at": manifest.get("created_at", _now()),
        }
        write_text_atomic(model_text, folder / MODEL_FILE)
        write_text_atomic(preprocessor_json, folder / PREPROCESSOR_FILE)
        write_text_atomic(json.dumps(full, indent=1, sort_keys=True), folder / MANIFEST_FILE)
        return full

    def manifest(self, version: str) -> dict[str, Any]:
        path = self._model_dir(version) / MANIFEST_FILE
        if not path.exists():
            raise RegistryError(f"model {version} is not in the registry at {self.root}")
        return json.loads(path.read_text())

    def load(self, version: str) -> StoredModel:
        """Read a model and verify its bytes against the manifest; refuse any mismatch."""
        manifest = self.manifest(version)
        folder = self._model_dir(version)
        try:
            model_text = (folder / MODEL_FILE).read_text(encoding="utf-8")
            preprocessor_json = (folder / PREPROCESSOR_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelIntegrityError(f"model {version}: unreadable files ({exc})") from exc
        for name, text, expected in [
            (MODEL_FILE, model_text, manifest["sha256"]),
            (PREPROCESSOR_FILE, preprocessor_json, manifest["preprocessor_sha256"]),
        ]:
            actual = sha256_text(text)
            if actual != expected:
                raise ModelIntegrityError(
                    f"model {version}: {name} has sha256 {actual[:12]}…, the manifest says "
                    f"{expected[:12]}…; refusing to load a corrupted or tampered model"
                )
        return StoredModel(version, model_text, preprocessor_json, manifest)

    # -- aliases ----------------------------------------------------------------------------

    def _read_aliases(self) -> dict[str, Any]:
        path = self._root / "aliases.json"
        return json.loads(path.read_text()) if path.exists() else {"stack": []}

    def aliases(self) -> dict[str, str | None]:
        stack = self._read_aliases()["stack"]
        return {
            "champion": stack[-1] if stack else None,
            "previous_champion": stack[-2] if len(stack) > 1 else None,
        }

    def champion(self) -> str | None:
        return self.aliases()["champion"]

    def _write_aliases(self, stack: list[str]) -> None:
        data = {
            "champion": stack[-1] if stack else None,
            "previous_champion": stack[-2] if len(stack) > 1 else None,
            "stack": stack,
            "updated_at": _now(),
        }
        write_text_atomic(json.dumps(data, indent=1), self._root / "aliases.json")

    def promote(self, version: str, reason: str) -> dict[str, Any]:
        """Make ``version`` the champion (after verifying its bytes); the old one is kept."""
        self.load(version)  # raises on a corrupt model: the alias does not move
        with self._locked():
            stack = self._read_aliases()["stack"]
            if stack and stack[-1] == version:
                return self.record_decision("promote", version, f"already champion; {reason}")
            self._write_aliases([*stack, version])
        return self.record_decision(
            "promote", version, reason, previous=stack[-1] if stack else None
        )

    def rollback(self, reason: str = "manual rollback") -> dict[str, Any]:
        """Restore the previous champion exactly; the rolled-back version stays in history."""
        with self._locked():
            stack = self._read_aliases()["stack"]
            if len(stack) < 2:
                raise RegistryError("nothing to roll back to: there is no previous champion")
            self.load(stack[-2])  # never roll back onto a corrupted model
            self._write_aliases(stack[:-1])
        return self.record_decision("rollback", stack[-2], reason, previous=stack[-1])

    # -- decisions --------------------------------------------------------------------------

    def record_decision(
        self, action: str, version: str | None, reason: str, **details: Any
    ) -> dict[str, Any]:
        entry = {"at": _now(), "action": action, "version": version, "reason": reason, **details}
        if self.on_object_store:
            # One object per decision (no append on an object store); names sort by time.
            name = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
            write_text_atomic(json.dumps(entry, sort_keys=True), self._root / DECISIONS_DIR / name)
            return entry
        self._root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True) + "\n"
        # One small O_APPEND write per decision: concurrent writers never interleave lines.
        fd = os.open(self._root / DECISIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def decisions(self) -> list[dict[str, Any]]:
        if self.on_object_store:
            folder = self._root / DECISIONS_DIR
            if not folder.exists():
                return []
            objects = sorted((p for p in folder.iterdir() if p.name.endswith(".json")),
                             key=lambda p: p.name)  # fmt: skip
            return [json.loads(p.read_text()) for p in objects]
        path = self._root / DECISIONS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
