"""Async saves copy what the optimizer overwrites while training goes on, and nothing leaks in.

The checkpoint must hold exactly the state as it was when ``step()`` was called, whatever the
loop does next: the optimizer's next ``step()`` waits for the copy of its tensors, buffers
written in forward are copied before ``step()`` returns, and any other in-place write before
the copy finished fails the save instead of mixing two states.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckptwise as cw
import ckptwise.snapshot.copying as copying
from ckptwise.save.pipeline import AsyncPath
from ckptwise.snapshot.copying import SnapshotCopier, optimizers_in


class Gate:
    """Holds the background copy back until released (the training thread is not touched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        fill = copying._fill

        def gated(target: torch.Tensor, source: torch.Tensor) -> None:
            self.entered.set()
            self.open.wait(timeout=60)
            fill(target, source)

        monkeypatch.setattr(copying, "_fill", gated)


def deferring(run_dir: Path) -> cw.CheckpointManager:
    """A manager saving every step in the background, its copy deferred (``defer_copy``)."""
    return cw.CheckpointManager(
        run_dir, save=cw.every(1), async_save=True, defer_copy=True, rng=False
    )


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate(monkeypatch)
    yield g
    g.open.set()


class Net(nn.Module):
    """A linear layer and a BatchNorm, whose running stats forward updates in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.lin(x))
        return out


def net_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Net()
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1)}


def forward_backward(state: dict[str, Any]) -> None:
    state["optimizer"].zero_grad()
    state["model"](torch.randn(8, 16)).pow(2).mean().backward()


def train(state: dict[str, Any]) -> None:
    forward_backward(state)
    state["optimizer"].step()


def frozen(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Clones of every saved tensor of model and optimizer, as they are now."""
    out = {f"model/{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for i, per_param in state["optimizer"].state_dict()["state"].items():
        for k, v in per_param.items():
            out[f"optimizer/{i}/{k}"] = v.clone()
    return out


def saved(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    values = cw.open_run(run_dir).load(step)
    out = {f"model/{k}": v for k, v in values["model"].items()}
    for i, per_param in values["optimizer"]["state"].items():
        for k, v in per_param.items():
            out[f"optimizer/{i}/{k}"] = v
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_step_returns_before_the_copy_and_the_next_optimizer_step_waits_for_it(
    run_dir: Path, gate: Gate
) -> None:
    state = net_state()
    train(state)
    with deferring(run_dir) as manager:
        manager.step(1, state)  # returns although the copy is held back
        assert gate.entered.wait(10)
        at_save = frozen(state)
        forward_backward(state)  # the next forward and backward overlap the copy
        stepper = threading.Thread(target=state["optimizer"].step)
        stepper.start()
        stepper.join(timeout=0.5)
        assert stepper.is_alive(), "optimizer.step() ran before the copy of its tensors"
        gate.open.set()
        stepper.join(timeout=30)
        assert not stepper.is_alive()
        manager.wait()
        after = frozen(state)
    assert_same(saved(run_dir, 1), at_save)
    assert not torch.equal(after["model/lin.weight"], at_save["model/lin.weight"])


def test_buffers_written_in_forward_are_copied_before_step_returns(
    run_dir: Path, gate: Gate
) -> None:
    state = net_state()
    train(state)
    with deferring(run_dir) as manager:
        manager.step(1, state)
        at_save = frozen(state)
        forward_backward(state)  # BatchNorm updates its running stats in place
        assert not torch.equal(state["model"].bn.running_mean, at_save["model/bn.running_mean"])
        gate.open.set()
        manager.wait()
    assert_same(saved(run_dir, 1), at_save)


def test_an_unguarded_in_place_write_fails_the_save_rather_than_mixing_states(
    run_dir: Path, gate: Gate
) -> None:
    state = net_state()
    train(state)
    with deferring(run_dir) as manager:
        manager.step(1, state)
        with torch.no_grad():
            state["model"].lin.weight.mul_(0.5)  # not through the optimizer: no hook sees it
        gate.open.set()
        with pytest.raises(cw.SnapshotError, match=r"lin\.weight.*drop defer_copy=True"):
            manager.wait()
        assert cw.open_run(run_dir).steps() == []
        train(state)
        manager.step(2, state)  # the next save copies afresh and succeeds
        at_save = frozen(state)
        manager.wait()
    assert_same(saved(run_dir, 2), at_save)


def test_a_parameter_shared_by_two_optimizers_holds_back_both(run_dir: Path, gate: Gate) -> None:
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(64))
    own = nn.Parameter(torch.randn(64))
    first = torch.optim.SGD([own], lr=0.1)
    second = torch.optim.SGD([shared], lr=0.1)
    model = nn.ParameterDict({"shared": shared, "own": own})
    state = {"model": model, "a": torch.optim.SGD([shared, own], lr=0.1), "b": first, "c": second}
    with deferring(run_dir) as manager:
        manager.step(1, state)
        before = shared.detach().clone()
        torch.autograd.backward(shared.sum() + own.sum())
        threads = []
        for opt in (first, second):  # "c" owns only the parameter it shares with "a"
            stepper = threading.Thread(target=opt.step)
            stepper.start()
            stepper.join(timeout=0.3)
            assert stepper.is_alive()
            threads.append(stepper)
        gate.open.set()
        for t in threads:
            t.join(timeout=30)
        manager.wait()
    assert torch.equal(cw.open_run(run_dir).load(1)["model"]["shared"], before)


def test_wrapped_optimizers_are_found_and_unhookable_ones_copied_at_once() -> None:
    class Wrapper:  # as accelerate's and Lightning's wrappers do: .optimizer is the real one
        def __init__(self, optimizer: Any) -> None:
            self.optimizer = optimizer

    class Handmade:  # an optimizer torch's hooks cannot see
        def state_dict(self) -> dict[str, Any]:
            return {}

    inner = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    found = optimizers_in([Wrapper(Wrapper(inner)), Handmade(), inner, 3])
    assert found == [inner]


def test_accelerate_wrapped_optimizer_is_guarded(run_dir: Path, gate: Gate) -> None:
    accelerate = pytest.importorskip("accelerate")
    model = nn.Linear(8, 8)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    wrapped = accelerate.Accelerator(cpu=True).prepare(inner)
    assert wrapped is not inner
    assert wrapped.optimizer is inner
    state = {"model": model, "optimizer": wrapped}
    model(torch.randn(2, 8)).sum().backward()
    wrapped.step()
    with deferring(run_dir) as manager:
        manager.step(1, state)
        before = model.weight.detach().clone()
        model(torch.randn(2, 8)).sum().backward()
        stepper = threading.Thread(target=wrapped.step)
        stepper.start()
        stepper.join(timeout=0.3)
        assert stepper.is_alive()
        gate.open.set()
        stepper.join(timeout=30)
        manager.wait()
    assert torch.equal(cw.open_run(run_dir).load(1)["model"]["weight"], before)


def test_close_removes_the_hooks(run_dir: Path) -> None:
    state = net_state()
    train(state)
    manager = deferring(run_dir)
    manager.step(1, state)
    assert state["optimizer"]._optimizer_step_pre_hooks
    manager.close()
    assert not state["optimizer"]._optimizer_step_pre_hooks
    train(state)  # no hook left to call into a closed manager


def test_steps_slowed_by_a_background_save_count_as_its_cost(run_dir: Path, gate: Gate) -> None:
    state = net_state()
    with cw.CheckpointManager(
        run_dir, save=cw.every(5), async_save=True, defer_copy=True, rng=False
    ) as manager:
        for step in range(1, 6):  # four quiet steps give the baseline; step 5 saves
            train(state)
            manager.step(step, state)
        costs = manager._decider.progress.costs
        assert costs[-1].total_seconds() < 0.9
        timer = threading.Timer(1.0, gate.open.set)
        timer.start()
        train(state)  # waits about 1 s in optimizer.step() for the copy
        manager.wait()
        manager.step(6, state)
        charged = costs[-1]
        assert charged.total_seconds() >= 0.9
        train(state)
        manager.step(7, state)  # quiet again: nothing more is charged
        assert costs[-1] == charged


def test_exit_without_close_finishes_copy_and_write(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import torch, ckptwise as cw
        from torch import nn
        torch.manual_seed(0)
        model = nn.Linear(256, 256)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        manager = cw.CheckpointManager({str(run_dir)!r}, save=cw.every(1), async_save=True)
        for step in range(1, 4):
            model(torch.randn(4, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
            manager.step(step, {{"model": model, "optimizer": opt}})
        torch.save(model.state_dict()["weight"].clone(), {str(tmp_path / "w.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    run = cw.open_run(run_dir)
    assert run.steps() == [1, 2, 3]
    assert run.verify() == []
    expected = torch.load(tmp_path / "w.pt")
    assert torch.equal(run.load(3)["model"]["weight"], expected)


OPS = st.lists(
    st.sampled_from(["forward", "backward_step", "zero_grad", "bn_train", "by_hand", "nothing"]),
    max_size=4,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, delay=st.sampled_from([0.0, 0.01]))
def test_checkpoint_is_the_state_at_step_or_the_save_fails(
    tmp_path_factory: pytest.TempPathFactory, ops: list[str], delay: float
) -> None:
    """Whatever the loop does after step(), with the copy still running or not: the saved
    tensors equal those at step() time, or (only after a write by hand) the save fails."""
    run_dir = tmp_path_factory.mktemp("run")
    state = net_state()
    train(state)
    with deferring(run_dir) as manager:
        manager.step(1, state)
        at_save = frozen(state)
        threading.Event().wait(delay)
        for op in ops:
            if op == "forward":
                state["model"](torch.randn(4, 16))
            elif op == "backward_step":
                train(state)
            elif op == "zero_grad":
                state["optimizer"].zero_grad(set_to_none=False)
            elif op == "bn_train":
                state["model"].bn(torch.randn(4, 16))
            elif op == "by_hand":
                with torch.no_grad():
                    state["model"].lin.bias.add_(1.0)
        try:
            manager.wait()
        except cw.SnapshotError:
            assert "by_hand" in ops
            return
    assert_same(saved(run_dir, 1), at_save)


def test_copier_without_optimizers_copies_everything_at_once() -> None:
    copier = SnapshotCopier()
    t = torch.arange(10.0)
    pending = copier.start({"t": t}, step=1)
    assert not pending.deferred
    t.add_(1)
    assert torch.equal(pending.result()["t"], torch.arange(10.0))
    copier.close()


@pytest.mark.parametrize("defer", [False, True])
def test_writes_the_version_counter_misses_are_in_the_next_copy(defer: bool) -> None:
    """An owner that writes through ``.data`` (DeepSpeed, an EMA, weight clipping) or numpy
    leaves the version counter alone: no save may serve the previous save's copy."""
    copier = SnapshotCopier(defer=defer)
    w = torch.zeros(8)
    assert torch.equal(copier.start({"ds/w": w}, step=1, untracked=["ds"]).result()["ds/w"], w)
    w.data.add_(1)  # invisible to w._version
    assert torch.equal(copier.start({"ds/w": w}, step=2, untracked=["ds"]).result()["ds/w"], w)
    copier.start({"other/w": w}, step=3).result()
    w.data.add_(1)
    assert torch.equal(copier.start({"other/w": w}, step=4).result()["other/w"], w)
    big = torch.zeros(10_000)
    copier.start({"big": big}, step=5).result()
    big.data[1] = 1.0  # one element: a sampled check missed this
    assert copier.start({"big": big}, step=6).result()["big"][1] == 1
    array = np.zeros(10_000, dtype=np.float32)
    copier.start({"pos": torch.from_numpy(array)}, step=7).result()
    array[3] = 7.0  # numpy never moves torch's version counter
    assert copier.start({"pos": torch.from_numpy(array)}, step=8).result()["pos"][3] == 7
    copier.close()


def test_an_ema_model_updated_through_data_is_saved_as_it_is_at_each_step(
    run_dir: Path,
) -> None:
    state = net_state()
    ema = Net()
    ema.load_state_dict(state["model"].state_dict())
    ema.requires_grad_(False)  # in no optimizer: nothing guards it, its copy may be reused
    state["ema"] = ema
    expected = {}
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        for step in (1, 2, 3):
            train(state)
            for e, p in zip(ema.parameters(), state["model"].parameters(), strict=True):
                e.data.mul_(0.9).add_(p.data, alpha=0.1)  # leaves the version counter alone
            manager.step(step, state)
            expected[step] = {k: v.clone() for k, v in ema.state_dict().items()}
        manager.wait()
    run = cw.open_run(run_dir)
    for step, values in expected.items():
        assert_same(dict(run.load(step)["ema"]), values)


def test_a_copy_that_does_not_fit_in_memory_is_taken_synchronously(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ckptwise.save.pipeline as pipeline_module

    state = net_state()
    train(state)
    monkeypatch.setattr(pipeline_module, "available_memory", lambda: 1024)
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        with caplog.at_level("WARNING", logger="ckptwise"):
            info = manager.step(1, state)
        assert info.save
        assert cw.open_run(run_dir).steps() == [1]  # committed before step() returned
        assert "saved synchronously" in caplog.text
        assert isinstance(manager._pipeline.path, AsyncPath)
        assert manager._pipeline.path.copier.pending is None


class KernelSGD(torch.optim.Optimizer):
    """Writes its parameters and state as a custom kernel does: past the version counter."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                moved = self.state[p].setdefault("moved", torch.zeros_like(p))
                moved.data.add_(p.grad)
                p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("kind", ["fused", "kernel", "torch"])
@pytest.mark.parametrize("with_optimizer", [True, False])
def test_what_an_optimizer_writes_past_the_version_counter_is_copied_again(
    run_dir: Path, with_optimizer: bool, kind: str
) -> None:
    """torch's fused kernels (the Trainer's default AdamW) and custom ones leave the version
    counter alone: reusing the previous copy would save the first save's weights again. Also
    when the save holds the model only (``weights_only()``), so no optimizer is in the state.
    Whichever kind of kernel wrote, every tensor is copied afresh at each save."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model[0].requires_grad_(False)
    if kind == "fused":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    elif kind == "kernel":
        optimizer = KernelSGD(model.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True)

    def train() -> None:
        optimizer.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        optimizer.step()

    state: dict[str, Any] = {"model": model}
    if with_optimizer:
        state["optimizer"] = optimizer
    train()
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        for step in (1, 2):
            if step == 2:
                version = model[1].weight._version
                train()
                assert (model[1].weight._version == version) == (kind != "torch")
            manager.step(step, state)
            at_save = {k: v.clone() for k, v in model.state_dict().items()}
            train()  # right after step(), while the save may still be copying
            manager.wait()
            for name, tensor in cw.open_run(run_dir).load(step)["model"].items():
                assert torch.equal(tensor, at_save[name]), (step, name)
        # nothing is served from an earlier save's copy: every tensor is copied before
        # step() returns, whatever wrote it (no copy is deferred without defer_copy=True)
        copied, deferred = manager.last_copy
        assert copied >= sum(t.nbytes for t in model.state_dict().values())
        assert deferred == 0
        if with_optimizer:
            first, second = (cw.open_run(run_dir).load(s)["optimizer"]["state"] for s in (1, 2))
            for one, two in zip(first.values(), second.values(), strict=True):
                for key, value in one.items():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        assert not torch.equal(value, two[key]), key


def test_an_optimizer_that_steps_while_another_s_copy_runs_does_not_fail_the_save(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    first, second = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(64))
    held = threading.Event()
    fill = copying._fill

    def gated(target: torch.Tensor, source: torch.Tensor) -> None:
        if source.data_ptr() == second.data_ptr():  # the second optimizer's copy waits
            held.wait(timeout=60)
        fill(target, source)

    monkeypatch.setattr(copying, "_fill", gated)
    opt_first = torch.optim.SGD([first], lr=0.1)
    opt_second = torch.optim.SGD([second], lr=0.1)
    model = nn.ParameterDict({"first": first, "second": second})
    state = {"model": model, "first": opt_first, "second": opt_second}
    with deferring(run_dir) as manager:
        manager.step(1, state)
        at_save = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.autograd.backward(first.sum() + second.sum())
        stepper = threading.Thread(target=opt_first.step)  # its own share is copied
        stepper.start()
        stepper.join(timeout=30)
        assert not stepper.is_alive(), "the first optimizer waited for the second's copy"
        assert not torch.equal(first.detach(), at_save["first"])
        held.set()
        opt_second.step()
        manager.wait()  # the first optimizer's write was its own step(): no SnapshotError
    loaded = cw.open_run(run_dir).load(1)["model"]
    assert_same(dict(loaded), at_save)


def test_a_closed_copier_lets_go_of_its_copies_and_their_sources() -> None:
    state = net_state()
    train(state)
    copier = SnapshotCopier()
    tensors = {"w": state["model"].lin.weight, "m": state["model"].bn.running_mean}
    copier.start(tensors, step=1, optimizers=[state["optimizer"]]).result()
    assert copier._buffers  # kept between saves, to spare fresh memory
    copier.close()
    assert copier._buffers == {}
