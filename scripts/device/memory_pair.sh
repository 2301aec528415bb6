#!/usr/bin/env bash
# The memory comparison of issue 13 in one call on the lent machine (docs/gpu.md): the LSSVWM and
# its sliding-window baseline trained from scratch side by side on one GPU, two processes of the
# GPU job with the same pack, steps, batch, window and seed. A lease is one call of ~9 minutes, so
# the two share it instead of taking one call each; --max-steps makes the budget equal (the
# learning-rate schedule runs over the steps, not the clock) and the summary says if a run fell
# short of it. Arguments go to both jobs; VARIANTS picks the models, PACK the pack. CONTINUE names
# a folder with one checkpoint or bundle per variant in <variant>/ (the shipped pair,
# worldsim/assets/memory-pair-9x9, or a folder an earlier pair came back in): each model then
# warm-starts from its own one there instead of from scratch, so a pair's budget can span leases
# and stay equal (carry that folder if it is not in the repository, and lower --lr /
# --warmup-steps for the restart).
#
#   run(command="bash scripts/device/memory_pair.sh --window 64 --batch-size 128 --max-steps 1200 --minutes 8.6",
#       carry=["runs/pack-revisit"], timeout_s=560)
#
# What comes back (the lent machine returns 8 files, two folders down): $OUT/<variant>/ with
# checkpoint.json and ema.safetensors (a checkpoint `worldsim eval memory --checkpoint` loads),
# plus results.json and job.log when two variants run; with up to four
# (VARIANTS="lssvwm causal_window mamba_only no_blockwise"), the checkpoints alone.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for the results}"
export PACK="${PACK:-runs/pack-revisit}"
read -r -a variants <<< "${VARIANTS:-lssvwm causal_window}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pids=()
for v in "${variants[@]}"; do
    mkdir -p "$work/$v"
    if [ -n "${CONTINUE:-}" ]; then
        [ -f "$CONTINUE/$v/checkpoint.json" ] || [ -f "$CONTINUE/$v/model.json" ] ||
            { echo "CONTINUE=$CONTINUE has no $v/checkpoint.json nor $v/model.json (a bundle)"; exit 2; }
        start=(--init-from "$CONTINUE/$v")  # a warm start keeps its model's size
    else
        start=(--init-from none --equal-parameters)
    fi
    OUT="$work/$v" bash scripts/device/train_gpu.sh "${start[@]}" --variant "$v" \
        --codec worldsim/assets/dream-memory-maze-9x9 "$@" > "$work/$v.out" 2>&1 &
    pids+=("$!")
    echo "started $v (pid $!)"
done
rc=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { code=$?; echo "${variants[$i]}: job exited with $code"; rc=$code; }
done

# Keep what comes back within the machine's limits (8 files): each variant's last checkpoint folder,
# flattened, beside its results and log while they fit (two variants); with more, the checkpoints
# alone, and the summary below stands in for the results.
for v in "${variants[@]}"; do
    mkdir -p "$OUT/$v"
    tail -n 5 "$work/$v.out" | sed "s/^/[$v] /"
    if [ "${#variants[@]}" -le 2 ]; then
        cp -f "$work/$v/results.json" "$work/$v/job.log" "$OUT/$v/" 2>/dev/null
    fi
    if [ -f "$work/$v/latest.json" ]; then
        ckpt="$work/$v/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$work/$v/latest.json")"
        cp -f "$ckpt"/checkpoint.json "$ckpt"/ema.safetensors "$OUT/$v/"
    else
        echo "$v: no checkpoint was exported"
        [ "$rc" = 0 ] && rc=1
    fi
done
python3 - "$work" "${variants[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, variants = Path(sys.argv[1]), sys.argv[2:]
steps = {}
for v in variants:
    try:
        train = json.loads((work / v / "results.json").read_text()).get("train", {})
    except (OSError, ValueError):
        print(f"{v}: no results"); continue
    steps[v] = train.get("steps")
    val = [row[2] for row in train.get("val_curve", []) if row[2] is not None]
    print(f"{v}: {train.get('steps')} steps, {train.get('parameters')} parameters, "
          f"held-out loss {val[0] if val else None} -> {val[-1] if val else None}, "
          f"{train.get('steady_tokens_per_s') or 0:.3g} tokens/s")
if len(set(steps.values())) > 1:
    print(f"UNEQUAL BUDGETS: {steps} (a run was stopped by the clock before --max-steps)")
EOF
exit "$rc"
