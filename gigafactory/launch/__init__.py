"""`gigafactory launch`: write the files that start one training job on many nodes.

`spec.build_spec` validates the request (node and GPU counts, the config, the parallel layout against
nodes x GPUs, the time limit against the SIGTERM grace) and returns a `LaunchSpec`; `slurm.render_sbatch` and
`k8s.render_pytorchjob` (PyYAML) turn it into text; with fault_tolerance.enabled they hand over to `slurm_ft` and
`k8s_ft` (a torchft lighthouse plus one torchrun job per replica group). See docs/scale-out.md.
"""

from gigafactory.launch.k8s import render_pytorchjob
from gigafactory.launch.slurm import render_sbatch
from gigafactory.launch.spec import NCCL_ENV, LaunchSpec, build_spec

__all__ = ["LaunchSpec", "NCCL_ENV", "build_spec", "render_pytorchjob", "render_sbatch"]
