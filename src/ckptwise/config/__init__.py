"""Policies as data: YAML/TOML/JSON files, plain dicts and a one-line form for flags.

Every trigger and retention policy has a config name and named parameters (the same as
its Python function's). A mapping with several keys means "any of them" (``|``); ``any:``
and ``all:`` take lists for explicit ``|`` / ``&``. For example::

    save:
      every: 1000
      start: 200                       # belongs to `every`
      on_improvement: {metric: eval_loss, mode: min}
      on_signal: true
    keep:
      last: 3
      best: {n: 1, metric: eval_loss}

The one-line form writes the same with calls: ``every(1000, start=200) |
on_improvement(eval_loss, mode=min)`` and ``last(3) | best(1, eval_loss)``; the grammar is
in the README. :func:`to_config` turns policy objects back into a dict that
:func:`policy_from_config` rebuilds equal. Errors name the key path, the value and what is
allowed.

The modules: :mod:`~ckptwise.config.values` (durations, sizes, parameter readers),
:mod:`~ckptwise.config.files` (YAML, TOML and JSON files, refusing a key given twice),
:mod:`~ckptwise.config.registry` (the one table of built-in policies),
:mod:`~ckptwise.config.mapping` (dicts and files), :mod:`~ckptwise.config.oneline` and
:mod:`~ckptwise.config.record` (what a run records of its policies).
"""

from ckptwise.config.mapping import Policy, policy_from_config, to_config
from ckptwise.config.oneline import parse_keep, parse_save
from ckptwise.config.record import RankedBy, policy_ranking, policy_record, ranking_of
from ckptwise.config.values import format_duration, parse_bytes, parse_duration

__all__ = [
    "Policy",
    "RankedBy",
    "format_duration",
    "parse_bytes",
    "parse_duration",
    "parse_keep",
    "parse_save",
    "policy_from_config",
    "policy_ranking",
    "policy_record",
    "ranking_of",
    "to_config",
]
