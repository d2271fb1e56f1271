"""`gigafactory launch`: write the files that start one training job on many nodes.

`spec.build_spec` validates the request (node and GPU counts, the config, the parallel layout against
nodes x GPUs, the time limit against the SIGTERM grace) and returns a `LaunchSpec`; `render_sbatch` and
`render_pytorchjob` (PyYAML) turn it into text: slurm.py and k8s.py for one job, slurm_ft.py and k8s_ft.py with
fault_tolerance.enabled (a torchft lighthouse plus one torchrun job per replica group). See docs/scale-out.md.
"""

from gigafactory.launch.k8s import render_pytorchjob_plain
from gigafactory.launch.k8s_ft import render_ft
from gigafactory.launch.slurm import render_sbatch_plain
from gigafactory.launch.slurm_ft import render_sbatch_ft
from gigafactory.launch.spec import NCCL_ENV, LaunchSpec, build_spec


def render_sbatch(spec: LaunchSpec, script_name: str = "job.sbatch") -> str:
    return render_sbatch_ft(spec, script_name) if spec.fault_tolerant else render_sbatch_plain(spec, script_name)


def render_pytorchjob(spec: LaunchSpec) -> str:
    return render_ft(spec) if spec.fault_tolerant else render_pytorchjob_plain(spec)

__all__ = ["LaunchSpec", "NCCL_ENV", "build_spec", "render_pytorchjob", "render_sbatch"]
