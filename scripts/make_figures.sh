#!/usr/bin/env bash
# Regenerates every figure that README.md and docs/ show, from the examples, into
# docs/_static/figures/ (and examples/tiny_gpt_text.png, which the README names):
#
#   digits_monitor          -> digits_monitor_curves.png, digits_monitor_density.png
#                              (examples/digits_monitor.py, then `python -m lightning_hessian plot`)
#   sharp_drop_digits       -> sharp_drop_digits.png
#   density_init_vs_trained -> density_init_vs_trained.png, density_init_vs_trained_zoom.png
#   local_volume_poison     -> local_volume_poison.png
#   conjecture1_lr_batch    -> conjecture1_lr_batch.png                       (4-10 min)
#   tiny_gpt_text           -> tiny_gpt_text.png, examples/tiny_gpt_text.png  (~40 min)
#
# Usage: bash scripts/make_figures.sh [NAME ...]   (default: all of them, in this order)
#
# Each example runs with the arguments of its README/docs description, its logs in a fresh
# temporary folder (so a re-run never picks up an older TensorBoard version), its printed output
# in examples/outputs/figures/NAME.log, and the PNG written over the committed one: re-running
# is idempotent. The examples seed everything and run on the CPU with a fixed thread count
# (below), so a re-run on the same machine and software gives the same numbers; the script
# prints each example's wall time and the machine, the figures quoted in README.md.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
export PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=0 MPLBACKEND=Agg

ALL=(digits_monitor sharp_drop_digits density_init_vs_trained local_volume_poison conjecture1_lr_batch tiny_gpt_text)
FIG="$ROOT/docs/_static/figures"
LOGS="$ROOT/examples/outputs/figures"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$FIG" "$LOGS"

run() {  # run NAME COMMAND...: the command's output to LOGS/NAME.log (and its tail), its wall time
    local name="$1" start end
    shift
    echo "== $name: $*"
    start=$(date +%s)
    if ! "$@" >"$LOGS/$name.log" 2>&1; then
        tail -n 30 "$LOGS/$name.log"
        echo "make_figures.sh: $name failed (full output: $LOGS/$name.log)" >&2
        exit 1
    fi
    end=$(date +%s)
    tail -n 4 "$LOGS/$name.log"
    echo "   $name: $((end - start)) s wall time"
}

figure() {
    case "$1" in
    digits_monitor)
        run digits_monitor python examples/digits_monitor.py --logdir "$TMP/digits"
        run digits_monitor_plot python -m lightning_hessian plot "$TMP/digits/digits_monitor/version_0" \
            --out "$TMP/digits/plots"
        cp "$TMP/digits/plots/curves.png" "$FIG/digits_monitor_curves.png"
        cp "$TMP/digits/plots/density.png" "$FIG/digits_monitor_density.png"
        ;;
    sharp_drop_digits) run sharp_drop_digits python examples/sharp_drop_digits.py --out "$FIG/sharp_drop_digits.png" ;;
    density_init_vs_trained)
        run density_init_vs_trained python examples/density_init_vs_trained.py --out "$FIG/density_init_vs_trained.png"
        ;;
    local_volume_poison)
        run local_volume_poison python examples/local_volume_poison.py --out "$FIG/local_volume_poison.png"
        ;;
    conjecture1_lr_batch)
        run conjecture1_lr_batch python examples/conjecture1_lr_batch.py --out "$FIG/conjecture1_lr_batch.png"
        ;;
    tiny_gpt_text)
        run tiny_gpt_text python examples/tiny_gpt_text.py --evaluations 4 --steps-per-eval 30 --num-steps 12 \
            --num-directions 8 --plot "$FIG/tiny_gpt_text.png"
        cp "$FIG/tiny_gpt_text.png" "$ROOT/examples/tiny_gpt_text.png"
        ;;
    *)
        echo "make_figures.sh: unknown figure '$1' (known: ${ALL[*]})" >&2
        exit 2
        ;;
    esac
}

echo "machine: $(nproc) CPU core(s), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs)," \
    "torch $(python -c 'import torch; print(torch.__version__)'), OMP_NUM_THREADS=$OMP_NUM_THREADS"
for name in "${@:-${ALL[@]}}"; do
    figure "$name"
done
echo "make_figures.sh: figures written to ${FIG#"$ROOT"/} (logs: ${LOGS#"$ROOT"/})"
