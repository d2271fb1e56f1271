"""`gigafactory launch --exclude FILE`: the nodes a job must not be placed on (issue 14).

Why a file: the list comes from a pre-flight health check, written as JSON, either a plain list of hostnames or an
object whose "bad_nodes" key holds that list (what a health report writes, next to its per-node verdicts). Slurm
gets `#SBATCH --exclude=h1,h2`, Kubernetes a required node anti-affinity on `kubernetes.io/hostname`.

Every name is checked before it is written: a control character is refused as for every other launcher input (it
would add its own #SBATCH or YAML line), and the rest must be a hostname that is also a Kubernetes label value
(letters, digits, '-', '_', '.', at most 63 characters), so a ',' cannot add a node to Slurm's list and nothing
reaches a shell or YAML unescaped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gigafactory.errors import UserError

HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


def read_exclude(path: str, refuse_control_characters) -> list[str]:
    """The hostnames listed in `path`, in order, without repeats; one-line UserError for anything else."""
    where = f"--exclude {path!r}"
    try:
        text = Path(path).expanduser().read_text()
    except FileNotFoundError:
        raise UserError(f"{where}: file not found; pass a JSON list of hostnames or a health report with \"bad_nodes\"") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if isinstance(data, dict):
        if "bad_nodes" not in data:
            raise UserError(f"{where}: a JSON object needs a \"bad_nodes\" list (keys found: {', '.join(sorted(map(str, data))) or 'none'})")
        data = data["bad_nodes"]
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise UserError(f"{where}: expected a JSON list of hostname strings (or {{\"bad_nodes\": [...]}})")
    refuse_control_characters(exclude=data)
    for host in data:
        if not HOSTNAME_RE.fullmatch(host):
            raise UserError(f"{where}: {host!r} is not a hostname (letters, digits, '-', '_' and '.', at most 63 characters)")
    return list(dict.fromkeys(data))
