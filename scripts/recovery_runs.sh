#!/usr/bin/env bash
# Issue 22 measurements: pruning with and without recovery on the default model, golden
# calibration ids, wiki-16x2048. Appends one JSON line per run to results/recovery.jsonl.
# Usage: scripts/recovery_runs.sh [NAME ...] (default: all runs below).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/lopper
CALIB=${LOPPER_GOLDEN:-../shared/golden}/calib_c4_128x512.safetensors
OUT=${OUT:-/tmp/lopper-recovery}
mkdir -p "$OUT" results
declare -A RUNS=(
  [wanda50]="--method wanda --sparsity 0.5"
  [wanda50_recon]="--method wanda --sparsity 0.5 --reconstruct"
  [wanda24_recon_swaps]="--method wanda --pattern 2:4 --reconstruct --refine swaps"
  [sparsegpt24_swaps]="--method sparsegpt --pattern 2:4 --refine swaps"
  [ria50]="--method ria --sparsity 0.5"
  [ria24_permute]="--method ria --pattern 2:4 --permute"
)
ORDER=(wanda50_recon wanda24_recon_swaps sparsegpt24_swaps ria50 ria24_permute wanda50)
NAMES=("${@:-${ORDER[@]}}")
for name in "${NAMES[@]}"; do
  args=${RUNS[$name]}
  echo "== $name: $args" >&2
  # shellcheck disable=SC2086
  $BIN prune $args --calib-ids "$CALIB" --eval --out "$OUT/$name" --force --json > "$OUT/$name.json"
  python3 - "$name" "$OUT/$name.json" "$args" >> results/recovery.jsonl <<'PY'
import json, sys, subprocess
name, path, args = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.load(open(path))
rec = r.get("recovery") or {}
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
print(json.dumps({
    "run": name, "args": args,
    "perplexity_dense": r["perplexity_before"], "perplexity_pruned": r["perplexity_after"],
    "sparsity_measured": r["sparsity_measured"],
    "prune_seconds": r["prune_seconds"],
    "recovery_steps": rec.get("steps", []),
    "seconds_permute": rec.get("seconds_permute"), "seconds_swaps": rec.get("seconds_swaps"),
    "seconds_reconstruct": rec.get("seconds_reconstruct"),
    "recon_rel_error_before": rec.get("mean_rel_error_before"),
    "recon_rel_error_after": rec.get("mean_rel_error_after"),
    "cpu": model, "threads": 2,
}))
PY
  tail -1 results/recovery.jsonl >&2
done
