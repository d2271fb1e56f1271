"""Check #SBATCH directives the way sbatch reads them (Slurm 22.05, sbatch(1)), without a Slurm controller.

`sbatch --test-only` needs a running slurmctld. What sbatch itself checks before it contacts one is restated here:
directives are read only from the top of the script (up to the first line that is neither a comment nor blank),
each must be an option sbatch knows (the long options listed in sbatch(1)), options that take no value must not
get one, and the values of the options the launcher writes must parse as Slurm parses them (--time as in
parse_time.c, --signal as `[{R|B}:]<sig_num>[@sig_time]` with sig_time in 0..65535, counts as positive integers).
`real_sbatch_errors` runs the real sbatch from Debian's slurm-client when it is installed: with a throwaway
slurm.conf it parses every directive and stops only at contacting the controller.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

# sbatch(1), Slurm 22.05, OPTIONS: long option -> "none" (flag), "optional" ([=value]) or "required" (=value).
OPTIONS: dict[str, str] = {name: "required" for name in (
    "account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container "
    "core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency error exclude "
    "export export-file extra-node-info gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task gres "
    "gres-flags hint input job-name kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind "
    "mem-per-cpu mem-per-gpu mincpus network nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu "
    "ntasks-per-node ntasks-per-socket open-mode output partition power prefer priority profile qos reservation "
    "signal sockets-per-node switches thread-spec threads-per-core time time-min tmp uid wait-all-nodes wckey wrap"
).split()}
OPTIONS.update({name: "none" for name in (
    "contiguous help hold ignore-pbs no-requeue overcommit oversubscribe parsable quiet reboot requeue spread-job "
    "test-only usage use-min-nodes verbose version wait"
).split()})
OPTIONS.update({name: "optional" for name in "exclusive get-user-env nice no-kill propagate".split()})

# parse_time.c time_str2mins: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes", "days-hours:minutes:seconds", or a word meaning no limit. Written apart from the launcher's
# own parser on purpose: the checker must not share the code it checks.
_TIME_FORMS = (r"\d+", r"\d+:\d+", r"\d+:\d+:\d+", r"\d+-\d+", r"\d+-\d+:\d+", r"\d+-\d+:\d+:\d+")


def _check_time(value: str) -> str | None:
    if value.upper() in ("INFINITE", "UNLIMITED", "-1") or any(re.fullmatch(form, value) for form in _TIME_FORMS):
        return None
    return "not a Slurm time"


_SIGNALS = {s.name[3:] for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")}


def _check_signal(value: str) -> str | None:
    m = re.fullmatch(r"(?:([RB]{1,2}):)?([A-Za-z0-9]+)(?:@(\d+))?", value)
    if not m:
        return "not [{R|B}:]<sig_num>[@sig_time]"
    sig = m.group(2).upper().removeprefix("SIG")
    if not (sig.isdigit() and 0 < int(sig) < 65) and sig not in _SIGNALS:
        return f"unknown signal {m.group(2)!r}"
    if m.group(3) is not None and not 0 <= int(m.group(3)) <= 0xFFFF:
        return "sig_time must be 0..65535"
    return None


_VALUES = {
    "time": _check_time,
    "signal": _check_signal,
    "nodes": lambda v: None if re.fullmatch(r"[1-9]\d*(-[1-9]\d*)?", v) else "not <minnodes>[-maxnodes]",
    "ntasks-per-node": lambda v: None if re.fullmatch(r"[1-9]\d*", v) else "not a positive count",
    "gpus-per-node": lambda v: None if re.fullmatch(r"([\w.-]+:)?[1-9]\d*", v) else "not [type:]<number>",
    "open-mode": lambda v: None if v in ("append", "truncate") else "not append|truncate",
    "exclusive": lambda v: None if v in ("", "user", "mcs") else "not user|mcs",
    "output": lambda v: None if v else "empty",
    "job-name": lambda v: None if v else "empty",
}


def sbatch_directives(script: str) -> list[tuple[str, str | None]]:
    """(option, value) for each #SBATCH line sbatch would read; AssertionError naming the first bad one."""
    lines = script.splitlines()
    assert lines and lines[0].startswith("#!"), "sbatch needs a #! line first"
    found: list[tuple[str, str | None]] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # sbatch stops reading directives at the first command
        if not stripped.startswith("#SBATCH"):
            continue
        m = re.fullmatch(r"#SBATCH\s+--([a-z][a-z-]*)(?:=(.*))?", stripped)
        assert m, f"directive sbatch cannot read: {line!r}"
        name, value = m.group(1), m.group(2)
        kind = OPTIONS.get(name)
        assert kind is not None, f"sbatch: unrecognized option '--{name}'"
        assert not (kind == "none" and value is not None), f"--{name} takes no value"
        assert not (kind == "required" and not value), f"--{name} needs a value"
        why = _VALUES.get(name, lambda v: None)(value or "")
        assert why is None, f"sbatch: invalid --{name}={value} ({why})"
        found.append((name, value))
    later = [line for line in lines if line.startswith("#SBATCH")]
    assert len(later) == len(found), "an #SBATCH line after the first command is ignored by sbatch"
    return found


def real_sbatch_errors(script_path: Path, work: Path) -> str | None:
    """Run the real `sbatch --test-only` against a throwaway slurm.conf: None when sbatch accepted every directive
    (it then fails only to reach the controller), else sbatch's complaint. Skips (returns "") without sbatch."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return ""
    conf = work / "slurm.conf"
    conf.write_text("ClusterName=check\nSlurmctldHost=localhost\nGresTypes=gpu\nNodeName=localhost CPUs=1 Gres=gpu:8 State=UNKNOWN\n"
                    "PartitionName=gpu Nodes=localhost Default=YES\nMessageTimeout=1\n")  # fail fast at the controller
    env = {**os.environ, "SLURM_CONF": str(conf)}
    proc = subprocess.run([sbatch, "--test-only", str(script_path)], env=env, cwd=work, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    return None if "Unable to contact slurm controller" in out else out.strip()
