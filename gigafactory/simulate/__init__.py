"""`gigafactory simulate`: failures, restarts, checkpoints and goodput of one large training job.

`simulate(cfg)` runs the discrete-event model (engine.py) over seeds; `analytic` has Young's and Daly's optima and the
expected ETTR for exponential failures; `expected` applies it to a configuration in either recovery mode (job-restart
or replica groups, replica.py); `failures` reads the cited failure-rate TOML.
"""

from gigafactory.simulate.analytic import daly_interval, expected_ettr, young_interval
from gigafactory.simulate.config import ClusterSpec, JobSpec, SimConfig, SimSpec
from gigafactory.simulate.engine import RunResult
from gigafactory.simulate.failures import FailureClass, load_failure_classes
from gigafactory.simulate.recovery import RecoverySpec
from gigafactory.simulate.runner import Report, run_once, simulate

__all__ = [
    "ClusterSpec", "JobSpec", "SimConfig", "SimSpec", "RecoverySpec", "FailureClass", "RunResult", "Report",
    "simulate", "run_once", "load_failure_classes", "daly_interval", "young_interval", "expected_ettr",
]
