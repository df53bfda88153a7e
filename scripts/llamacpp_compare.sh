#!/usr/bin/env bash
# lopper vs llama.cpp on GGUF files written by lopper's GGUF writer.
#
#   scripts/llamacpp_compare.sh LLAMA_BIN_DIR [WORK_DIR]
#
# LLAMA_BIN_DIR: a llama.cpp build's bin/ with llama-simple, llama-perplexity and llama-bench
# (any CPU build, e.g. `cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2
# --target llama-simple llama-perplexity llama-bench`). Nothing of llama.cpp is vendored here.
# WORK_DIR (default $TMPDIR/lopper-llamacpp) receives the GGUFs (~1.5 GB) and the logs.
#
# What it does (default model, SmolLM2-135M-Instruct, fetched by lopper):
#  1. writes GGUFs with `lopper convert`: f32, bf16, q8_0; and a per-layer ("deci") model with
#     fixed head/FFN cuts in 4 layers (`cargo run --example llamacpp_check -- cut`);
#  2. greedy: `lopper run --temperature 0` vs `llama-simple` (greedy) on a few prompts, NPRED
#     new tokens, prints MATCH / DIFF per model and prompt;
#  3. perplexity: `llama-perplexity -c CTX --chunks CHUNKS` vs lopper by the same protocol
#     (second half of each chunk scored; `llamacpp_check ppl`) on lopper's eval text;
#  4. speed: `llama-bench -p 32 -n 128 -t 1,2 -r REPS` on the f32 and bf16 files, and lopper's
#     own decode rate (`lopper run --max-new 128 --ignore-eos --no-head-screen`: every logit
#     computed, as llama.cpp does) for reference.
# Environment: NPRED (32), CTX (2048), CHUNKS (16), REPS (3); SKIP_WRITE=1 (reuse the GGUFs in
# WORK_DIR), SKIP_GREEDY=1, SKIP_PPL=1, SKIP_BENCH=1.
set -euo pipefail

BIN=${1:?usage: $0 LLAMA_BIN_DIR [WORK_DIR]}
WORK=${2:-${TMPDIR:-/tmp}/lopper-llamacpp}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NPRED=${NPRED:-32}
CTX=${CTX:-2048}
CHUNKS=${CHUNKS:-16}
REPS=${REPS:-3}
PROMPTS=(
  "The capital of France is"
  "def fibonacci(n):"
  "Once upon a time, in a small village, there"
  "<|im_start|>user
What is 12 + 30?<|im_end|>
<|im_start|>assistant
"
)

for t in llama-simple llama-perplexity llama-bench; do
  [ -x "$BIN/$t" ] || { echo "missing $BIN/$t" >&2; exit 2; }
done
mkdir -p "$WORK"
echo "== llama.cpp: $("$BIN/llama-bench" --version 2>&1 | tr '\n' ' ')"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg)"

(cd "$ROOT" && cargo build --release --bin lopper --example llamacpp_check)
L=$ROOT/target/release/lopper
X=$ROOT/target/release/examples/llamacpp_check

if [ "${SKIP_WRITE:-0}" != 1 ]; then
  echo "== writing GGUFs into $WORK"
  for d in f32 bf16 q8_0; do
    "$L" convert --out "$WORK/smol-$d.gguf" --dtype "$d" --force
  done
  "$X" cut "$WORK/cut-f32.gguf" f32
fi

matches=0 total=0
models=(smol-f32 cut-f32 smol-bf16)
[ "${SKIP_GREEDY:-0}" = 1 ] && models=()
[ ${#models[@]} -gt 0 ] && echo "== greedy: lopper run vs llama-simple ($NPRED new tokens)"
for m in "${models[@]}"; do
  for p in "${PROMPTS[@]}"; do
    lo=$("$L" run --model "$WORK/$m.gguf" --prompt "$p" --max-new "$NPRED" --temperature 0 2>/dev/null)
    ll=$("$BIN/llama-simple" -m "$WORK/$m.gguf" -n "$NPRED" "$p" 2>"$WORK/llama-simple.log") || {
      echo "llama-simple failed on $m:"; tail -5 "$WORK/llama-simple.log"; exit 1; }
    ll=${ll#"$p"}
    total=$((total + 1))
    # Both sides: trailing whitespace is not compared (each prints its own final newline).
    if [ "$(printf '%s' "$lo" | sed -e 's/[[:space:]]*$//')" = "$(printf '%s' "$ll" | sed -e 's/[[:space:]]*$//')" ]; then
      matches=$((matches + 1))
      printf 'MATCH %-10s %q -> %q\n' "$m" "$p" "$lo"
    else
      printf 'DIFF  %-10s %q\n  lopper:    %q\n  llama.cpp: %q\n' "$m" "$p" "$lo" "$ll"
    fi
  done
done
[ "$total" -gt 0 ] && echo "greedy: $matches/$total identical"

if [ "${SKIP_PPL:-0}" != 1 ]; then
  echo "== perplexity (llama-perplexity protocol: $CHUNKS chunks x $CTX, second half scored, no BOS)"
  for m in smol-f32 cut-f32; do
    "$X" ppl "$WORK/$m.gguf" "$WORK/wiki.txt" "$CTX" "$CHUNKS" | sed "s/^/$m  /"
    "$BIN/llama-perplexity" -m "$WORK/$m.gguf" -f "$WORK/wiki.txt" -c "$CTX" --chunks "$CHUNKS" \
      -t "$(nproc)" >"$WORK/ppl-$m.log" 2>&1
    echo "$m  llama.cpp: $(grep -E 'Final estimate' "$WORK/ppl-$m.log")"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== llama-bench (pp32 = prefill of 32 tokens, tg128 = decode of 128 tokens; t/s, mean ± sd of $REPS)"
  echo "\$ llama-bench -m smol-f32.gguf,smol-bf16.gguf -p 32 -n 128 -t 1,2 -r $REPS -o md"
  "$BIN/llama-bench" -m "$WORK/smol-f32.gguf,$WORK/smol-bf16.gguf" -p 32 -n 128 -t 1,2 -r "$REPS" -o md
  echo "== lopper decode for reference (run, 128 new tokens, eos ignored)"
  for m in smol-f32 smol-bf16; do
    for t in 1 2; do
      for r in $(seq "$REPS"); do
        s=$("$L" --threads "$t" run --model "$WORK/$m.gguf" --prompt "${PROMPTS[0]}" --max-new 128 \
          --temperature 0 --ignore-eos --no-head-screen 2>&1 >/dev/null | grep -o 'prefill.*')
        echo "$m threads=$t rep=$r: $s"
      done
    done
  done
fi
