#!/usr/bin/env bash
# A rank killed under `torchrun --max-restarts 1`: torchrun restarts the workers, and paci resumes
# --out from its newest checkpoint. Prints the step it resumed after and checks that the final
# weights equal those of a run that was never killed. About a minute on 2 cores.
#
#     bash scripts/torchrun_restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1
ARGS=(-m paci train --preset tiny --steps 600 --microbatches 4 --batch-size 2 --seq-len 16 --eval-every 200
      --split uniform --checkpoint-every 10)

"$TORCHRUN" --standalone --nproc-per-node 2 --max-restarts 1 "${ARGS[@]}" --out "$WORK/killed" \
    > "$WORK/killed.log" 2>&1 &
AGENT=$!
until [ -e "$WORK/killed/checkpoints/step-000020/manifest.json" ]; do sleep 0.1; done
VICTIM=$(pgrep -f -- "--out $WORK/killed" | sort -n | tail -1)
echo "killing rank process $VICTIM"
kill -9 "$VICTIM"
wait "$AGENT"
grep -E "restarted by torchrun|resuming after step|^done" "$WORK/killed.log"

"$TORCHRUN" --standalone --nproc-per-node 2 "${ARGS[@]}" --out "$WORK/whole" > "$WORK/whole.log" 2>&1
"$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path

import torch

from paci.checkpoint import latest, load_stage

work = Path(sys.argv[1])
a, b = latest(work / "killed"), latest(work / "whole")
same = all(torch.equal(x, y) for s in range(2)
           for x, y in zip(load_stage(a, s, torch.device("cpu"))["module"].values(),
                           load_stage(b, s, torch.device("cpu"))["module"].values()))
print("final weights equal the uninterrupted run's:", same)
sys.exit(0 if same else 1)
PYEOF
