#!/usr/bin/env bash
# Times `lopper prune` of two builds (e.g. an old commit and the current one) on the same machine,
# alternating which goes first each round, and appends one JSON line per run to OUT. Wall time
# alone misleads on a shared machine, so each line also carries the user and system CPU seconds
# of the whole process (`/usr/bin/time`), the 1-minute load average before the run, and the
# prune time split that report.json gives (statistics / pruning / forward). Not part of lopper or
# its tests; it is how results/commit_timing.jsonl was made (issue #27: did the code or the
# machine change?).
#
#   scripts/commit_timing.sh BIN_A LABEL_A BIN_B LABEL_B ROUNDS OUT.jsonl [METHOD] [SAMPLES] [THREADS]
#
# METHOD defaults to wanda, SAMPLES (c4 calibration windows of 512 tokens, seed 0) to 32,
# THREADS to the machine's cores; THREADS_A / THREADS_B (environment) override it for one side,
# e.g. the same binary at 1 and 2 threads for thread scaling. Needs the cached default model and
# texts (~/.cache/lopper).
set -euo pipefail
bin_a=$1 lab_a=$2 bin_b=$3 lab_b=$4 rounds=$5 out=$6
method=${7:-wanda} samples=${8:-32} threads=${9:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)

one() { # BIN LABEL ROUND ORDER THREADS
    local bin=$1 label=$2 round=$3 order=$4 threads=$5 load
    load=$(cut -d' ' -f1 /proc/loadavg)
    rm -rf "$tmp/out"
    /usr/bin/time -f 'TIME %e %U %S %M' -o "$tmp/time" \
        "$bin" --threads "$threads" prune --method "$method" --sparsity 0.5 --samples "$samples" \
        --calib-len 512 --seed 0 --out "$tmp/out" >"$tmp/log" 2>&1 || {
        echo "run of $bin failed:" >&2
        cat "$tmp/log" >&2
        exit 1
    }
    python3 - "$tmp/out/report.json" "$tmp/time" "$label" "$round" "$order" "$load" "$cpu" \
        "$method" "$samples" "$threads" "$bin" <<'EOF' | tee -a "$out"
import json, sys
rep, tim, label, rnd, order, load, cpu, method, samples, threads, binary = sys.argv[1:]
r = json.load(open(rep))
_, wall, user, sys_, rss = open(tim).read().split()[:5]
d = r.get("prune_seconds_detail", {})
print(json.dumps({
    "cpu": cpu, "build": label, "binary": binary, "round": int(rnd), "order": order,
    "method": method, "samples": int(samples), "threads": int(threads),
    "load_before": float(load), "prune_seconds": r["prune_seconds"],
    "statistics_s": d.get("statistics"), "prune_s": d.get("prune"), "forward_s": d.get("forward"),
    "process_wall_s": float(wall), "user_cpu_s": float(user), "sys_cpu_s": float(sys_),
    "peak_rss_gb": int(rss) / 2**20, "gemm_gflops": r.get("gemm_gflops"),
}))
EOF
}

t_a=${THREADS_A:-$threads} t_b=${THREADS_B:-$threads}
for round in $(seq 1 "$rounds"); do
    if [ $((round % 2)) -eq 1 ]; then
        one "$bin_a" "$lab_a" "$round" "A first" "$t_a"; one "$bin_b" "$lab_b" "$round" "A first" "$t_b"
    else
        one "$bin_b" "$lab_b" "$round" "B first" "$t_b"; one "$bin_a" "$lab_a" "$round" "B first" "$t_a"
    fi
done
