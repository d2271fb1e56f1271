"""Resilient training: a recovery-events log, a hang watchdog,
NaN/spike handling, a straggler report, fault injection for drills, and `gigafactory report`. See docs/resilience.md."""

from gigafactory.resilience.anomaly import AnomalyGuard, SpikeDetector, Verdict
from gigafactory.resilience.events import EventLog, read_events, record_start
from gigafactory.resilience.faults import FaultInjector, corrupt_checkpoint
from gigafactory.resilience.stragglers import StragglerMonitor, straggler_report
from gigafactory.resilience.watchdog import EXIT_HANG, Watchdog

__all__ = [
    "AnomalyGuard", "EXIT_HANG", "EventLog", "FaultInjector", "SpikeDetector", "StragglerMonitor",
    "Verdict", "Watchdog", "corrupt_checkpoint", "read_events", "record_start", "straggler_report",
]
