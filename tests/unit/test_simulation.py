"""A seeded simulation of supervision: ``decide`` against a model of a cluster whose
processes die, freeze and come back, over virtual time, thousands of ticks a seed.

After every tick: the decision's invariants (``decide.check``), at most one writer in
the rows and at most one server that could commit. After each storm, a calm spell: the
cluster must come back by itself (a running, available writer with a volume client;
every reader serving). A failing seed reproduces: ``pytest tests/unit/test_simulation.py
--seeds N`` runs seeds 0..N-1, and the failure names its seed and the last steps.
"""

from __future__ import annotations

import pytest

from borealis.control import decide as d
from borealis.control.lifecycle import InstanceState
from tests.unit.cluster_model import RUNNING, ClusterModel

TICKS = 2000
STORM_TICKS = 150  # faults for this long, then calm for CALM_TICKS
CALM_TICKS = 60


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", range(metafunc.config.getoption("seeds")))


def run(model: ClusterModel) -> None:
    for tick in range(TICKS):
        calm = tick % (STORM_TICKS + CALM_TICKS) >= STORM_TICKS
        model.nemesis(calm)
        model.advance()
        obs = model.observe()
        actions = d.decide(obs)
        d.check(obs, actions)
        model.act(actions)
        model.check()
        if tick % (STORM_TICKS + CALM_TICKS) == STORM_TICKS + CALM_TICKS - 1:
            recovered(model)


def recovered(model: ClusterModel) -> None:
    writer = model.writer()
    assert writer is not None and writer.proc == RUNNING, "no writer after the calm"
    assert writer.state == InstanceState.AVAILABLE and model.client_alive
    for s in model.servers.values():
        assert s.proc == RUNNING and s.state == InstanceState.AVAILABLE, \
            f"{s.id} is {s.state}/{s.proc} after the calm"


def test_supervision_keeps_its_invariants_and_recovers(seed: int) -> None:
    model = ClusterModel.new(seed, readers=seed % 3)
    try:
        run(model)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}\nlast steps:\n"
                             + "\n".join(model.trace[-40:])) from None
    assert model.failovers > 0 or seed % 3 == 0  # the storms did reach the writer
