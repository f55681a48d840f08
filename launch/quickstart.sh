#!/usr/bin/env bash
# The whole NotaGen recipe on the embedded default, on a CPU, in minutes:
# music21's Bach chorales -> shards -> a tiny model pre-trained and fine-tuned briefly -> CLaMP-DPO
# iterations with the weight-free symbolic scorer -> sample pieces (ABC, MusicXML, MIDI) -> the
# final model as a PyTorch NotaGen .pth. Every stage is one of the package's entry points; a stage
# whose output exists is skipped, so a second run resumes.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/quickstart.sh [RUN_DIR] [--pieces=N] [--dry-run]

  RUN_DIR       where everything goes (default runs/quickstart)
  --pieces=N    music21 Bach chorales to prepare (default 160; env PIECES)
  --dry-run     print the commands, run nothing
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run="runs/quickstart"
pieces="${PIECES:-160}"
python="${PYTHON:-python}"
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --pieces=*) pieces="${arg#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; usage >&2; exit 2 ;;
    *) run="$arg" ;;
  esac
done

shards="$run/data/shards/notagen_shards/p16_prompt/1.0.0"
prompt=(--period=Baroque "--composer=Bach, Johann Sebastian" --instrumentation=Choral)
start=$SECONDS

# Runs a stage unless its output exists; prints the command either way.
stage() {
  local output="$1"; shift
  if [[ -e "$output" ]]; then
    echo "== done already: $output"
    return
  fi
  echo "== $(quote "$@")"
  if [[ "$dry_run" == 0 ]]; then
    "$@"
  fi
}

stage "$shards" "$python" -m notagen_jax.prepare --input=music21 --match=bach/bwv \
  --limit="$pieces" --output="$run/data"
stage "$run/pretrain/final_params" "$python" -m notagen_jax.train \
  --config=configs/quickstart.py:pretrain --workdir="$run/pretrain" \
  --config.data.shards_dir="$shards"
stage "$run/finetune/final_params" "$python" -m notagen_jax.train \
  --config=configs/quickstart.py:finetune --workdir="$run/finetune" \
  --config.data.shards_dir="$shards" --config.init_checkpoint="$run/pretrain/final_params"
stage "$run/dpo/iteration_2/scores.json" "$python" -m notagen_jax.clamp_dpo \
  --config=configs/clamp_dpo.py:quickstart --workdir="$run/dpo" \
  --config.init_checkpoint="$run/finetune/final_params" \
  --config.ground_truth.prepared_dir="$run/data"
final="$run/dpo/iteration_1/train/final_params"
stage "$run/pieces/pieces.jsonl" "$python" -m notagen_jax.generate --checkpoint="$final" \
  --output="$run/pieces" "${prompt[@]}" --known_prompts="$run/data" --num_pieces=8 --batch=8
stage "$run/notagen_tiny.pth" "$python" -m notagen_jax.port to-torch "$final" "$run/notagen_tiny.pth"

if [[ "$dry_run" == 0 ]]; then
  cat <<DONE

quickstart finished in $((SECONDS - start)) s
  data:            $run/data (report.json, shards)
  models:          $run/pretrain, $run/finetune (TensorBoard: tensorboard --logdir=$run)
  CLaMP-DPO:       $run/dpo/report.html (open it in a browser), $run/dpo/summary.txt
  pieces:          $run/pieces/index.html (scores, audio; *.abc, *.xml, *.mid beside it)
  demo:            python -m notagen_jax.demo --checkpoint=$final --known_prompts=$run/data
  PyTorch NotaGen: $run/notagen_tiny.pth
DONE
  cat "$run/dpo/summary.txt"
fi
