"""`gigafactory simulate`: failures, restarts, checkpoints and goodput of one large training job.

`simulate(cfg)` runs the discrete-event model (engine.py) over seeds; `analytic` has Young's and Daly's optima and the
expected ETTR for exponential failures; `failures` reads the cited failure-rate TOML.
"""

from gigafactory.simulate.analytic import daly_interval, expected_ettr, young_interval
from gigafactory.simulate.config import ClusterSpec, JobSpec, SimConfig, SimSpec
from gigafactory.simulate.engine import RunResult, run_once
from gigafactory.simulate.failures import FailureClass, load_failure_classes
from gigafactory.simulate.runner import Report, simulate

__all__ = [
    "ClusterSpec", "JobSpec", "SimConfig", "SimSpec", "FailureClass", "RunResult", "Report",
    "simulate", "run_once", "load_failure_classes", "daly_interval", "young_interval", "expected_ettr",
]
