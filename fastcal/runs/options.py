"""The one configuration style of every command: a dataclass of settings, its fields the options.

A command's settings are a dataclass deriving from ``Settings`` whose fields are declared with
``setting(default, help=...)``. From it:

- every field is a command-line option (``add_options``): ``--field-name``, the underscore spelling
  ``--field_name`` accepted too, typed by the field's annotation, with a help line made of the field's
  documentation and its default; booleans get ``--flag`` / ``--no-flag``;
- ``--config FILE`` reads a YAML mapping of field names (dashes or underscores);
- precedence, lowest first: the field defaults, the method's published recipe (a config's
  ``resolved()`` fills the fields left ``None`` from it), the YAML file, the command line;
- unknown keys and values of the wrong type are errors naming the key (``--lr: expected a number, got
  'fast'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastcal._checks import fail

# A field's metadata: "help" (its documentation), and for the command line "flags" (more spellings,
# e.g. "--lambda"), "negative" (a flag that sets a bool field to False, e.g. "--quiet" for progress).


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    flags: Sequence[str] = (),
    negative: str | None = None,
) -> Any:
    """A field of a ``Settings`` dataclass with its documentation (module docstring)."""
    metadata = {"help": help, "flags": tuple(flags), "negative": negative}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_yaml(path: str | Path, argument: str = "--config") -> dict[str, Any]:
    """A YAML mapping of settings; a missing file, invalid YAML or a non-mapping is an error naming the
    file (``yaml.safe_load``: no tag runs code)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: expected a YAML file, got {path}, which does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise fail(argument, f"a YAML mapping in {path}", f"invalid YAML{line} ({problem})") from None
    if not isinstance(loaded, dict):
        raise fail(argument, f"a YAML mapping of settings in {path}", type(loaded).__name__)
    return loaded


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (``3`` -> int, ``1e-3`` -> float, ``none`` -> None, lists)."""
    import yaml

    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    # YAML 1.1 reads "1e-3" (no dot) as a string.
    try:
        float(text)
    except ValueError:
        return False
    return True


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint`` (strings parsed as YAML scalars); a value of
    another type is a ``ValueError`` naming ``name``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # "none" unsets a number or a list; a string setting keeps it (``--pretrained none``: random init)
        unset = isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
        if unset and type(None) in args and inner[0] is not str:
            return None
        return coerce(name, value, inner[0])
    if isinstance(value, str) and hint is not str:
        value = parse_scalar(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail(name, "true or false", repr(value))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail(name, "an integer", repr(value))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(name, "a number", repr(value))
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail(name, "a string", repr(value))
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise fail(name, "a list", repr(value))
        items = [coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(name, "a mapping", repr(value))
        return {str(k): coerce(f"{name}[{k!r}]", v, args[1]) for k, v in value.items()}
    if hint is Any:
        return value
    raise TypeError(f"{name}: unsupported setting type {hint!r}")


def flag(name: str) -> str:
    """The command-line spelling of a field: ``--n-ctx`` for ``n_ctx``."""
    return "--" + name.replace("_", "-")


def label(settings: type, name: str) -> str:
    """How errors name a field of ``settings``: its short spelling where it has one (``--lr`` for
    ``learning_rate``), else ``flag(name)``."""
    field = next((f for f in dataclasses.fields(settings) if f.name == name), None)
    extra = field.metadata.get("flags", ()) if field is not None else ()
    return extra[0] if extra else flag(name)


class Settings:
    """Mixin of the commands' settings dataclasses: construction from YAML and command-line values
    (module docstring), validation on construction (``validate``), conversion to a dict."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, labels: Mapping[str, str] | None = None) -> Any:
        """Settings from ``values`` (keys with dashes or underscores), each coerced to its field's type
        and the whole validated; ``labels`` name a key in errors (default: the key itself)."""
        hints = typing.get_type_hints(cls)
        known = set(cls.field_names())
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise fail("setting", "one of " + ", ".join(sorted(known)), repr(key))
            kwargs[name] = coerce((labels or {}).get(name, name), value, hints[name])
        return cls(**kwargs)  # type: ignore[call-arg]

    @classmethod
    def from_sources(
        cls, *, yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Any:
        """Field defaults < a YAML file < ``overrides`` (the command line: errors name the option)."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path))
        values.update(overrides or {})
        labels = {name: label(cls, name) for name in (overrides or {})}
        return cls.from_dict(values, labels=labels)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Any:
        """Check the values (raise ``ValueError`` naming the field); return ``self``. Runs on
        construction."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (coerced and validated)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _metavar(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _metavar(next(a for a in args if a is not type(None)))
    if origin in (list, tuple):
        return "A,B"
    if origin is dict:
        return "YAML"
    return {int: "N", float: "X", str: "TEXT"}.get(hint, "VALUE")


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    if field.default is not dataclasses.MISSING and field.default is not None:
        default = field.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        text += f" (default: {default})"
    return text.replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser, settings: type, *, title: str | None = None, skip: Sequence[str] = ()
) -> None:
    """One option per field of ``settings`` (module docstring), plus ``--config``; parsed values are left
    as strings (``options_from_args`` collects those given)."""
    parser.add_argument(
        "--config", metavar="YAML", help="a YAML file of settings (the command line overrides it)"
    )
    group = parser.add_argument_group(title or "settings")
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        if field.name in skip:
            continue
        spellings = [flag(field.name)] + ([f"--{field.name}"] if "_" in field.name else [])
        spellings += list(field.metadata["flags"])
        common = {"dest": field.name, "default": argparse.SUPPRESS, "help": _help(field)}
        hint = hints[field.name]
        if hint is bool or hint == (bool | None):
            negative = field.metadata["negative"]
            if negative is not None:
                group.add_argument(negative, action="store_false", **common)
            else:
                group.add_argument(*spellings, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(*spellings, metavar=_metavar(hint), **common)


def options_from_args(args: argparse.Namespace, settings: type) -> dict[str, Any]:
    """The fields given on the command line (``add_options``), by field name."""
    return {name: getattr(args, name) for name in settings.field_names() if hasattr(args, name)}


def settings_from_args(args: argparse.Namespace, settings: type) -> Any:
    """``settings`` from ``--config`` and the options given (``Settings.from_sources``); an error that
    names a field names its option instead (``lr: ...`` becomes ``--lr: ...``)."""
    try:
        return settings.from_sources(yaml_path=args.config, overrides=options_from_args(args, settings))
    except ValueError as error:
        name, colon, rest = str(error).partition(":")
        if colon and name in settings.field_names():
            raise ValueError(f"{label(settings, name)}:{rest}") from None
        raise
