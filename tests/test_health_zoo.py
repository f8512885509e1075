"""The health report against the zoo of bench/zoo.py: real broken and healthy Fashion-MNIST runs, small versions.

Each run's own plain-torch measurement (its forward hooks, its evaluation loop, its weight snapshots) must
confirm its fault, or its health. Then the report must name that fault among its root causes at warning or
error severity (a broken run), or raise no warning or error at all (a healthy run). The recipes are defined
once, in bench/zoo.py, which `python bench/zoo.py` runs at a larger size and scores as a table."""
import importlib.util
import sys
from pathlib import Path

import pytest

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
