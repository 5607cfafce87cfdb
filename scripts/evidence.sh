#!/usr/bin/env bash
# Re-run the studies behind docs/evidence.md (resumable: rerun the same line to continue).
#   scripts/evidence.sh envelope | envelope-mismatch | envelope-ablation | envelope-reports | restore
#   scripts/evidence.sh real-default | real-moderate | real-stress | toy-default | toy-stress | reports | all
# Run directories go to runs/evidence/<study>/ (not committed); `reports` renders each report (md,
# json, png) into docs/evidence/<name>/. Wall times on 2 CPU cores are in docs/evidence.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mhpo=(.venv/bin/mhpo)
# The real-model setting: the smollm2-short-answers preset (its 8 prompts and 12 steps restated: 33 runs in ~55 min).
REAL=(--config smollm2-short-answers --seeds 3 --target 0.9 rollout.prompts_per_step=8 train.steps=12)
# The toy ablations: the ablation and c-sweep presets in one comparison (mhpo = mhpo[c=1.5], run once).
TOY=(--objectives "mhpo,mhpo-lfm-only,mhpo-dhp-only,mhpo-symmetric,mhpo[c=0.5],mhpo[c=1.0],mhpo[c=2.0]" --seeds 3)

# The off-policy envelope (docs/evidence.md leads with it): the real-model setting (12 steps) in float32, the
# behaviour log-probs taken from the float32 sampling pass (as async engines do; equal to the trainer's within
# ~1e-6 here, and it saves a pass), staleness swept. Value-major: staleness 0 finishes first, then 2, 4, 8.
ENVELOPE=(--config smollm2-short-answers --seeds 3 --target 0.9 model.dtype=float32
  rollout.behaviour_logprobs=sampler rollout.log_mismatch=false)
ENVELOPE_OBJECTIVES=mhpo,grpo,cispo,sapo,reinforce
# The values to run: a new checkout (the committed reports, no run directories) runs only what is missing, e.g.
# STALENESS=8 scripts/evidence.sh envelope; envelope-reports then reads the other values from their reports.
STALENESS=${STALENESS:-0,2,4,8}
# The training-inference mismatch: the only change is bf16 sampling (its log-probs are the behaviour policy),
# the update stays float32; the mismatch itself is logged. At staleness 0 (mismatch alone) and 8 (mismatch on
# top of staleness). Objectives cut to MHPO, the clipping baseline and the negative control (no ratio control).
MISMATCH=(rollout.precision=bf16 rollout.log_mismatch=true)
MISMATCH_OBJECTIVES=${MISMATCH_OBJECTIVES:-mhpo,grpo,reinforce}

study() {  # NAME COMPARE-ARGS...: run (or resume) the comparison into runs/evidence/NAME
  local name=$1; shift
  "${mhpo[@]}" compare --output-dir "runs/evidence/$name" "$@"
}

report() {  # NAME TITLE TARGET RUN-DIR...: the committed report in docs/evidence/NAME (md, json, png)
  local name=$1 title=$2 target=$3; shift 3
  rm -rf "docs/evidence/$name"
  "${mhpo[@]}" report "$@" --out "docs/evidence/$name" --target "$target" --title "$title" >/dev/null
  rm "docs/evidence/$name/report.html"  # the PNGs again, base64-inlined
}

envelope_reports() {  # each envelope study's reports (md, json, png) and its finished runs' records (config,
  local name run  # summary, metrics, evals, samples: no checkpoints) into docs/evidence/<study>/; works mid-study.
  # A value whose runs are not under runs/ (a new checkout) keeps its committed report, and the envelope reads it.
  for name in envelope envelope-mismatch envelope-ablation; do
    [ -d "runs/evidence/$name/runs" ] || continue
    "${mhpo[@]}" report "runs/evidence/$name" --sweep rollout.staleness --out "docs/evidence/$name" --target 0.9 \
      >/dev/null
    find "docs/evidence/$name" -name "*.html" -delete  # the PNGs again, base64-inlined
    for run in $(cd "runs/evidence/$name" && find runs -name summary.json -printf '%h\n'); do
      mkdir -p "docs/evidence/$name/$run"
      (cd "runs/evidence/$name/$run" && cp -r config.yaml summary.json metrics.jsonl evals.jsonl samples \
        "$OLDPWD/docs/evidence/$name/$run/")
    done
  done
}

restore() {  # a new checkout: put the committed finished runs back, so that a rerun of a study skips them
  local name
  for name in envelope envelope-mismatch envelope-ablation; do
    [ -d "docs/evidence/$name/runs" ] || continue
    mkdir -p "runs/evidence/$name"
    cp -rn "docs/evidence/$name/runs" "runs/evidence/$name/"
  done
}

reports() {
  local r=runs/evidence t
  report real-default "SmolLM2-135M-Instruct, default setting (lr 1e-5, 2 minibatches)" 0.9 $r/real-default/runs
  report real-moderate "SmolLM2-135M-Instruct, stress A (lr 1e-4, 4 minibatches)" 0.9 $r/real-moderate/runs
  report real-stress "SmolLM2-135M-Instruct, stress B (lr 3e-4, 8 minibatches)" 0.9 $r/real-stress/runs
  for s in default stress; do
    t=$r/toy-$s/runs
    report "ablation-$s" "tiny model, ablation preset, $s setting" 0.5 \
      $t/mhpo $t/mhpo-lfm-only $t/mhpo-dhp-only $t/mhpo-symmetric
    report "c-sweep-$s" "tiny model, c-sweep preset, $s setting (mhpo = mhpo[c=1.5])" 0.5 \
      "$t/mhpo_c=0.5" "$t/mhpo_c=1.0" $t/mhpo "$t/mhpo_c=2.0"
  done
}

case "${1:-all}" in
  real-default)  study real-default "${REAL[@]}" --objectives mhpo,grpo,dapo,sapo ;;
  real-moderate) study real-moderate "${REAL[@]}" --objectives mhpo,grpo,dapo,sapo optim.lr=1e-4 update.num_minibatches=4 ;;
  real-stress)   study real-stress "${REAL[@]}" --objectives mhpo,grpo,dapo optim.lr=3e-4 update.num_minibatches=8 ;;
  toy-default)  study toy-default "${TOY[@]}" ;;
  toy-stress)   study toy-stress --preset stress "${TOY[@]}" ;;
  envelope)          study envelope "${ENVELOPE[@]}" --objectives "$ENVELOPE_OBJECTIVES" --sweep "rollout.staleness=$STALENESS" ;;
  envelope-mismatch) study envelope-mismatch "${ENVELOPE[@]}" --objectives "$MISMATCH_OBJECTIVES" "${MISMATCH[@]}" \
                       --sweep rollout.staleness=0,8 ;;
  envelope-ablation) study envelope-ablation "${ENVELOPE[@]}" --objectives mhpo-lfm-only,mhpo-dhp-only \
                       --sweep rollout.staleness=4 ;;
  envelope-reports)  envelope_reports ;;
  restore)           restore ;;
  reports)      reports ;;
  all) for s in real-moderate real-stress real-default toy-stress toy-default reports; do "$0" "$s"; done ;;
  *)
    echo "unknown study ${1}; valid: envelope envelope-mismatch envelope-ablation envelope-reports real-default" \
      "real-moderate real-stress toy-default toy-stress reports all" >&2
    exit 2
    ;;
esac
