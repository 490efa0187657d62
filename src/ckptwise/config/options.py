"""The manager options a policy file may set besides ``save`` and ``keep``.

``content`` (what each save holds), ``codec``, ``deltas``, ``async_save``, ``defer_copy``,
``on_busy`` and ``rng``: the keyword arguments of :class:`~ckptwise.CheckpointManager` that a training
script would otherwise set, so one file (``CKPTWISE_CONFIG=policy.yaml``) configures a whole
run. For example::

    content: {full_every: 5000, otherwise: {weights_only: {cast: bfloat16}}}
    codec: auto
    deltas: 8
    async_save: true
    on_busy: skip

A content value is ``full``, ``weights_only`` or ``trainable_only`` (bare, or a mapping of
``key``/``cast``), or ``full_every`` with ``interval`` and ``otherwise`` (the variant
between full saves, ``weights_only`` unless given).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckptwise.config.values import closest, read_int, read_positive_int, read_str
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy.content import (
    ContentPolicy,
    FullEvery,
    Variant,
    full,
    full_every,
    trainable_only,
    weights_only,
)

__all__ = [
    "OPTIONS",
    "dump_content",
    "dump_options",
    "read_content",
    "read_options",
    "read_variant",
]

_VARIANTS: dict[str, Callable[..., Variant]] = {
    "full": lambda: full(),
    "weights_only": weights_only,
    "weights": weights_only,
    "trainable_only": trainable_only,
    "trainable": trainable_only,
}
_VARIANT_NAMES = ("full", "weights_only", "trainable_only")
#: what a ``content`` value may name: the variants, and ``full_every`` of two of them
_CONTENT_NAMES = (*_VARIANT_NAMES, "full_every")


def read_variant(value: object, where: str, *, names: tuple[str, ...] = _VARIANT_NAMES) -> Variant:
    """``full``, ``weights_only`` or ``trainable_only``, bare or as ``{name: {key, cast}}``;
    ``names``: what the value at ``where`` may name, as an unknown name's error lists it."""
    params: object = {}
    if isinstance(value, str):
        name = value
    elif isinstance(value, Mapping) and len(value) == 1:
        name, params = next((str(k), v) for k, v in value.items())
        params = {} if params is True or params is None else params
    else:
        raise ConfigError(
            f"{where}: {value!r} is not a content variant; write one of "
            f"{', '.join(_VARIANT_NAMES)}, e.g. `weights_only` or "
            "`{weights_only: {cast: bfloat16}}`"
        )
    factory = _VARIANTS.get(name)
    if factory is None:
        # a mapping's key is a step further down the path than a bare name
        path = f"{where}.{name}" if isinstance(value, Mapping) else where
        raise ConfigError(
            f"{path}: unknown content policy {name!r}; {closest(name, [*names, *_VARIANTS])}"
            f"allowed: {', '.join(names)}"
        )
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.{name}: {params!r} is not a mapping of key and cast")
    allowed = () if name == "full" else ("key", "cast")
    kwargs: dict[str, Any] = {}
    for raw, item in params.items():
        key = str(raw)
        if key not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise ConfigError(
                f"{where}.{name}.{key}: unknown parameter; {closest(key, allowed)}{name} takes "
                f"{takes}"
            )
        kwargs[key] = None if item is None else read_str(item, f"{where}.{name}.{key}")
    try:
        return factory(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{name}: {exc}") from exc


def read_content(value: object, where: str = "content") -> ContentPolicy:
    """The content policy a config value describes (see the module docstring)."""
    if isinstance(value, Mapping) and "full_every" in value:
        items = {str(k): v for k, v in value.items()}
        inner = items.pop("full_every")
        params = {str(k): v for k, v in inner.items()} if isinstance(inner, Mapping) else {}
        if not isinstance(inner, Mapping):
            params["interval"] = inner
        params.update(items)  # `otherwise` may stand beside a bare interval
        path = f"{where}.full_every"
        allowed = ("interval", "otherwise")
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise ConfigError(
                f"{path}.{unknown[0]}: unknown parameter; {closest(unknown[0], allowed)}"
                "full_every takes interval, otherwise"
            )
        if "interval" not in params:
            raise ConfigError(f"{path}: full_every needs 'interval' (e.g. full_every: 5000)")
        try:
            interval = read_positive_int(params["interval"], f"{path}.interval")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; e.g. full_every: 5000") from exc
        otherwise = read_variant(params.get("otherwise", "weights_only"), f"{path}.otherwise")
        try:
            return full_every(interval, otherwise=otherwise)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return read_variant(value, where, names=_CONTENT_NAMES)


def _dump_variant(variant: Variant) -> object:
    name = {"full": "full", "weights": "weights_only", "trainable": "trainable_only"}[variant.kind]
    params = {k: v for k, v in (("key", variant.key), ("cast", variant.cast)) if v is not None}
    if params.get("key") == "model":
        del params["key"]
    return {name: params} if params else name


def dump_content(content: ContentPolicy) -> object:
    """``content`` as config data that :func:`read_content` reads back equal."""
    if isinstance(content, Variant):
        return _dump_variant(content)
    if isinstance(content, FullEvery):
        return {"full_every": content.interval, "otherwise": _dump_variant(content.otherwise)}
    raise CheckpointError(f"{content!r} has no config form (it is not a built-in content policy)")


def _read_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{where}: {value!r} is not true or false")


def _read_codec(value: object, where: str) -> str:
    from ckptwise.store import LOSSLESS  # the codec table, without torch

    codec = read_str(value, where)
    allowed = ["auto", *sorted(LOSSLESS)]
    if codec not in allowed:
        raise ConfigError(f"{where}: unknown codec {codec!r}; allowed: {', '.join(allowed)}")
    return codec


def _read_deltas(value: object, where: str) -> int | None:
    if value is None or value is False:
        return None
    deltas = read_int(value, where)
    if deltas < 1:
        raise ConfigError(
            f"{where}: {value!r} is not a keyframe interval; write a number >= 1 (e.g. 8), "
            "or null for no deltas"
        )
    return deltas


def _read_on_busy(value: object, where: str) -> str:
    choice = read_str(value, where)
    if choice not in ("wait", "skip"):
        raise ConfigError(f"{where}: {choice!r} is not 'wait' or 'skip'")
    return choice


#: each option's reader, in the order a written config lists them
OPTIONS: dict[str, Callable[[object, str], Any]] = {
    "content": read_content,
    "codec": _read_codec,
    "deltas": _read_deltas,
    "async_save": _read_bool,
    "defer_copy": _read_bool,
    "on_busy": _read_on_busy,
    "rng": _read_bool,
}


def read_options(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manager options that ``doc`` sets, as keyword arguments (absent ones left out)."""
    return {key: read(doc[key], key) for key, read in OPTIONS.items() if key in doc}


def dump_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (as :func:`read_options` returns them) as config data."""
    out: dict[str, Any] = {}
    for key in OPTIONS:
        value = options.get(key)
        if value is not None:
            out[key] = dump_content(value) if key == "content" else value
    return out
