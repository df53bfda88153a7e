#!/usr/bin/env bash
# Issue 22 measurements: pruning with recovery on the default model, golden calibration ids,
# then `lopper eval` (wiki-16x2048) on the output (the dense perplexity, 19.398, is not
# re-measured per run). Appends one JSON line per run to results/recovery.jsonl.
# Usage: scripts/recovery_runs.sh NAME [NAME ...]   (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/lopper}
CALIB=${LOPPER_GOLDEN:-../shared/golden}/calib_c4_128x512.safetensors
OUT=${OUT:-/tmp/lopper-recovery}
mkdir -p "$OUT" results
declare -A RUNS=(
  [wanda50]="--method wanda --sparsity 0.5"
  [wanda50_recon]="--method wanda --sparsity 0.5 --reconstruct"
  [wanda24]="--method wanda --pattern 2:4"
  [wanda24_recon]="--method wanda --pattern 2:4 --reconstruct"
  [wanda24_recon_swaps]="--method wanda --pattern 2:4 --reconstruct --refine swaps"
  [sparsegpt24_swaps]="--method sparsegpt --pattern 2:4 --refine swaps"
  [ria50]="--method ria --sparsity 0.5"
  [ria24_permute]="--method ria --pattern 2:4 --permute"
  [plan_l2_n25_recon]="--remove-layers 2 --neurons 0.25 --neuron-metric fluctuation --reconstruct"
  [heads23_recon]="--heads 0.67 --head-metric fluctuation --reconstruct"
  [lowrank25_recon]="--low-rank 0.25 --whiten --reconstruct"
  [lowrank25]="--low-rank 0.25 --whiten"
)
for name in "$@"; do
  args=${RUNS[$name]}
  echo "== $name: $args" >&2
  # shellcheck disable=SC2086
  /usr/bin/time -v $BIN prune $args --calib-ids "$CALIB" --out "$OUT/$name" --force --json \
    > "$OUT/$name.json" 2> "$OUT/$name.time"
  $BIN eval --model "$OUT/$name" --json > "$OUT/$name.eval.json"
  python3 - "$name" "$OUT/$name" "$args" >> results/recovery.jsonl <<'PY'
import json, sys, subprocess, re
name, base, args = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.load(open(base + ".json"))
ev = json.load(open(base + ".eval.json"))
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(base + ".time").read())
rec = r.get("recovery") or {}
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
steps = r.get("steps") or []
recon = [s.get("details", {}).get("reconstruction") for s in steps if isinstance(s, dict)]
print(json.dumps({
    "run": name, "args": args,
    "perplexity_pruned": ev.get("perplexity"),
    "sparsity_measured": r.get("sparsity_measured"),
    "prune_seconds": r.get("prune_seconds", r.get("total_seconds")),
    "step_seconds": [s.get("seconds") for s in steps if isinstance(s, dict)],
    "recovery_steps": rec.get("steps", []),
    "recon_samples": rec.get("recon_samples"),
    "seconds_permute": rec.get("seconds_permute"), "seconds_swaps": rec.get("seconds_swaps"),
    "seconds_reconstruct": rec.get("seconds_reconstruct"),
    "seconds_recon_collect": rec.get("seconds_recon_collect"),
    "seconds_recon_solve": rec.get("seconds_recon_solve"),
    "recon_rel_error_before": rec.get("mean_rel_error_before"),
    "recon_rel_error_after": rec.get("mean_rel_error_after"),
    "structured_reconstruction": [
        {k: v for k, v in (x or {}).items() if k != "layers"} for x in recon if x],
    "peak_rss_kb": int(rss.group(1)) if rss else None,
    "cpu": model + " (2 cores, shared with other jobs)", "threads": 2,
    "date": subprocess.run(["date", "-u", "+%F"], capture_output=True, text=True).stdout.strip(),
}))
PY
  tail -1 results/recovery.jsonl >&2
done
