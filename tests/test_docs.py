"""Every code block of the README and ``docs/`` runs, in order, one document at a time.

Python blocks run in one namespace per document (with the invisible setup blocks the
documents hold, see :mod:`docs_setup`), in a fresh working folder. Shell blocks run their
``ckptwise`` and ``torchrun`` commands for real there; ``export CKPTWISE_SAVE=...`` lines are parsed as the
adapter parses them; lines that install or set up the project are checked for what they
name (``pip install`` extras exist in ``pyproject.toml``, ``bash scripts/X.sh`` and ``python
-m bench.X`` exist), since running them would install from the network or run this suite
again. YAML blocks are policy files: written to ``policy.yaml`` and read by the library.
Blocks marked ``text`` (outputs, grammars) are not code.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser

from docs_setup import repo

pytestmark = pytest.mark.integration

ROOT = repo()
DOCUMENTS = ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
CKPTWISE = Path(sys.executable).with_name("ckptwise")


def _extras() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["optional-dependencies"])


def _commands(text: str) -> Iterator[list[str]]:
    """The shell commands of a block, continuation lines joined, comments dropped."""
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def run_shell(example: Example) -> None:
    for words in _commands(str(example.parsed)):
        head = words[0]
        if head == "ckptwise":
            proc = subprocess.run(
                [str(CKPTWISE), *words[1:]], capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stdout}{proc.stderr}"
        elif head == "export":
            import ckptwise as cw

            name, _, value = words[1].partition("=")
            parse = {"CKPTWISE_SAVE": cw.parse_save, "CKPTWISE_KEEP": cw.parse_keep}[name]
            parse(value)
            os.environ[name] = value
        elif words[:2] == ["pip", "install"]:
            for requirement in words[2:]:
                name, _, extras = requirement.partition("[")
                assert name == "ckptwise", requirement
                named = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
                assert named <= _extras(), f"{requirement}: no such extra"
        elif head == "torchrun":
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", *words[1:]],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
            )
            assert proc.returncode == 0, (
                f"{shlex.join(words)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        elif head == "bash":
            assert (ROOT / words[1]).is_file(), words
        elif words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, words
        else:
            raise AssertionError(f"the doc test does not know how to run: {shlex.join(words)}")


def write_policy(example: Example) -> None:
    import ckptwise as cw

    Path("policy.yaml").write_text(str(example.parsed))
    cw.policy_from_config("policy.yaml")


SYBIL = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language="bash", evaluator=run_shell),
        CodeBlockParser(language="yaml", evaluator=write_policy),
    ],
)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_code_block_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / name if name == "README.md" else ROOT / "docs" / name
    monkeypatch.chdir(tmp_path)
    for variable in ("CKPTWISE_SAVE", "CKPTWISE_KEEP", "CKPTWISE_CONFIG", "CKPTWISE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    document = SYBIL.parse(path)
    ran: list[Any] = []
    environment = dict(os.environ)  # the blocks' `export`s and fsspec settings stay here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the documents' models are tiny: threads would only contend
    try:
        for example in document.examples():
            example.evaluate()
            ran.append(example)
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)
    opened: list[str] = []  # the language of each fenced block, as it opens
    inside = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if not inside:
                opened.append(line[3:].strip())
            inside = not inside
    untested = [
        lang or "(none)" for lang in opened if lang not in ("python", "bash", "yaml", "text")
    ]
    assert not untested, f"{name}: blocks the doc test does not run or mark as text: {untested}"
    assert len(ran) >= sum(lang != "text" for lang in opened)
