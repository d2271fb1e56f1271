"""The sbatch script of a fault-tolerant job: a torchft lighthouse and one srun step per replica group.

Why this shape (docs/scale-out.md, "Fault-tolerant replica groups"):
- Each replica group is its own srun step over its own share of the nodes, with its own torchrun rendezvous (port
  + g, id `$SLURM_JOB_ID-group<g>`) and restart budget. `--kill-on-bad-exit` stays inside a step, so a group whose
  agent gives up ends only that group; the script starts it again (up to max_restarts times) and it heals from a
  live peer while the others keep stepping. `#SBATCH --no-kill` keeps the allocation when a node fails, so a lost
  node takes out its group, not the job.
- The lighthouse is a step of its own on the first node (`--overlap`, so it shares that node with group 0), started
  again if it exits: the groups' managers ride out its restart (quorum retries).
- Every step names its task count (--ntasks): srun would otherwise take the allocation's SLURM_NTASKS (all nodes).
- Stopping is the plain script's: USR1 before the time limit sends SIGTERM to every group's step, the ranks save,
  then the job is requeued; TERM (scancel, preemption) only stops restarts, since Slurm signals every task itself.
"""

from __future__ import annotations

import shlex

from gigafactory.launch.ft import group_flags, lighthouse_command
from gigafactory.launch.slurm import HEAD, head_fields
from gigafactory.launch.spec import LaunchSpec

_BODY = """\

# Stopping (docs/scale-out.md, section 5). {lead} s before the time limit Slurm sends USR1 to this script (--signal):
# SIGTERM goes through srun to every rank of every replica group, each saves within resilience.term_grace_s =
# {grace} s and exits, and the job is requeued under the same job id to resume from that checkpoint. scancel and
# preemption signal every task themselves: this script then only stops starting groups again and waits.
REQUEUE=0
STOPPING=0
N_GROUPS={groups}
NODES_PER_GROUP={npg}
declare -a GROUP_PID=() GROUP_RUNS=() GROUP_RC=()
on_time_limit() {{
  echo "job $SLURM_JOB_ID: time limit in {lead} s or less: SIGTERM to every rank of every replica group, then requeue"
  REQUEUE=1
  STOPPING=1
  local g
  for ((g = 0; g < N_GROUPS; g++)); do
    if [[ -n "${{GROUP_PID[g]:-}}" ]]; then kill -TERM "${{GROUP_PID[g]}}" 2>/dev/null || true; fi
  done
}}
trap on_time_limit USR1
trap 'echo "job $SLURM_JOB_ID: SIGTERM (scancel or preemption): every rank saves and exits"; STOPPING=1' TERM

# Replica groups (fault tolerance on torchft): {groups} groups of {npg} node(s), each its own srun step and torchrun
# rendezvous on its first node; every rank reaches the lighthouse on the job's first node.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${{#NODES[@]}} != N_GROUPS * NODES_PER_GROUP )); then
  echo "job $SLURM_JOB_ID: ${{#NODES[@]}} node(s) allocated, {nodes} expected" >&2
  exit 1
fi
PYTHON="${{PYTHON:-python3}}"
TORCHFT_LIGHTHOUSE="${{TORCHFT_LIGHTHOUSE:-{lighthouse_bin}}}"
LIGHTHOUSE_HOST="${{NODES[0]}}"
{lighthouse_address}
LIGHTHOUSE_PID=
echo "job $SLURM_JOB_ID (requeued ${{SLURM_RESTART_COUNT:-0}} times): ${{#NODES[@]}} node(s) in $N_GROUPS replica groups, lighthouse $LIGHTHOUSE"

start_lighthouse() {{
{start_lighthouse}
}}

# Before any group starts, the lighthouse must answer (up to 60 s): a node without torchft fails here, in one line.
wait_for_lighthouse() {{
{wait_lighthouse}
}}

# Group g: {npg} node(s) from node g*{npg} of the allocation; its torchrun agents restart its workers (up to {restarts}
# times) without touching the other groups; when they give up, --kill-on-bad-exit ends this step only.
start_group() {{
  local g=$1
  local hosts=("${{NODES[@]:g * NODES_PER_GROUP:NODES_PER_GROUP}}")
  local nodelist
  nodelist=$(IFS=,; echo "${{hosts[*]}}")
  srun --job-name="group$g" --nodes={npg} --ntasks={npg} --ntasks-per-node=1 --nodelist="$nodelist" --kill-on-bad-exit=1 --cpu-bind=none{container} \\
    "$PYTHON" -m torch.distributed.run \\
      --nnodes={npg} \\
      --nproc-per-node={gpus} \\
      --rdzv-backend=c10d \\
      --rdzv-endpoint="${{hosts[0]}}:$(( {port} + g ))" \\
      --rdzv-id="$SLURM_JOB_ID-group$g" \\
      --max-restarts={restarts} \\
      -m gigafactory.cli.main {train} {group_flags} &
  GROUP_PID[g]=$!
  GROUP_RUNS[g]=$(( ${{GROUP_RUNS[g]:-0}} + 1 ))
}}

start_lighthouse
if ! wait_for_lighthouse; then
  echo "job $SLURM_JOB_ID: the torchft lighthouse did not start at $LIGHTHOUSE (is torchft installed on the nodes? TORCHFT_LIGHTHOUSE names its binary)" >&2
  if [[ -n "$LIGHTHOUSE_PID" ]]; then kill -TERM "$LIGHTHOUSE_PID" 2>/dev/null || true; fi
  exit 1
fi
for ((g = 0; g < N_GROUPS; g++)); do start_group "$g"; done

# Watch the steps (polled, so the traps run within a second). A group whose step ended non-zero starts again, up
# to {restarts} times, unless the job is stopping; the lighthouse starts again whenever it exits.
while :; do
  running=0
  for ((g = 0; g < N_GROUPS; g++)); do
    pid="${{GROUP_PID[g]:-}}"
    if [[ -z "$pid" ]]; then continue; fi
    if kill -0 "$pid" 2>/dev/null; then running=1; continue; fi
    rc=0
    wait "$pid" || rc=$?
    GROUP_PID[g]=
    GROUP_RC[g]=$rc
    if (( rc != 0 && !STOPPING && GROUP_RUNS[g] <= {restarts} )); then
      echo "job $SLURM_JOB_ID: replica group $g exited $rc; starting it again (run $(( GROUP_RUNS[g] + 1 ))); it rejoins from a live peer"
      start_group "$g"
      running=1
    else
      echo "job $SLURM_JOB_ID: replica group $g exited $rc"
    fi
  done
  if (( !running )); then break; fi
  if [[ -n "$LIGHTHOUSE_PID" ]] && ! kill -0 "$LIGHTHOUSE_PID" 2>/dev/null && (( !STOPPING )); then
    wait "$LIGHTHOUSE_PID" || true
    echo "job $SLURM_JOB_ID: the torchft lighthouse exited; starting it again on $LIGHTHOUSE_HOST"
    start_lighthouse
  fi
  sleep 1 &
  wait $! || true
done
if [[ -n "$LIGHTHOUSE_PID" ]]; then
  kill -TERM "$LIGHTHOUSE_PID" 2>/dev/null || true
  wait "$LIGHTHOUSE_PID" || true
fi
if (( REQUEUE )); then
  echo "job $SLURM_JOB_ID: requeued; it resumes from the newest checkpoint in the run directory"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
# Done when a group finished training (the others may have run out of restarts); failed otherwise.
rc="${{GROUP_RC[0]}}"
for ((g = 0; g < N_GROUPS; g++)); do
  if [[ "${{GROUP_RC[g]}}" == 0 ]]; then rc=0; fi
done
exit "$rc"
"""


def render_sbatch_ft(spec: LaunchSpec, script_name: str = "job.sbatch") -> str:
    ft = spec.cfg.fault_tolerance
    fields = head_fields(spec, script_name, extra_sbatch=("#SBATCH --no-kill",))
    own = not ft.lighthouse
    fields["ft_line"] = (f"# Fault tolerance (torchft): {spec.groups} replica groups of {spec.nodes_per_group} node(s) "
                         f"(the layout is per group), lighthouse {'on the first node, port ' + str(spec.lighthouse_port) if own else ft.lighthouse}.\n")
    if own:
        address = f'LIGHTHOUSE="http://$LIGHTHOUSE_HOST:{spec.lighthouse_port}"'
        wait = ("  local i\n"
                "  for ((i = 0; i < 600; i++)); do\n"
                f'    if (exec 3<>"/dev/tcp/$LIGHTHOUSE_HOST/{spec.lighthouse_port}") 2>/dev/null; then return 0; fi\n'
                '    if ! kill -0 "$LIGHTHOUSE_PID" 2>/dev/null; then return 1; fi\n'
                "    sleep 0.1\n"
                "  done\n"
                "  return 1")
        command = " ".join(shlex.quote(a) for a in lighthouse_command(ft, spec.lighthouse_port)[1:])
        container = fields["container"].replace("\n  ", "\n    ")
        start = (f'  srun --job-name=lighthouse --nodes=1 --ntasks=1 --nodelist="$LIGHTHOUSE_HOST" --overlap --cpu-bind=none{container} \\\n'
                 f'    "$TORCHFT_LIGHTHOUSE" {command} &\n'
                 '  LIGHTHOUSE_PID=$!')
    else:  # the site's own lighthouse
        address = f"LIGHTHOUSE={shlex.quote(ft.lighthouse)}"
        start = "  :  # fault_tolerance.lighthouse names a lighthouse run elsewhere"
        wait = "  :  # its availability is the site's"
    flags = " ".join(group_flags('"$g"', '"$LIGHTHOUSE"'))  # expanded by the shell, per group
    body = _BODY.format(
        lead=spec.stop_lead_s, grace=spec.grace_s, groups=spec.groups, npg=spec.nodes_per_group,
        nodes=spec.nodes, lighthouse_bin=lighthouse_command(ft, spec.lighthouse_port)[0], lighthouse_address=address,
        start_lighthouse=start, wait_lighthouse=wait, gpus=spec.gpus_per_node, port=spec.port, restarts=spec.max_restarts,
        container=fields["container"].replace("\n  ", "\n      "), train=fields["train"], group_flags=flags,
    )
    return HEAD.format(**fields) + body
