#!/usr/bin/env bash
# The main job: set up, train grok-tiny on the shipped corpus (~5 minutes on 2 CPU cores), then generate text.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/gigafactory train --logging.run_dir runs/grok-tiny "$@"
echo
.venv/bin/gigafactory generate --checkpoint runs/grok-tiny --prompt "And God said" --max-tokens 80 --temperature 0.7
