"""The one-line form of policies, for command-line flags.

``every(1000, start=200) | on_improvement(eval_loss, mode=min)`` and
``last(3) | best(1, eval_loss)``: names and parameters from the registry, positional or
``key=value`` arguments, ``after(2000, ...)`` around any triggers, ``&`` binding tighter than ``|``, parentheses, quoted strings, lists
``[...]`` and mappings ``{k: v}``. A parsed line becomes the same data a config file holds,
so both forms give the same objects and the same error messages (quoting the line).
"""

from __future__ import annotations

import re
from typing import Any

from ckptwise.config.mapping import keep_from_data, save_from_data, unknown_policy
from ckptwise.config.registry import KEEP, SAVE, Registry
from ckptwise.errors import ConfigError
from ckptwise.policy.base import RetentionPolicy, Trigger

__all__ = ["parse_keep", "parse_save"]

_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"[^"]*"|'[^']*')|(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[()\[\]{},=|&:]))"""
)


def _caret(text: str, pos: int, message: str) -> ConfigError:
    """An error quoting ``text`` with a caret under position ``pos``."""
    return ConfigError(f"in {text!r}: {message}\n    {text}\n    {' ' * pos}^")


def _tokens(text: str) -> list[tuple[str, int]]:
    """The tokens of ``text``, each with the position where it starts."""
    out: list[tuple[str, int]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            while text[pos].isspace():
                pos += 1
            raise _caret(text, pos, f"cannot read {text[pos : pos + 10]!r} at position {pos}")
        group = match.lastgroup or "word"
        out.append((match.group(group), match.start(group)))
        pos = match.end()
    return out


def _describe(token: str | None) -> str:
    return "the end" if token is None else repr(token)


class _Parser:
    """Recursive descent over the tokens, producing config data."""

    def __init__(self, text: str, registry: Registry) -> None:
        self.text = text.rstrip()
        self.tokens = _tokens(text)
        self.pos = 0
        self.registry = registry

    def error(self, message: str, at: int | None = None) -> ConfigError:
        """An error about the token at ``at`` (default: the next one), with a caret."""
        index = self.pos if at is None else at
        where = self.tokens[index][1] if index < len(self.tokens) else len(self.text)
        return _caret(self.text, where, message)

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None, what: str = "more") -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            wanted = what if expected is None else repr(expected)
            raise self.error(f"expected {wanted}, found {_describe(token)}")
        self.pos += 1
        return token

    def parse(self) -> dict[str, Any]:
        node = self.expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}; policies combine with '|' or '&'")
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
        at = self.pos
        word = self.take(what="a policy name")
        if not (word[0].isalnum() or word[0] == "_"):
            raise self.error(f"expected a policy name, found {word!r}", at)
        if word == "after" and self.registry is SAVE:
            return self.after()
        spec = self.registry.get(word)
        if spec is None:
            other = KEEP if self.registry is SAVE else SAVE
            why = unknown_policy(word, self.registry, other)
            if other.get(word) is None:  # the one-line form has no key path to name it
                why = why.replace(f"unknown {self.registry.kind}", f"unknown policy {word!r}")
            raise self.error(why, at)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self.peek() == "(":
            self.take("(")
            while self.peek() != ")":
                if self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][0] == "=":
                    key = self.take()
                    self.take("=")
                    kwargs[key] = self.value()
                else:
                    args.append(self.value())
                if self.peek() == ",":
                    self.take()
                elif self.peek() != ")":
                    raise self.error(f"expected ',' or ')', found {_describe(self.peek())}")
            self.take(")")
        params: dict[str, Any] = {}
        # a lone value the file form takes as a shorthand reads the same here
        # (best(eval_loss), as best: eval_loss)
        short = spec.shorthand(args[0]) if spec.shorthand and len(args) == 1 else None
        if short is not None:
            params.update(short)
        elif spec.variadic and len(args) == 1 and isinstance(args[0], list):
            params[spec.params[0].name] = args[0]
        elif spec.variadic and args:
            params[spec.params[0].name] = args
        else:
            if len(args) > len(spec.params):
                raise self.error(f"{word} takes at most {len(spec.params)} positional values", at)
            params.update({p.name: a for p, a in zip(spec.params, args, strict=False)})
        params.update(kwargs)
        return {spec.name: params if params or spec.bare != "" else True}

    def after(self) -> dict[str, Any]:
        """``after(N, triggers)``: the ``after: N`` mapping beside the triggers' own."""
        self.take("(")
        at = self.pos
        start = self.value()
        if isinstance(start, bool) or not isinstance(start, int):
            raise self.error(f"after(start, triggers) needs a step number, got {start!r}", at)
        self.take(",")
        inner = self.expr()
        self.take(")")
        if "after" in inner:
            inner = {"any": [inner]}
        return {"after": start, **inner}

    def value(self) -> Any:
        token = self.take(what="a value")
        if token == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.take()
                elif self.peek() != "]":
                    raise self.error(f"expected ',' or ']', found {_describe(self.peek())}")
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
                elif self.peek() != "}":
                    raise self.error(f"expected ',' or '}}', found {_describe(self.peek())}")
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


def _named(source: str | None, text: str, exc: ConfigError) -> ConfigError:
    """``exc``, led by where ``text`` came from (an environment variable, a flag)."""
    return exc if source is None else ConfigError(f"{source}={text!r}: {exc}")


def parse_save(text: str, *, source: str | None = None) -> Trigger:
    """Parse the one-line save form, e.g. ``after(2000, every(1000) | on_signal)``.

    ``source`` names where the text came from (``"CKPTWISE_SAVE"``, ``"--save"``); errors
    start with it.
    """
    try:
        parser = _Parser(text, SAVE)
        node = parser.parse()
        try:
            return save_from_data(node, "save", spelling="line")
        except ConfigError as exc:
            raise ConfigError(f"in {parser.text!r}: {exc}") from exc
    except ConfigError as exc:
        raise _named(source, text, exc) from exc


def parse_keep(text: str, *, source: str | None = None) -> RetentionPolicy:
    """Parse the one-line keep form, e.g. ``last(3) | best(1, eval_loss)``; ``source`` as for
    :func:`parse_save`."""
    try:
        parser = _Parser(text, KEEP)
        node = parser.parse()
        if _has_and(node):
            at = next(i for i, (t, _) in enumerate(parser.tokens) if t == "&")
            raise parser.error("retention policies combine with '|' only, not '&'", at)
        try:
            return keep_from_data(node, "keep", spelling="line")
        except ConfigError as exc:
            raise ConfigError(f"in {parser.text!r}: {exc}") from exc
    except ConfigError as exc:
        raise _named(source, text, exc) from exc
