"""Artifact registry: every pipeline stage output is a versioned, content-hashed directory with its lineage.

Layout (a plain directory tree, so ``ls`` and ``rsync`` are the admin tools)::

    <root>/
      index.jsonl                    one line per completed artifact (append-only)
      production.json                the promoted policy (written atomically) + history.jsonl
      <kind>/<kind>-<key[:12]>/
        artifact.json                written last: its presence means the artifact is complete
        run/                         the stage's run directory (config.yaml, metrics.jsonl, final/ ...)

An artifact's **key** is a hash of its kind, its stage config (without output locations), the
content hashes of the files the config names, and its parents' content hashes. Asking for the same
key again finds the finished artifact: the stage is skipped. A stage that crashed leaves its
directory without ``artifact.json``; the next attempt reuses the directory (stages resume from
their checkpoints) instead of starting a new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ARTIFACT_FILE = "artifact.json"
PRODUCTION_FILE = "production.json"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write-then-rename with fsync: readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's relative file names and contents (sorted); cached by (path, size, mtime)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        files = [p]
        base = p.parent
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        base = p
    for f in files:
        st = f.stat()
        memo = _MEMO.get((str(f.resolve()), st.st_size, st.st_mtime_ns))
        if memo is None:
            fh = hashlib.sha256()
            with open(f, "rb") as fd:
                for chunk in iter(lambda: fd.read(1 << 20), b""):
                    fh.update(chunk)
            memo = fh.hexdigest()
            _MEMO[(str(f.resolve()), st.st_size, st.st_mtime_ns)] = memo
        h.update(str(f.relative_to(base)).encode() + b"\0" + memo.encode() + b"\n")
    return h.hexdigest()


_MEMO: dict[tuple[str, int, int], str] = {}


def file_inputs(tree: Any, base: Path | None = None) -> dict[str, str]:
    """Content hashes of every existing file or directory named by a string value in a config tree.

    This is what makes "inputs unchanged" mean the data too, not only the file name.
    """
    out: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
        elif isinstance(node, str) and ("/" in node or "." in node) and len(node) < 4096:
            p = Path(node) if base is None or Path(node).is_absolute() else base / node
            try:
                if p.exists() and (p.is_file() or p.is_dir()):
                    out[node] = hash_path(p)
            except OSError:
                pass

    walk(tree)
    return out


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Artifact:
    """A completed stage output."""

    kind: str
    id: str
    key: str
    version: int
    path: Path  # the artifact directory
    created_at: float
    config: dict = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)  # artifact ids (lineage)
    inputs: dict[str, str] = field(default_factory=dict)  # file -> content hash
    content_hash: str | None = None  # of the artifact's main output (model or data)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # stage-specific (export version, watermark, item count ...)
    seconds: float | None = None

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def final(self) -> Path:
        return self.path / "run" / "final"

    def to_json(self) -> dict:
        return {"kind": self.kind, "id": self.id, "key": self.key, "version": self.version, "created_at": self.created_at,
                "config": self.config, "parents": self.parents, "inputs": self.inputs, "content_hash": self.content_hash,
                "metrics": self.metrics, "extra": self.extra, "seconds": self.seconds}

    @classmethod
    def from_dir(cls, path: Path) -> "Artifact":
        d = json.loads((path / ARTIFACT_FILE).read_text())
        return cls(kind=d["kind"], id=d["id"], key=d["key"], version=d["version"], path=path, created_at=d["created_at"],
                   config=d.get("config", {}), parents=d.get("parents", []), inputs=d.get("inputs", {}),
                   content_hash=d.get("content_hash"), metrics=d.get("metrics", {}), extra=d.get("extra", {}),
                   seconds=d.get("seconds"))


class Registry:
    """A directory-tree artifact registry (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ keys and lookup
    @staticmethod
    def make_key(kind: str, config: dict, inputs: dict[str, str], parents: Iterable["Artifact"]) -> str:
        return stable_hash({"kind": kind, "config": config, "inputs": inputs,
                            "parents": sorted((p.kind, p.content_hash or p.key) for p in parents)})

    def slot(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{kind}-{key[:12]}"

    def find(self, kind: str, key: str) -> Artifact | None:
        d = self.slot(kind, key)
        return Artifact.from_dir(d) if (d / ARTIFACT_FILE).is_file() else None

    def get(self, artifact_id: str) -> Artifact:
        kind = artifact_id.rsplit("-", 1)[0]
        d = self.root / kind / artifact_id
        if not (d / ARTIFACT_FILE).is_file():
            raise KeyError(f"registry {self.root}: no complete artifact {artifact_id!r}")
        return Artifact.from_dir(d)

    def list(self, kind: str | None = None) -> list[Artifact]:
        kinds = [kind] if kind else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        out = []
        for k in kinds:
            base = self.root / k
            if base.is_dir():
                out += [Artifact.from_dir(d) for d in base.iterdir() if (d / ARTIFACT_FILE).is_file()]
        return sorted(out, key=lambda a: (a.kind, a.version))

    def latest(self, kind: str, where: dict | None = None) -> Artifact | None:
        arts = [a for a in self.list(kind) if all(a.extra.get(k) == v for k, v in (where or {}).items())]
        return arts[-1] if arts else None

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """The artifact and all its ancestors, nearest first."""
        seen, out, todo = set(), [], [artifact]
        while todo:
            a = todo.pop(0)
            if a.id in seen:
                continue
            seen.add(a.id)
            out.append(a)
            for pid in a.parents:
                try:
                    todo.append(self.get(pid))
                except KeyError:
                    pass
        return out

    # ------------------------------------------------------------------ writing
    def commit(self, kind: str, key: str, *, config: dict, parents: Iterable[Artifact], inputs: dict[str, str],
               content: Path | None, metrics: dict | None = None, extra: dict | None = None,
               seconds: float | None = None) -> Artifact:
        """Seal the slot of (kind, key) as a complete artifact: artifact.json last, then the index line."""
        d = self.slot(kind, key)
        d.mkdir(parents=True, exist_ok=True)
        version = 1 + max((a.version for a in self.list(kind)), default=0)
        art = Artifact(kind=kind, id=d.name, key=key, version=version, path=d, created_at=time.time(), config=config,
                       parents=[p.id for p in parents], inputs=inputs,
                       content_hash=hash_path(content) if content is not None and content.exists() else None,
                       metrics=metrics or {}, extra=extra or {}, seconds=seconds)
        atomic_write_json(d / ARTIFACT_FILE, art.to_json())
        with open(self.root / "index.jsonl", "a") as f:
            f.write(json.dumps({"id": art.id, "kind": kind, "version": version, "parents": art.parents,
                                "created_at": art.created_at}) + "\n")
        return art

    # ------------------------------------------------------------------ production pointer
    def production(self) -> dict | None:
        p = self.root / PRODUCTION_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def production_artifact(self) -> Artifact | None:
        prod = self.production()
        return self.get(prod["artifact"]) if prod else None

    def promote(self, artifact: Artifact, reason: str, **info: Any) -> dict:
        """Make ``artifact`` the production policy: one atomic rename, then a history line."""
        record = {"artifact": artifact.id, "model": str(artifact.final), "promoted_at": time.time(), "reason": reason,
                  "previous": (self.production() or {}).get("artifact"), **info}
        atomic_write_json(self.root / PRODUCTION_FILE, record)
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record
