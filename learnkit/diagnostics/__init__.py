"""Diagnostics: read what the callbacks recorded and explain it: plots, the health report, interpretation."""
from ..callbacks.monitor import HealthMonitor, health_cbs
from .health import Finding, HealthReport, Thresholds, diagnose
from .interpret import ClassificationInterpretation
from .ops import OpCounter
from .plots import grid, plot_color_dim, plot_series

__all__ = ['Finding', 'HealthReport', 'Thresholds', 'diagnose', 'HealthMonitor', 'health_cbs', 'ClassificationInterpretation', 'OpCounter', 'plot_color_dim',
           'plot_series', 'grid']
