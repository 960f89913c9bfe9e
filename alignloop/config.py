"""Typed configs: YAML in, dotted overrides on the command line, strict validation.

Every stage declares one pydantic model nested by concern (model, peft, data,
optim, train, deepspeed, ray). Models are frozen and forbid unknown keys, so a
typo fails before any work with the key path and the file it came from; values
are never mutated after parsing. Field descriptions are the help text
(``alignloop <stage> --help-config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A config problem, with the file or override and the key path in the message."""


class Section(BaseModel):
    """Base for every config section: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); value parsed as YAML (``1e-4``, ``true``, ``[q,v]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def _check_key_path(cls: type[BaseModel], parts: list[str], origin: str) -> None:
    """Fail early with the known keys when an override names a key the schema lacks."""
    model: Any = cls
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:  # a dict-valued field: any key is allowed below it
            return
        if part not in fields:
            where = ".".join(parts[:i]) or "<top level>"
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{origin}: unknown key {'.'.join(parts[: i + 1])!r} (keys under {where}: {known})")
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:  # an optional section (``Section | None``) is still a section
            model = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            if i != len(parts) - 1:
                raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            return


def _set(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{origin}: {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional), apply dotted ``overrides``, validate into ``cls``."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
        # Check file keys too, so the message names the file.
        try:
            cls.model_validate(tree)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, origin)) from None
    for ov in overrides or []:
        parts, value = parse_override(ov)
        _check_key_path(cls, parts, f"override {ov!r}")
        _set(tree, parts, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        src = origin + (" + command-line overrides" if overrides else "")
        raise ConfigError(_format_errors(e, src)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the fully resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One help line per key: ``dotted.key (type, default): description``."""
    out: list[str] = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        key = f"{prefix}{name}"
        optional = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(describe(ann, key + "."))
        elif optional is not None:  # an optional section: its keys, under a line saying it may be left out
            out.append(f"{key} (optional section, default None): {f.description or ''}")
            out.extend(describe(optional, key + "."))
        else:
            tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            default = f.get_default(call_default_factory=True)
            out.append(f"{key} ({tname}, default {default!r}): {f.description or ''}")
    return out


def exact_div(a: int, b: int, what: str) -> int:
    """a / b when it divides exactly, else a ConfigError naming the quantity."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b
