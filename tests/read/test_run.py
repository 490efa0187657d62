"""The read-only run: listing, resolving, loading, restoring, verifying, exporting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptwise as cw
from tiny_state import make_state, train_step


def _write_run(root: Path) -> dict[str, torch.Tensor]:
    """Steps 1..4 of a tiny model, eval_loss best at 2; returns the weights of step 2."""
    state = make_state()
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.4}
    best: dict[str, torch.Tensor] = {}
    with cw.CheckpointManager(root, save=cw.every(1)) as manager:
        for step, loss in losses.items():
            train_step(state)
            manager.step(step, state, metrics={"eval_loss": loss})
            if step == 2:
                best = {k: v.clone() for k, v in state["model"].state_dict().items()}
    return best


def test_a_run_lists_resolves_and_loads_without_the_lock(run_dir: Path) -> None:
    best = _write_run(run_dir)
    with cw.CheckpointManager(run_dir, save=cw.every(1)):  # a writer holds the lock
        run = cw.open_run(run_dir)
        assert run.steps() == [1, 2, 3, 4]
        assert [c.step for c in run.checkpoints()] == [1, 2, 3, 4]
        assert run.checkpoints()[0].variant == "full"
        assert run.latest_step() == 4
        assert run.best_step("eval_loss") == 2
        assert run.best_step("eval_loss", "max") == 1
        assert run.resolve("best", metric="eval_loss") == 2
        assert run.resolve("latest") == run.resolve(None) == run.resolve("4") == 4
        model = run.load(2)["model"]
        for name, tensor in best.items():
            assert torch.equal(model[name], tensor)


def test_resolve_names_the_problem(run_dir: Path) -> None:
    _write_run(run_dir)
    run = cw.open_run(run_dir)
    with pytest.raises(cw.ConfigError, match="needs the metric"):
        run.resolve("best")
    with pytest.raises(cw.ConfigError, match="'newest' is not a step"):
        run.resolve("newest")
    with pytest.raises(cw.CheckpointError, match=r"recorded: eval_loss"):
        run.best_step("accuracy")
    with pytest.raises(cw.CheckpointError, match="no committed checkpoint"):
        cw.open_run(run_dir / "empty").resolve("latest")


def test_restore_falls_back_past_a_damaged_checkpoint(run_dir: Path) -> None:
    _write_run(run_dir)
    run = cw.open_run(run_dir)
    oid = run.manifest(4).tensors["model/head.weight"].object
    (path,) = (run_dir / "objects").rglob(oid)
    path.write_bytes(b"\0" * path.stat().st_size)
    assert [(p.step, p.tensor) for p in run.verify()] == [(4, "model/head.weight")]
    fresh = make_state(seed=7)
    with pytest.warns(cw.RestoreWarning, match="step 4 fails verification"):
        assert run.restore(fresh) == 3
    with pytest.raises(cw.CorruptCheckpointError):
        run.restore(make_state(), step=4)


def test_restore_of_an_empty_run_returns_zero(tmp_path: Path) -> None:
    run = cw.open_run(tmp_path / "nothing")
    assert not run.exists()
    assert run.restore(make_state()) == 0
    assert run.read() is None


def test_pins_and_kept_reasons(run_dir: Path) -> None:
    _write_run(run_dir)
    run = cw.open_run(run_dir)
    run.pin(2)
    assert run.pins() == {2}
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        manager.step(5, {"model": make_state()["model"]})
    assert run.steps() == [1, 2, 3, 4]  # a Run reads the list it loaded until refresh()
    run.refresh()
    assert run.steps() == [2, 5]
    assert run.kept() == {2: ["pinned"], 5: ["last 1", "newest"]}
    run.unpin(2)
    assert run.pins() == set()
    with pytest.raises(cw.CheckpointNotFoundError):
        run.pin(3)


def test_usage_first_stored_and_diff(run_dir: Path) -> None:
    state = make_state(freeze=True)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in (1, 2):
            train_step(state)
            manager.step(step, state)
    run = cw.open_run(run_dir)
    usage = run.usage()
    assert [c.step for c in usage.checkpoints] == [1, 2]
    assert usage.saved_by_dedup > 0  # the frozen backbone is stored once
    assert usage.unique_bytes - usage.physical_bytes == usage.saved_by_compression
    stored = run.first_stored(2)
    assert stored["model/backbone.0.weight"] == 1
    assert stored["model/head.weight"] == 2
    changes = {c.name: c for c in run.diff(1, 2)}
    assert changes["model/backbone.0.weight"].status == "same"
    head = changes["model/head.weight"]
    assert head.status == "changed"
    assert head.changed_elements
    assert head.relative_change


def test_export_writes_plain_safetensors_and_hf_metadata(run_dir: Path, tmp_path: Path) -> None:
    best = _write_run(run_dir)
    config = tmp_path / "base"
    config.mkdir()
    (config / "config.json").write_text("{}")
    (config / "trainer_state.json").write_text("{}")
    out = tmp_path / "out"
    path = cw.open_run(run_dir).export(2, out, config_from=config)
    loaded = load_file(str(path))
    assert loaded.keys() == best.keys()
    assert all(torch.equal(loaded[k], best[k]) for k in best)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_manager_reads_through_its_run_only(run_dir: Path) -> None:
    _write_run(run_dir)
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        assert isinstance(manager.run, cw.Run)
        assert manager.run.latest_step() == 4
        assert manager.run.best_step("eval_loss") == 2
        for gone in ("latest_step", "best_step", "checkpoints", "pinned", "load", "store"):
            assert not hasattr(manager, gone), gone
