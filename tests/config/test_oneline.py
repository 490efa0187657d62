"""Tests for :mod:`ckptwise.config.oneline`: the one-line form of command-line flags."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

import ckptwise as cw
from ckptwise.config import Policy, parse_keep, parse_save, policy_from_config
from ckptwise.config.registry import KEEP, SAVE
from ckptwise.errors import ConfigError
from ckptwise.policy import RetentionPolicy, Trigger, after
from policy_support import all_of, any_of, keep_any

# -- 5. the one-line form --------------------------------------------------------------------

SAVE_LINES: list[tuple[str, Trigger]] = [
    (
        "every(1000, start=200) | on_improvement(eval_loss, mode=min)",
        any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss", "min")),
    ),
    ("every(1000)", cw.every(1000)),
    ("every(1000, 200)", cw.every(1000, start=200)),
    ("every(interval=1000)", cw.every(1000)),
    ("  every( 1000 ,start = 200 )|final  ", any_of(cw.every(1000, start=200), cw.on_final())),
    ("every(10_000)", cw.every(10_000)),
    # & binds tighter than |
    (
        "every(10) | every(20) & final",
        any_of(cw.every(10), all_of(cw.every(20), cw.on_final())),
    ),
    (
        "every(10) & every(20) | final",
        any_of(all_of(cw.every(10), cw.every(20)), cw.on_final()),
    ),
    (
        "every(10) & on_improvement(loss) | on_signal & final | never",
        any_of(
            all_of(cw.every(10), cw.on_improvement("loss")),
            all_of(cw.on_signal(), cw.on_final()),
            cw.never(),
        ),
    ),
    # parentheses
    (
        "(every(10) | every(20)) & final",
        all_of(any_of(cw.every(10), cw.every(20)), cw.on_final()),
    ),
    (
        "every(10) & (every(20) | (final))",
        all_of(cw.every(10), any_of(cw.every(20), cw.on_final())),
    ),
    (
        "((every(1000) & on_improvement(eval_loss)) | on_signal)",
        any_of(all_of(cw.every(1000), cw.on_improvement("eval_loss")), cw.on_signal()),
    ),
    # quoted strings
    ('on_improvement("eval/loss", "max")', cw.on_improvement("eval/loss", "max")),
    ("on_improvement('val acc', mode='max')", cw.on_improvement("val acc", "max")),
    ('on_file("1000")', cw.on_file("1000")),
    ("on_file('STOP NOW')", cw.on_file("STOP NOW")),
    # lists, variadic values and mappings
    ("at_steps(100, 200)", cw.at_steps([100, 200])),
    ("at_steps(100)", cw.at_steps([100])),
    ("at_steps(steps=[100, 200])", cw.at_steps([100, 200])),
    ("schedule({0: 2000, 10000: 500})", cw.schedule({0: 2000, 10_000: 500})),
    ("schedule(intervals={0: 2000})", cw.schedule({0: 2000})),
    ("on_signal(SIGTERM, SIGINT)", cw.on_signal(["SIGTERM", "SIGINT"])),
    ("on_signal(signals=[SIGTERM, SIGINT])", cw.on_signal(["SIGTERM", "SIGINT"])),
    ("on_signal(SIGUSR2, then=continue)", cw.on_signal("SIGUSR2", then="continue")),
    ("on_signal(then=continue)", cw.on_signal(then="continue")),
    # durations and numbers
    ("every_duration(30m)", cw.every_duration(timedelta(minutes=30))),
    ("every_duration(1h30m)", cw.every_duration(timedelta(hours=1, minutes=30))),
    ("every_duration(90)", cw.every_duration(timedelta(seconds=90))),
    ("every_duration('45m')", cw.every_duration(timedelta(minutes=45))),
    (
        "overhead_budget(0.02, first_after=5m)",
        cw.overhead_budget(0.02, first_after=timedelta(minutes=5)),
    ),
    ("optimal_interval(24h)", cw.optimal_interval(timedelta(hours=24))),
    (
        "optimal_interval(mtbf=2d, first_after=90s)",
        cw.optimal_interval(timedelta(days=2), first_after=timedelta(seconds=90)),
    ),
    ("geometric(100, 2.0, 5000)", cw.geometric(100, 2.0, 5000)),
    ("geometric(first=50, factor=1.5)", cw.geometric(50, 1.5)),
    (
        "on_improvement(accuracy, max, min_delta=0.01, patience=3)",
        cw.on_improvement("accuracy", "max", min_delta=0.01, patience=3),
    ),
    # flags without parentheses, and aliases
    ("on_signal", cw.on_signal()),
    ("final", cw.on_final()),
    ("final()", cw.on_final()),
    ("on_final", cw.on_final()),
    ("never", cw.never()),
    ("on_file", cw.on_file()),
    ("on_file(STOP)", cw.on_file("STOP")),
    ("geometric", cw.geometric()),
    ("every_steps(500)", cw.every(500)),
]


@pytest.mark.parametrize(("text", "expected"), SAVE_LINES, ids=[t for t, _ in SAVE_LINES])
def test_parse_save(text: str, expected: Trigger) -> None:
    assert parse_save(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("at_steps([100, 200])", cw.at_steps([100, 200])),
        ("on_signal([SIGTERM, SIGINT])", cw.on_signal(["SIGTERM", "SIGINT"])),
    ],
)
def test_parse_save_with_a_list_argument(text: str, expected: Trigger) -> None:
    assert parse_save(text) == expected


def test_one_line_form_equals_the_config_form() -> None:
    line = "every(1000, start=200) | on_improvement(eval_loss, mode=min)"
    assert Policy(parse_save(line), parse_keep("last(3) | best(1, eval_loss)")) == (
        policy_from_config(
            {
                "save": {"every": 1000, "start": 200, "on_improvement": {"metric": "eval_loss"}},
                "keep": {"last": 3, "best": {"n": 1, "metric": "eval_loss"}},
            }
        )
    )


KEEP_LINES: list[tuple[str, RetentionPolicy]] = [
    (
        "last(3) | best(1, eval_loss) | within(2h) | budget(1.5GiB)",
        keep_any(
            cw.keep_last(3),
            cw.keep_best(1, "eval_loss"),
            cw.keep_within(timedelta(hours=2)),
            cw.keep_budget(1_610_612_736),
        ),
    ),
    ("last(3)", cw.keep_last(3)),
    ("keep_last(3)", cw.keep_last(3)),
    ("keep_best(2, accuracy, max)", cw.keep_best(2, "accuracy", "max")),
    ("best(n=1, metric='eval/loss')", cw.keep_best(1, "eval/loss")),
    ("best(eval_loss)", cw.keep_best(1, "eval_loss")),  # as `best: eval_loss` in a file
    ("best(eval_acc, mode=max)", cw.keep_best(1, "eval_acc", "max")),
    ("every(10000)", cw.keep_every(10_000)),
    ("keep_every(interval=500)", cw.keep_every(500)),
    ("within(1d12h)", cw.keep_within(timedelta(days=1, hours=12))),
    ("budget(22GB)", cw.keep_budget(22_000_000_000)),
    ("budget(1048576)", cw.keep_budget(2**20)),
    ("all", cw.keep_all()),
    ("keep_all", cw.keep_all()),
    ("(last(3) | all)", keep_any(cw.keep_last(3), cw.keep_all())),
    (
        "last(3) | (best(1, loss) | every(100))",
        keep_any(cw.keep_last(3), cw.keep_best(1, "loss"), cw.keep_every(100)),
    ),
]


@pytest.mark.parametrize(("text", "expected"), KEEP_LINES, ids=[t for t, _ in KEEP_LINES])
def test_parse_keep(text: str, expected: RetentionPolicy) -> None:
    assert parse_keep(text) == expected


ONE_LINE_ERRORS: list[tuple[Callable[[str], object], str, str]] = [
    (
        parse_save,
        "evry(1000)",
        r"unknown policy 'evry'; did you mean 'every'\? allowed: every, at_steps",
    ),
    (parse_save, "every(10) | keep_last(3)", r"'keep_last' is a retention policy"),
    (parse_keep, "first(3)", r"unknown policy 'first'; allowed: last, best, every"),
    (parse_save, "every(1, 2, 3)", r"every takes at most 2 positional values"),
    (parse_save, "final(1)", r"final takes at most 0 positional values"),
    (parse_keep, "last(3, 4)", r"last takes at most 1 positional values"),
    (parse_save, "every(1000", r"expected ',' or '\)'"),
    (parse_save, "every(1000,", r"expected a value, found the end"),
    (parse_save, "(every(10) | final", r"expected '\)', found the end"),
    (parse_save, "every(10))", r"unexpected '\)'"),
    (parse_save, "every(10) final", r"unexpected 'final'"),
    (parse_save, "at_steps([1, 2)", r"expected ',' or '\]', found '\)'"),
    (parse_save, "schedule({0: 2000)", r"expected ',' or '\}', found '\)'"),
    (parse_keep, "(last(3)", r"expected '\)', found the end"),
    (parse_save, "", r"expected a policy name, found the end"),
    (parse_save, "every(10) |", r"expected a policy name, found the end"),
    (parse_keep, "last(3) & best(1, eval_loss)", r"retention policies combine with '\|' only"),
    (parse_save, "every(10) ; final", r"cannot read .* at position"),
]


@pytest.mark.parametrize(
    ("parse", "text", "pattern"),
    ONE_LINE_ERRORS,
    ids=[f"{p.__name__}:{t}" for p, t, _ in ONE_LINE_ERRORS],
)
def test_one_line_errors_quote_the_input(
    parse: Callable[[str], object], text: str, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        parse(text)
    assert repr(text.rstrip()) in str(info.value)


def test_nested_and_in_a_keep_expression_quotes_the_input() -> None:
    text = "(last(3) & best(1, eval_loss)) | every(10)"
    with pytest.raises(ConfigError, match=r"retention policies combine with '\|' only") as info:
        parse_keep(text)
    assert repr(text) in str(info.value)


def test_one_line_value_errors_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"save\.every_duration\.interval: '30minutes'"):
        parse_save("every_duration(30minutes)")
    with pytest.raises(ConfigError, match=r"keep\.budget\.max_bytes: 'lots' is not a size"):
        parse_keep("budget(lots)")
    with pytest.raises(ConfigError, match=r"save\.every\.speed: unknown parameter"):
        parse_save("every(10, speed=3)")


# -- where the error is, and which form a misplaced policy belongs to ---------------------------


@pytest.mark.parametrize(
    ("parse", "text", "message", "caret"),
    [
        (parse_save, "every(1000", "expected ',' or ')', found the end", "          ^"),
        (parse_save, "every(10) ; final", "cannot read '; final' at position 10", "          ^"),
        (parse_save, "every(10) final", "unexpected 'final'", "          ^"),
        (parse_save, "every(10) | evry(3)", "unknown policy 'evry'", "            ^"),
        (parse_save, "at_steps([1, 2)", "expected ',' or ']'", "              ^"),
        (parse_keep, "last(3) & best(1, x)", "combine with '|' only", "        ^"),
        (parse_save, "every(1, 2, 3)", "every takes at most 2 positional values", "^"),
    ],
)
def test_one_line_errors_point_at_the_position(
    parse: Callable[[str], object], text: str, message: str, caret: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    first, quoted, pointer = str(info.value).split("\n")
    assert first.startswith(f"in {text!r}: ")
    assert message in first
    assert quoted == f"    {text}"
    assert pointer == f"    {caret}"


@pytest.mark.parametrize(
    ("parse", "text", "pattern"),
    [
        (parse_save, "last(3)", r"'last' is a retention policy, which goes under keep .* not save"),
        (parse_save, "keep_best(1, loss)", r"'keep_best' is a retention policy"),
        (parse_save, "every(5) | within(2h)", r"'within' is a retention policy"),
        (parse_keep, "on_improvement(loss)", r"'on_improvement' is a save trigger, .* not keep"),
        (parse_keep, "last(2) | final", r"'final' is a save trigger, which goes under save"),
        (parse_keep, "after(10, last(2))", r"'after' is a save trigger"),
    ],
)
def test_a_policy_of_the_other_kind_says_where_it_belongs(
    parse: Callable[[str], object], text: str, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse(text)


def test_every_is_both_a_trigger_and_a_retention_policy() -> None:
    assert parse_save("every(10)") == cw.every(10)
    assert parse_keep("every(10)") == cw.keep_every(10)


@pytest.mark.parametrize(
    ("parse", "source"), [(parse_save, "CKPTWISE_SAVE"), (parse_keep, "--keep")]
)
def test_errors_name_the_source_of_the_text(parse: Callable[..., object], source: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse("evry(10)", source=source)
    assert str(info.value).startswith(f"{source}='evry(10)': in 'evry(10)': unknown")


# -- after: the run-wide warm-up -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("after(2000, every(1000))", after(2000, cw.every(1000))),
        (
            "after(2000, every(1000) | on_improvement(eval_loss))",
            after(2000, any_of(cw.every(1000), cw.on_improvement("eval_loss"))),
        ),
        (
            "after(500, every(100)) | on_signal",
            any_of(after(500, cw.every(100)), cw.on_signal()),
        ),
        (
            "after(10, after(20, every(5)) | final)",
            after(10, any_of(after(20, cw.every(5)), cw.on_final())),
        ),
        ("after(10, after(20, every(5)))", after(10, after(20, cw.every(5)))),
        ("after(0, every(5) & final)", after(0, all_of(cw.every(5), cw.on_final()))),
    ],
)
def test_parse_after(text: str, expected: Trigger) -> None:
    assert parse_save(text) == expected


def test_after_in_one_line_equals_the_config_form() -> None:
    line = parse_save("after(2000, every(1000) | on_improvement(eval_loss))")
    assert (
        line
        == policy_from_config(
            {"save": {"after": 2000, "every": 1000, "on_improvement": "eval_loss"}}
        ).save
    )


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("after(x, every(1))", r"after\(start, triggers\) needs a step number, got 'x'"),
        ("after(10)", r"expected ',', found '\)'"),
        ("after(10, )", r"expected a policy name, found '\)'"),
        ("after(-1, every(1))", r"after\(start\) must be an integer >= 0, got -1"),
    ],
)
def test_after_errors(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_save(text)


# -- examples in the spelling of the line ---------------------------------------------------------

#: a bad value for each built-in policy, in the one-line form, and the example it gets
BAD_VALUES: list[tuple[Callable[[str], object], str, str]] = [
    (
        parse_save,
        "every(-5)",
        "save.every.interval: -5 is not a positive integer; e.g. every(1000)",
    ),
    (parse_save, "every(0)", "e.g. every(1000)"),
    (parse_save, "at_steps(-1)", "at_steps(steps) must be an integer >= 0, got -1"),
    (parse_save, "schedule({0: 0})", "schedule interval at step 0 must be a positive integer"),
    (parse_save, "geometric(first=0)", "e.g. geometric(first=100, factor=2.0, max_interval=5000)"),
    (parse_save, "geometric(factor=1)", "geometric(factor) must be a number > 1, got 1.0; e.g. "),
    (parse_save, "every_duration(-5)", "-5 is a negative duration; e.g. every_duration(30m)"),
    (parse_save, "every_duration(0s)", "'0s' is not a positive duration; e.g. every_duration(30m)"),
    (parse_save, "overhead_budget(2)", "e.g. overhead_budget(0.02)"),
    (parse_save, "optimal_interval(0)", "e.g. optimal_interval(4h)"),
    (parse_save, "optimal_interval(4h, first_after=-1)", "-1 is a negative duration"),
    (parse_save, "on_improvement(x, patience=-1)", "e.g. on_improvement(eval_loss, mode=min)"),
    (
        parse_save,
        "on_signal([])",
        "give at least one signal name; e.g. on_signal(SIGTERM, SIGUSR1)",
    ),
    (parse_save, "on_file('../x')", "on_file needs a plain file name inside the run folder"),
    (parse_keep, "last(0)", "keep.last.n: 0 is not a positive integer; e.g. last(3)"),
    (parse_keep, "best(0, eval_loss)", "e.g. best(2, eval_loss, mode=min)"),
    (parse_keep, "every(-10)", "e.g. every(10000)"),
    (parse_keep, "within(0)", "0 is not a positive duration; e.g. within(7d)"),
    (parse_keep, "budget(0)", "0 is not a positive size; e.g. budget(200GB)"),
]


@pytest.mark.parametrize(
    ("parse", "text", "expected"), BAD_VALUES, ids=[t for _, t, _ in BAD_VALUES]
)
def test_value_errors_of_a_line_speak_its_spelling_not_python(
    parse: Callable[[str], object], text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert expected in message
    for python in ("cw.", "timedelta(", "2**30", "('SIGTERM',)"):
        assert python not in message, python


def test_every_built_in_policy_is_covered_by_a_bad_value() -> None:
    named = {text.split("(")[0] for _, text, _ in BAD_VALUES}
    assert set(SAVE.names) - {"final", "never"} <= named
    assert set(KEEP.names) - {"all"} <= named
