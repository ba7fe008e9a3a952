"""A plugin's typed config: the ``[plugins.config]`` table, parsed into the dataclass a
:class:`fanout_sdk.Sink` subclass declares as ``Config`` before ``init`` runs.

    @dataclass
    class Config:
        key_prefix: str = "my:"
        ttl_seconds: int = 3600

    class MySink(Sink):
        Config = Config
        def init(self, config, host): ...   # config is a Config

Unknown keys, missing fields without a default and values of the wrong type are refused with
an error naming the field (``config: ttl_seconds: expected int, got str 'x'``), as the Rust
SDK does. Field types understood: ``str``, ``int``, ``float``, ``bool``, ``list[T]``,
``dict[str, T]``, ``Optional[T]`` (``T | None``), nested dataclasses and ``typing.Any``.
``Config = dict`` takes the table as it is (untyped).
"""

import dataclasses
import json
import types
import typing


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The config of a plugin that takes no settings: only an empty (or absent) table parses."""


class ConfigError(ValueError):
    """A config that does not parse; the message names the field."""


def parse(config_class, text):
    """Parses a config as the host passes it (JSON text; blank means no table: ``{}``)."""
    if text is None or not str(text).strip():
        value = {}
    else:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError("config: %s" % e) from None
    return from_value(config_class, value)


def from_value(config_class, value):
    """Builds ``config_class`` (a dataclass, or ``dict``) from a decoded JSON value."""
    if config_class is dict:
        if not isinstance(value, dict):
            raise ConfigError("config: expected a table, got %s" % _show(value))
        return value
    return _build(config_class, value, "")


def _build(cls, value, path):
    if not isinstance(value, dict):
        raise ConfigError("config: %sexpected a table, got %s" % (_at(path), _show(value)))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        expected = ", ".join("`%s`" % n for n in fields) or "none"
        raise ConfigError("config: %sunknown field `%s`, expected one of %s"
                          % (_at(path), unknown[0], expected))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        sub = path + "." + name if path else name
        if name in value:
            kwargs[name] = _convert(hints.get(name, typing.Any), value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("config: %smissing field `%s`" % (_at(path), name))
    return cls(**kwargs)


def _convert(tp, value, path):
    if tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], value, path)
        for a in rest:
            try:
                return _convert(a, value, path)
            except ConfigError:
                continue
        raise ConfigError("config: %s: %s does not match %s" % (path, _show(value), tp))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError("config: %s: expected a list, got %s" % (path, _show(value)))
        item = args[0] if args else typing.Any
        return [_convert(item, v, "%s[%d]" % (path, i)) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError("config: %s: expected a table, got %s" % (path, _show(value)))
        item = args[1] if len(args) == 2 else typing.Any
        return {k: _convert(item, v, "%s.%s" % (path, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value  # a type this parser does not check
    raise ConfigError("config: %s: expected %s, got %s" % (path, tp.__name__, _show(value)))


def _at(path):
    return path + ": " if path else ""


def _show(value):
    return "%s %r" % ("null" if value is None else type(value).__name__, value)
