#!/usr/bin/env bash
# One machine, one or several trainer processes (JAX on the CPU by default): the multi-process
# mode the tests use. Each process logs to WORKDIR/logs/process_I.log; the script waits for all
# and exits nonzero if any fails.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh --workdir=DIR [options] [-- extra train flags]

Runs N copies of `python -m notagen_jax.MODULE` on this machine, joined by jax.distributed
(process I of N, coordinator localhost:PORT). Every option also reads an environment variable.

  --workdir=DIR          WORKDIR       run directory (required); logs in DIR/logs/process_I.log
  --module=M             MODULE        train (default), clamp_dpo or generate (pieces into
                                       DIR, its flags after --): the same flags each
  --config=FILE[:ARG]    CONFIG        default configs/pretrain.py:small (train),
                                       configs/clamp_dpo.py:quickstart (clamp_dpo)
  --num_processes=N      NUM_PROCESSES default 2 (1: a plain single-process run)
  --port=PORT            PORT          coordinator port (default: a free port)
  --devices_per_process=D DEVICES_PER_PROCESS  simulated CPU devices per process (default 1)
  --platform=P           JAX_PLATFORMS default cpu
  --python=PY            PYTHON        default python
  --dry-run                            print the commands, run nothing
  -h, --help

Anything after `--` (or any --config.x=y) goes to every process, e.g.
  launch/local.sh --workdir=/tmp/run --config=configs/pretrain.py:tiny -- \
      --config.data.shards_dir=runs/music21/shards/notagen_shards/p16_prompt/1.0.0
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

workdir="${WORKDIR:-}"
module="${MODULE:-train}"
config="${CONFIG:-}"
num_processes="${NUM_PROCESSES:-2}"
port="${PORT:-}"
devices_per_process="${DEVICES_PER_PROCESS:-1}"
platform="${JAX_PLATFORMS:-cpu}"
python="${PYTHON:-python}"
dry_run=0
extra=()

while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --platform=*) platform="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    --config.*) extra+=("$1") ;;
    *) echo "local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ -n "$workdir" ]] || { echo "local.sh: --workdir (or WORKDIR) is required" >&2; exit 2; }
case "$module" in
  train) config="${config:-configs/pretrain.py:small}" ;;
  clamp_dpo) config="${config:-configs/clamp_dpo.py:quickstart}" ;;
  generate) ;;
  *) echo "local.sh: --module must be train, clamp_dpo or generate, got $module" >&2; exit 2 ;;
esac
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || {
  echo "local.sh: --num_processes must be a positive integer, got $num_processes" >&2; exit 2; }
[[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] || {
  echo "local.sh: --devices_per_process must be a positive integer" >&2; exit 2; }

if [[ "$workdir" != /* ]]; then
  workdir="$PWD/$workdir"  # the processes run from the repository root
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "$port" && "$num_processes" -gt 1 ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi

logs="$workdir/logs"
env_words=(env "JAX_PLATFORMS=$platform")
if [[ "$platform" == cpu ]]; then
  env_words+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices_per_process")
fi

lines=()
for ((i = 0; i < num_processes; i++)); do
  cmd=("${env_words[@]}" "$python" -m "notagen_jax.$module")
  if [[ "$module" == generate ]]; then
    cmd+=("--output=$workdir")
  else
    cmd+=("--config=$config" "--workdir=$workdir")
  fi
  if ((num_processes > 1)); then
    cmd+=("--config.distributed.coordinator_address=localhost:$port"
          "--config.distributed.num_processes=$num_processes"
          "--config.distributed.process_id=$i")
  fi
  cmd+=("${extra[@]}")
  lines+=("$(quote "${cmd[@]}") > $(quote "$logs/process_$i.log") 2>&1 &")
done

if ((dry_run)); then
  echo "cd $(quote "$PWD")"
  quote mkdir -p "$logs"
  printf '%s\n' "${lines[@]}"
  echo "wait"
  exit 0
fi

mkdir -p "$logs"
pids=()
stop() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop; exit 130' INT TERM
for line in "${lines[@]}"; do
  eval "$line"
  pids+=("$!")
done
echo "local.sh: $num_processes process(es) started, logs in $logs" >&2

failed=0
for ((i = 0; i < num_processes; i++)); do
  if wait "${pids[$i]}"; then
    echo "local.sh: process $i finished" >&2
  else
    status=$?
    echo "local.sh: process $i failed (exit $status); last lines of $logs/process_$i.log:" >&2
    tail -n 20 "$logs/process_$i.log" >&2 || true
    if ((!failed)); then
      failed=$status
      stop  # the others would wait for it forever
    fi
  fi
done
trap - INT TERM
exit "$failed"
