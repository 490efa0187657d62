"""The one-line form of policies, for command-line flags.

``every(1000, start=200) | on_improvement(eval_loss, mode=min)`` and
``last(3) | best(1, eval_loss)``: names and parameters from the registry, positional or
``key=value`` arguments, ``&`` binding tighter than ``|``, parentheses, quoted strings, lists
``[...]`` and mappings ``{k: v}``. A parsed line becomes the same data a config file holds,
so both forms give the same objects and the same error messages (quoting the line).
"""

from __future__ import annotations

import re
from typing import Any

from ckptwise.config.mapping import keep_from_data, save_from_data
from ckptwise.config.registry import KEEP, SAVE, Registry
from ckptwise.errors import ConfigError
from ckptwise.policy.base import RetentionPolicy, Trigger

__all__ = ["parse_keep", "parse_save"]

_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"[^"]*"|'[^']*')|(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[()\[\]{},=|&:]))"""
)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ConfigError(f"cannot read {text!r} at position {pos}: {text[pos : pos + 10]!r}")
        out.append(match.group(match.lastgroup or "word"))
        pos = match.end()
    return out


class _Parser:
    """Recursive descent over the tokens, producing config data."""

    def __init__(self, text: str, registry: Registry) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.registry = registry

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"in {self.text!r}: {message}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise self.error(f"expected {expected or 'more'}, found {token or 'the end'}")
        self.pos += 1
        return token

    def parse(self) -> dict[str, Any]:
        node = self.expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> dict[str, Any]:
        parts = [self.term()]
        while self.peek() == "|":
            self.take()
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else {"any": parts}

    def term(self) -> dict[str, Any]:
        parts = [self.factor()]
        while self.peek() == "&":
            self.take()
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else {"all": parts}

    def factor(self) -> dict[str, Any]:
        if self.peek() == "(":
            self.take("(")
            node = self.expr()
            self.take(")")
            return node
        word = self.take()
        spec = self.registry.get(word)
        if spec is None:
            allowed = ", ".join(self.registry.names)
            raise self.error(f"unknown policy {word!r}; allowed: {allowed}")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self.peek() == "(":
            self.take("(")
            while self.peek() != ")":
                if self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1] == "=":
                    key = self.take()
                    self.take("=")
                    kwargs[key] = self.value()
                else:
                    args.append(self.value())
                if self.peek() == ",":
                    self.take()
                elif self.peek() != ")":
                    raise self.error(f"expected ',' or ')', found {self.peek()!r}")
            self.take(")")
        params: dict[str, Any] = {}
        if spec.variadic and len(args) == 1 and isinstance(args[0], list):
            params[spec.params[0].name] = args[0]
        elif spec.variadic and args:
            params[spec.params[0].name] = args
        else:
            if len(args) > len(spec.params):
                raise self.error(f"{word} takes at most {len(spec.params)} positional values")
            params.update({p.name: a for p, a in zip(spec.params, args, strict=False)})
        params.update(kwargs)
        return {spec.name: params if params or spec.bare != "" else True}

    def value(self) -> Any:
        token = self.take()
        if token == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.take()
            self.take("]")
            return items
        if token == "{":
            mapping = {}
            while self.peek() != "}":
                key = self.value()
                self.take(":")
                mapping[key] = self.value()
                if self.peek() == ",":
                    self.take()
            self.take("}")
            return mapping
        if token[0] in "\"'":
            return token[1:-1]
        for convert in (int, float):
            try:
                return convert(token)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(token.lower(), token)


def _has_and(node: Any) -> bool:
    if isinstance(node, dict):
        return any((k == "all" and isinstance(v, list)) or _has_and(v) for k, v in node.items())
    return isinstance(node, list) and any(_has_and(v) for v in node)


def parse_save(text: str) -> Trigger:
    """Parse the one-line save form, e.g. ``every(1000, start=200) | on_signal``."""
    parser = _Parser(text, SAVE)
    node = parser.parse()
    try:
        return save_from_data(node, "save")
    except ConfigError as exc:
        raise parser.error(str(exc)) from exc


def parse_keep(text: str) -> RetentionPolicy:
    """Parse the one-line keep form, e.g. ``last(3) | best(1, eval_loss)``."""
    parser = _Parser(text, KEEP)
    node = parser.parse()
    if _has_and(node):
        raise parser.error("retention policies combine with '|' only, not '&'")
    try:
        return keep_from_data(node, "keep")
    except ConfigError as exc:
        raise parser.error(str(exc)) from exc
