#!/usr/bin/env bash
# A seed study: a preset's sweep(s) (conf/experiment/NAME.yaml), then `prefopt report` with the study's grouping, its
# baseline (paired by seed) and, for lpo_control, the fit against r2. Prints the study's wall time.
#   bash scripts/study.sh NAME [extra hydra overrides]
#   PUBLISH_DIR=docs/NAME bash scripts/study.sh NAME     (also copies the report files there, as docs/ holds them)
# NAME              jobs  what                                                                docs
# gate_vs_field     48    8 losses x 2 regimes x 3 seeds, 30 steps                             docs/gate_vs_field.md
# lpo_control       18    lpo: r2 in 0.05..0.8 x 3 seeds, plus gamma=0 at r2=0.2               docs/lpo_control.md
# horizon            9    dpo, gate_dpo_q10, lpo x 3 seeds, 120 steps                          docs/horizon.md
# gate_complements  60    {ipo, cal_dpo, sft_extend then dpo} x gate {none, seq, q10} x       docs/gate_complements.md
#                         {near, onpolicy} x 3 seeds (sft_extend: 6 saved runs, then 18 dpo runs from them)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bash scripts/study.sh NAME [hydra overrides]; NAME: gate_vs_field, lpo_control, horizon, gate_complements}
shift
PREFOPT=(${PREFOPT:-.venv/bin/prefopt})  # a command, e.g. "python -m prefopt.cli"
STUDY_DIR=${SWEEP_DIR:-multirun/$NAME/$(date +%Y%m%d_%H%M%S)}
case "$NAME" in
  gate_vs_field) REPORT=(--group-by loss,dataset.arith.rejected_style --baseline loss=dpo) ;;
  lpo_control) REPORT=(--group-by loss.r2,loss.gamma --baseline loss.gamma=10 --fit loss.r2) ;;
  horizon) REPORT=(--group-by loss --baseline loss=dpo) ;;
  gate_complements) REPORT=(--group-by loss,loss.gate.kind,dataset.arith.rejected_style,model --baseline loss.gate.kind=none) ;;
  *) echo "unknown study $NAME: use gate_vs_field, lpo_control, horizon or gate_complements" >&2; exit 2 ;;
esac
started=$(date +%s)
echo "study $NAME: $STUDY_DIR (started $(date -u +%H:%M:%S) UTC)"
failed=0
train() { "${PREFOPT[@]}" train -m +experiment="$NAME" "$@" || failed=1; }
case "$NAME" in
  lpo_control)  # two sweeps in one folder: the r2 grid, then the gamma=0 arm
    train hydra.sweep.dir="$STUDY_DIR/r2" "$@"
    train loss.r2=0.2 loss.gamma=0 hydra.sweep.dir="$STUDY_DIR/gamma0" "$@" ;;
  gate_complements)  # the ipo and cal_dpo arms, then extended SFT and dpo (gated or not) from its weights
    train hydra.sweep.dir="$STUDY_DIR/ipo_cal_dpo" "$@"
    train loss=sft_extend loss.gate.kind=none trainer.save_final=true hydra.sweep.dir="$STUDY_DIR/sft_extend" \
      'hydra.sweep.subdir=${dataset.arith.rejected_style}_seed${trainer.seed}' "$@"
    # the same override string for every job (the report groups by it); each resolves to its own regime and seed's
    # final checkpoint (step 30: the preset's trainer.max_steps, which both stages run)
    sft_runs="$(realpath "$STUDY_DIR")/sft_extend"
    train loss=dpo loss.gate.kind=none,seq,q10 model=hf hydra.sweep.dir="$STUDY_DIR/after_sft_extend" \
      "model.path=$sft_runs/\${dataset.arith.rejected_style}_seed\${trainer.seed}/checkpoints/step-000030/policy" "$@" ;;
  *) train hydra.sweep.dir="$STUDY_DIR" "$@" ;;
esac
[[ $failed == 0 ]] || echo "some jobs failed: the report marks them"
"${PREFOPT[@]}" report "$STUDY_DIR" "${REPORT[@]}"
echo "study $NAME: $STUDY_DIR/report_groups.md  bands: $STUDY_DIR/report_bands.png"
echo "wall time: $(( ($(date +%s) - started) / 60 )) min (from $(date -u -d @"$started" +%H:%M:%S) to $(date -u +%H:%M:%S) UTC)"
if [[ -n "${PUBLISH_DIR:-}" ]]; then
  mkdir -p "$PUBLISH_DIR"
  for file in report_groups.md report_groups.csv report_bands.png report.md report_fit.csv report_fit.png; do
    [[ -f "$STUDY_DIR/$file" ]] && cp "$STUDY_DIR/$file" "$PUBLISH_DIR"/
  done
  echo "copied the report into $PUBLISH_DIR"
fi
