#!/usr/bin/env bash
# Times the official Wanda / SparseGPT code (scripts/official_prune.py) and `lopper prune` on the
# same machine, one run after the other, alternating which goes first each round, on the golden
# calibration ids; appends one JSON line per (round, method) to OUT. Not part of lopper or its
# tests; it is how results/official_side_by_side*.jsonl were made.
#
#   scripts/official_side_by_side.sh PYTHON WANDA_DIR ROUNDS OUT.jsonl [FIRST_ROUND]
#
# Odd rounds run the official code first, even rounds lopper first; FIRST_ROUND (default 1)
# continues an earlier series.
#
# PYTHON: an interpreter with the packages named in scripts/official_prune.py. Needs a release
# build (target/release/lopper), the cached default model (~/.cache/lopper) and ../shared/golden.
set -euo pipefail
py=$1 wanda=$2 rounds=$3 out=$4 first=${5:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${LOPPER_CACHE:-$HOME/.cache/lopper}
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
ids=$here/../shared/golden/calib_c4_128x512.safetensors
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

official() { # method → "seconds peak_rss_gb"
    /usr/bin/time -f 'RSS %M' "$py" "$here/scripts/official_prune.py" "$wanda" "$1" "$cache" "$gguf" \
        "$tmp/off.safetensors" >"$tmp/off.log" 2>&1
    local s r
    s=$(sed -n 's/^OFFICIAL .* prune seconds \([0-9.]*\);.*/\1/p' "$tmp/off.log")
    r=$(sed -n 's/^RSS \([0-9]*\)$/\1/p' "$tmp/off.log")
    echo "$s $(awk -v k="$r" 'BEGIN{printf "%.2f", k/1048576}')"
}
lopper() { # method → "seconds peak_rss_gb"
    rm -rf "$tmp/lp"
    "$here/target/release/lopper" prune --method "$1" --sparsity 0.5 --calib-ids "$ids" \
        --out "$tmp/lp" >"$tmp/lp.log" 2>&1
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.1f %.2f" % (r["prune_seconds"], r["peak_rss_bytes"]/2**30))' "$tmp/lp/report.json"
}
for round in $(seq "$first" $((first + rounds - 1))); do
    for method in wanda sparsegpt; do
        if [ $((round % 2)) -eq 1 ]; then
            o=$(official $method); l=$(lopper $method); order="official, then lopper"
        else
            l=$(lopper $method); o=$(official $method); order="lopper, then official"
        fi
        set -- $o $l
        echo "{\"date\": \"$(date +%F)\", \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\", \"round\": $round, \"method\": \"$method\", \"sparsity\": 0.5, \"calibration\": \"golden 128x512 ids\", \"official_seconds\": $1, \"official_peak_rss_gb\": $2, \"lopper_seconds\": $3, \"lopper_peak_rss_gb\": $4, \"order\": \"$order\"}" | tee -a "$out"
    done
done
