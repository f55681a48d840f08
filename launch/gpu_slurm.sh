#!/usr/bin/env bash
# Submits launch/gpu_slurm.sbatch with the job's shape as sbatch options: N nodes x G GPUs, one
# process per GPU (per-gpu) or per node (per-node).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --workdir=DIR [options] [-- extra train flags]

  --workdir=DIR           WORKDIR        run directory on a filesystem every node sees (required)
  --module=M              MODULE         train (default), clamp_dpo or generate (pieces into
                                         DIR; its flags after --), same flags each
  --config=FILE[:ARG]     CONFIG         default configs/pretrain.py:small (train),
                                         configs/clamp_dpo.py:small (clamp_dpo)
  --nodes=N               NODES          default 1
  --gpus_per_node=G       GPUS_PER_NODE  default 8
  --mode=per-gpu|per-node TASK_MODE      one process per GPU (default) or per node
  --cpus_per_gpu=C        CPUS_PER_GPU   default 8 (data loading threads per GPU)
  --partition=P           PARTITION      (optional)
  --account=A             ACCOUNT        (optional)
  --qos=Q                 QOS            (optional)
  --time=T                TIME_LIMIT     default 24:00:00
  --job_name=NAME         JOB_NAME       default notagen-jax
  --logs_dir=DIR          LOGS_DIR       SLURM's output file goes here, default logs/slurm
  --port=PORT             COORDINATOR_PORT  default 12355
  --python=PY             PYTHON         default python
  --sbatch_arg=ARG        (repeatable)   any other sbatch option, e.g. --sbatch_arg=--exclusive
  --dry-run                              print the commands, submit nothing
  -h, --help

NCCL settings (NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are read from the environment
at submission and documented in launch/gpu_slurm.sbatch.
Example, 2 nodes x 8 GPUs:
  launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --partition=gpu --workdir=/shared/runs/small \
      -- --config.data.shards_dir=/shared/shards/notagen_shards/p16_prompt/1.0.0
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

workdir="${WORKDIR:-}"
module="${MODULE:-train}"
config="${CONFIG:-}"
nodes="${NODES:-1}"
gpus_per_node="${GPUS_PER_NODE:-8}"
mode="${TASK_MODE:-per-gpu}"
cpus_per_gpu="${CPUS_PER_GPU:-8}"
partition="${PARTITION:-}"
account="${ACCOUNT:-}"
qos="${QOS:-}"
time_limit="${TIME_LIMIT:-24:00:00}"
job_name="${JOB_NAME:-notagen-jax}"
logs_dir="${LOGS_DIR:-logs/slurm}"
port="${COORDINATOR_PORT:-12355}"
python="${PYTHON:-python}"
dry_run=0
sbatch_args=()
extra=()

while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --cpus_per_gpu=*) cpus_per_gpu="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --qos=*) qos="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --logs_dir=*) logs_dir="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --sbatch_arg=*) sbatch_args+=("${1#*=}") ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    --config.*) extra+=("$1") ;;
    *) echo "gpu_slurm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }
[[ -n "$workdir" ]] || die "--workdir (or WORKDIR) is required"
case "$module" in
  train) config="${config:-configs/pretrain.py:small}" ;;
  clamp_dpo) config="${config:-configs/clamp_dpo.py:small}" ;;
  generate) ;;
  *) die "--module must be train, clamp_dpo or generate, got $module" ;;
esac
for value in "$nodes" "$gpus_per_node" "$cpus_per_gpu"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "--nodes, --gpus_per_node, --cpus_per_gpu: positive integers"
done
case "$mode" in
  per-gpu) tasks_per_node="$gpus_per_node"; cpus_per_task="$cpus_per_gpu" ;;
  per-node) tasks_per_node=1; cpus_per_task=$((cpus_per_gpu * gpus_per_node)) ;;
  *) die "--mode must be per-gpu or per-node" ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # SLURM_SUBMIT_DIR: the batch script runs this checkout
sbatch=(sbatch "--job-name=$job_name" "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node"
        "--gpus-per-node=$gpus_per_node" "--cpus-per-task=$cpus_per_task" "--time=$time_limit"
        "--output=$logs_dir/%x-%j.out")
if [[ -n "$partition" ]]; then sbatch+=("--partition=$partition"); fi
if [[ -n "$account" ]]; then sbatch+=("--account=$account"); fi
if [[ -n "$qos" ]]; then sbatch+=("--qos=$qos"); fi
sbatch+=("${sbatch_args[@]}" launch/gpu_slurm.sbatch "--mode=$mode" "--module=$module" "--config=$config"
         "--workdir=$workdir" "--port=$port" "--python=$python" -- "${extra[@]}")

lines=("cd $(quote "$PWD")" "$(quote mkdir -p "$logs_dir")" "$(quote "${sbatch[@]}")")
for line in "${lines[@]}"; do
  if ((dry_run)); then
    printf '%s\n' "$line"
  else
    echo "+ $line" >&2
    eval "$line"
  fi
done
