"""The health report against the zoo of bench/zoo.py: real broken and healthy Fashion-MNIST runs, small versions.

Each run's own plain-torch measurement (its forward hooks, its evaluation loop, its weight snapshots) must
confirm its fault, or its health. Then the report must name that fault among its root causes at warning or
error severity (a broken run), or raise no warning or error at all (a healthy run). The recipes are defined
once, in bench/zoo.py, which `python bench/zoo.py` runs at a larger size and scores as a table."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ZOO_PATH = Path(__file__).resolve().parent.parent / 'bench' / 'zoo.py'


def _load_zoo():
    spec = importlib.util.spec_from_file_location('bench_zoo', ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()


@pytest.fixture(scope='module', params=zoo.RECIPES, ids=lambda r: r.name)
def trained(request):
    "A zoo run trained at the test size (once for both tests of that run)."
    return request.param, request.param.run(zoo.TEST)


def test_the_measurement_confirms_the_fault_or_the_health(trained):
    recipe, run = trained
    assert run.measurement.conditions, f"{recipe.name} measured nothing"
    assert not run.measurement.failed, f"{recipe.name} ({recipe.fault}): measured {run.measurement}"


def test_the_report_names_the_cause(trained):
    recipe, run = trained
    report = run.learn.diagnose(show=False)
    assert zoo.report_agrees(recipe, report), zoo.disagreement(recipe, report)


def test_a_layer_dead_for_a_while_on_shuffled_labels_is_not_why_nothing_was_learned(monkeypatch):
    """The zoo's shuffled-labels run at bench size, seed 1: nothing can be learned (chance accuracy, the recipe's own
    evaluation), and the first Linear's outputs are almost all <= 0.05 for a stretch before they recover (the test's
    own forward hook). That layer works again at the end, so it cannot explain the chance accuracy: the report's
    root is metric_at_chance, whose advice says to check the labels; the collapse is a warning of its own."""
    shares = []
    def hooked_mlp(*widths, **kwargs):
        model = zoo.mlp.__wrapped__(*widths, **kwargs)
        model[1].register_forward_hook(
            lambda m, i, o: shares.append((o <= 0.05).float().mean().item()) if m.training else None)
        return model
    hooked_mlp.__wrapped__ = zoo.mlp
    monkeypatch.setattr(zoo, 'mlp', hooked_mlp)
    torch.manual_seed(1)
    torch.set_flush_denormal(True)
    try: run = zoo.shuffled_labels(zoo.BENCH)
    finally: torch.set_flush_denormal(False)
    assert not run.measurement.failed, run.measurement
    stretch = max(min(shares[i:i + 5]) for i in range(len(shares) - 4))
    assert stretch >= 0.95 and sum(shares[-20:]) / 20 < 0.95  # dead for 5 batches or more, alive at the end
    report = run.learn.diagnose(show=False)
    assert 'metric_at_chance' in {f.check for f in report.root_causes}, str(report)
    collapse, = report.by_check('activation_collapse')
    assert collapse.severity == 'warning' and collapse.cause is None and not report.consequences(collapse)
