"""The strict pydantic base for every config section, and the loader for DeepSpeed-style JSON configs.

Rules every section inherits:
- an unknown key is an error naming the key, its path, and the closest valid key;
- deprecated names are renamed with a warning (`_deprecated_keys`);
- keys we know from DeepSpeed but do not implement yet are rejected by name (`_unsupported_keys`);
- ``"auto"`` values stay as ``"auto"`` until the owning component resolves them
  (`resolve_auto`); `assert_no_auto` names any left over.
"""
from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = [
    "AUTO",
    "Auto",
    "ConfigError",
    "DSConfigModel",
    "is_auto",
    "load_config_source",
    "parse_config",
]

AUTO = "auto"
#: annotate a field that may hold ``"auto"``: ``batch: Union[int, Auto] = AUTO``
Auto = Literal["auto"]


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


class ConfigError(ValueError):
    """A config that cannot be used; the message says where and what to do."""


class DeprecatedConfigWarning(FutureWarning):
    pass


def _field_keys(cls: type[BaseModel]) -> dict[str, str]:
    """Accepted input key -> field name (names and aliases)."""
    keys: dict[str, str] = {}
    for name, info in cls.model_fields.items():
        keys[name] = name
        if info.alias:
            keys[info.alias] = name
        if isinstance(info.validation_alias, str):
            keys[info.validation_alias] = name
    return keys


class DSConfigModel(BaseModel):
    """Base for config sections: strict, documented, DeepSpeed-compatible key names."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        validate_assignment=True,
        arbitrary_types_allowed=True,
        protected_namespaces=(),
    )

    #: old key -> (new key, value transform or None); renamed with a warning
    _deprecated_keys: ClassVar[dict[str, tuple[str, Callable[[Any], Any] | None]]] = {}
    #: key -> why it is rejected (e.g. "not supported yet: needs ZeRO stage 3")
    _unsupported_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, (new, transform) in cls._deprecated_keys.items():
            if old in data:
                if new in data:
                    raise ValueError(f"'{old}' is a deprecated name for '{new}'; give only '{new}'")
                warnings.warn(
                    f"config key '{old}' is deprecated; use '{new}'", DeprecatedConfigWarning, stacklevel=2
                )
                value = data.pop(old)
                data[new] = transform(value) if transform else value
        known = _field_keys(cls)
        for key in data:
            if key in cls._unsupported_keys:
                raise ValueError(f"'{key}' is not supported yet: {cls._unsupported_keys[key]}")
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown key '{key}'{hint} (valid keys: {', '.join(sorted(known))})")
        return data

    # -- "auto" handling ----------------------------------------------------------------------
    def auto_fields(self, prefix: str = "") -> list[str]:
        """Dotted paths of every field still set to ``"auto"``, nested sections included."""
        found = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            path = f"{prefix}{name}"
            if is_auto(value):
                found.append(path)
            elif isinstance(value, DSConfigModel):
                found.extend(value.auto_fields(prefix=path + "."))
        return found

    def resolve_auto(self, field: str, value: Any) -> None:
        """Replace an ``"auto"`` field with the value its owner computed; other values stay."""
        if is_auto(getattr(self, field)):
            setattr(self, field, value)

    def assert_no_auto(self, what: str = "config") -> None:
        left = self.auto_fields()
        if left:
            raise ConfigError(
                f"{what}: these keys are still \"auto\" and nothing here can fill them: {', '.join(left)}. "
                "Give explicit values (\"auto\" is resolved by the Hugging Face integration or by "
                "ds_train.initialize where it knows the answer)."
            )


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if msg.startswith("unknown key '"):
            key = msg.split("'")[1]
            loc = f"{loc}.{key}" if loc else key
        elif err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def load_config_source(source: str | os.PathLike | Mapping[str, Any] | None, env_var: str = "DS_CONFIG") -> dict:
    """A config as a plain dict from a dict, a JSON file path, a JSON string, or the path in `env_var`."""
    if source is None:
        path = os.environ.get(env_var)
        if not path:
            raise ConfigError(f"no config given and ${env_var} is not set; pass a dict or a JSON file path")
        source = path
    if isinstance(source, Mapping):
        return json.loads(json.dumps(dict(source)))  # deep copy; also rejects non-JSON values early
    text_source = str(source)
    if isinstance(source, str) and text_source.lstrip().startswith("{"):
        return _parse_json(text_source, "<config string>")
    path = Path(text_source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return _parse_json(path.read_text(encoding="utf-8"), str(path))


def _parse_json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON in {where}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a config must be a JSON object, got {type(data).__name__}")
    return data


def parse_config(model: type[DSConfigModel], source: Any, env_var: str = "DS_CONFIG") -> DSConfigModel:
    """Validate `source` (dict, file path, JSON string, or $env_var) against `model`, with clear errors."""
    if isinstance(source, model):
        return source
    where = "dict" if isinstance(source, Mapping) else str(source if source is not None else f"${env_var}")
    data = load_config_source(source, env_var=env_var)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None
