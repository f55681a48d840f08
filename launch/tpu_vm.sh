#!/usr/bin/env bash
# A Cloud TPU VM or pod slice with gcloud: create or reuse it, put the code on every worker,
# install, run a config on every worker (--worker=all) with the logs collected, tear it down.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] COMMAND [-- extra train flags]

Commands:
  up      create the TPU VM / pod slice (or reuse it when it exists), copy or pull the code on
          every worker and install it
  run     run the trainer on every worker at once (jax.distributed finds the slice's hosts);
          each worker tees its output to REMOTE_DIR/logs/RUN_NAME/<hostname>.log
  logs    copy every worker's logs of RUN_NAME to LOGS_DIR
  all     up, run, logs (the default)
  down    delete the TPU VM

Options (each also reads the environment variable named beside it; nothing is hard-coded):
  --name=NAME              TPU_NAME          TPU VM / slice name (required)
  --project=PROJECT        PROJECT           GCP project (default: CLOUDSDK_CORE_PROJECT)
  --zone=ZONE              ZONE              e.g. us-east5-a (required)
  --accelerator_type=TYPE  ACCELERATOR_TYPE  e.g. v5p-16: 8 chips on 2 hosts (up)
  --runtime_version=V      RUNTIME_VERSION   e.g. v2-alpha-tpuv5 (up)
  --spot                   TPU_SPOT=1        create a Spot TPU
  --code=copy|git          CODE              copy: this checkout's files (git ls-files) as a
                                             tarball; git: clone / pull GIT_REPO at GIT_REF
  --git_repo=URL           GIT_REPO          (--code=git)
  --git_ref=REF            GIT_REF           default main (--code=git)
  --remote_dir=DIR         REMOTE_DIR        code dir on the workers, default notagen-jax (in ~)
  --install=CMD            INSTALL_CMD       default: pip install -r requirements.txt 'jax[tpu]'
  --config=FILE[:ARG]      CONFIG            default configs/pretrain.py:small
  --bucket=gs://B          BUCKET            runs go to BUCKET/runs/RUN_NAME unless --workdir
  --workdir=PATH           WORKDIR           gs://... or a shared filesystem path
  --shards_dir=PATH        SHARDS_DIR        gs://... or shared; passed as config.data.shards_dir
  --run_name=NAME          RUN_NAME          default: the TPU name
  --logs_dir=DIR           LOGS_DIR          local dir for collected logs, default logs/RUN_NAME
  --num_hosts=N            NUM_HOSTS         hosts of the slice (default: from the type)
  --python=PY              REMOTE_PYTHON     default python3
  --dry-run                                  print the commands, run nothing
  -h, --help

Example (2-host v5p slice):
  launch/tpu_vm.sh --name=ng-v5p --project=my-proj --zone=us-east5-a \
      --accelerator_type=v5p-16 --runtime_version=v2-alpha-tpuv5 --bucket=gs://my-bucket \
      --shards_dir=gs://my-bucket/shards/notagen_shards/p16_prompt/1.0.0 all
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="${TPU_NAME:-}"
project="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
zone="${ZONE:-}"
accelerator_type="${ACCELERATOR_TYPE:-}"
runtime_version="${RUNTIME_VERSION:-}"
spot="${TPU_SPOT:-0}"
code="${CODE:-copy}"
git_repo="${GIT_REPO:-}"
git_ref="${GIT_REF:-main}"
remote_dir="${REMOTE_DIR:-notagen-jax}"
install_cmd="${INSTALL_CMD:-}"
config="${CONFIG:-configs/pretrain.py:small}"
bucket="${BUCKET:-}"
workdir="${WORKDIR:-}"
shards_dir="${SHARDS_DIR:-}"
run_name="${RUN_NAME:-}"
logs_dir="${LOGS_DIR:-}"
num_hosts="${NUM_HOSTS:-}"
python="${REMOTE_PYTHON:-python3}"
dry_run=0
command=""
extra=()

while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --spot) spot=1 ;;
    --code=*) code="${1#*=}" ;;
    --git_repo=*) git_repo="${1#*=}" ;;
    --git_ref=*) git_ref="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --install=*) install_cmd="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --shards_dir=*) shards_dir="${1#*=}" ;;
    --run_name=*) run_name="${1#*=}" ;;
    --logs_dir=*) logs_dir="${1#*=}" ;;
    --num_hosts=*) num_hosts="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    up|run|logs|all|down) command="$1" ;;
    --) shift; extra+=("$@"); break ;;
    --config.*) extra+=("$1") ;;
    *) echo "tpu_vm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command="${command:-all}"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
[[ -n "$name" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$project" ]] || die "--project (or PROJECT) is required"
[[ -n "$zone" ]] || die "--zone (or ZONE) is required"
[[ "$code" == copy || "$code" == git ]] || die "--code must be copy or git"
run_name="${run_name:-$name}"
logs_dir="${logs_dir:-logs/$run_name}"
if [[ -z "$workdir" && -n "$bucket" ]]; then
  workdir="${bucket%/}/runs/$run_name"
fi
if [[ -z "$install_cmd" ]]; then
  install_cmd="$python -m pip install -r requirements.txt 'jax[tpu]'"
fi

# Hosts of a slice: v4 / v5p names count TensorCores (2 per chip, 4 chips per host); v5e / v6e
# names count chips (up to 8 on one host, else 4 per host).
hosts_of() {
  local type="$1" n
  n="${type##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo 1; return; }
  case "$type" in
    v4-*|v5p-*) n=$((n / 2)); echo $(((n + 3) / 4)) ;;
    *) if ((n <= 8)); then echo 1; else echo $(((n + 3) / 4)); fi ;;
  esac
}
if [[ -z "$num_hosts" ]]; then
  num_hosts="$(hosts_of "${accelerator_type:-1}")"
fi

tpu=(gcloud compute tpus tpu-vm)
where=("--project=$project" "--zone=$zone")
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="/tmp/notagen-jax-$run_name.tar.gz"

# Runs (or with --dry-run prints) one shell line; the printed line is exactly what is run.
do_line() {
  if ((dry_run)); then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    eval "$1"
  fi
}

ssh_all() {  # ssh_all REMOTE_COMMAND: the command on every worker
  do_line "$(quote "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$1")"
}

up() {
  [[ -n "$accelerator_type" ]] || die "--accelerator_type (or ACCELERATOR_TYPE) is required"
  [[ -n "$runtime_version" ]] || die "--runtime_version (or RUNTIME_VERSION) is required"
  local create=("${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type"
                "--version=$runtime_version")
  if ((spot)); then create+=(--spot); fi
  # Reuse: describe succeeds when the VM exists, and create runs only when it does not.
  do_line "$(quote "${tpu[@]}" describe "$name" "${where[@]}" --format=value\(state\)) || $(quote "${create[@]}")"
  local dir
  dir="$(quote "$remote_dir")"
  if [[ "$code" == copy ]]; then
    do_line "git -C $(quote "$repo_root") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$repo_root") --null -T - -czf $(quote "$tarball")"
    do_line "$(quote "${tpu[@]}" scp "$tarball" "$name:notagen-jax.tar.gz" "${where[@]}" --worker=all)"
    ssh_all "mkdir -p $dir && tar -xzf notagen-jax.tar.gz -C $dir && cd $dir && $install_cmd"
  else
    [[ -n "$git_repo" ]] || die "--code=git needs --git_repo (or GIT_REPO)"
    local repo ref
    repo="$(quote "$git_repo")"
    ref="$(quote "$git_ref")"
    ssh_all "if [ -d $dir/.git ]; then git -C $dir fetch origin $ref; else git clone $repo $dir && git -C $dir fetch origin $ref; fi && git -C $dir checkout --force FETCH_HEAD && cd $dir && $install_cmd"
  fi
}

run() {
  [[ -n "$workdir" ]] || die "--workdir or --bucket (or WORKDIR / BUCKET) is required to run"
  local train=("$python" -m notagen_jax.train "--config=$config" "--workdir=$workdir")
  if [[ -n "$shards_dir" ]]; then train+=("--config.data.shards_dir=$shards_dir"); fi
  # More than one host: every worker calls jax.distributed.initialize(), which reads the slice
  # from the TPU environment (coordinator, process ids).
  if ((num_hosts > 1)); then train+=("--config.distributed.num_processes=$num_hosts"); fi
  train+=("${extra[@]}")
  local dir log
  dir="$(quote "$remote_dir")"
  log="logs/$(quote "$run_name")/\$(hostname).log"
  ssh_all "set -o pipefail; cd $dir && mkdir -p logs/$(quote "$run_name") && $(quote "${train[@]}") 2>&1 | tee -a $log"
}

logs() {
  do_line "mkdir -p $(quote "$logs_dir")"
  do_line "$(quote "${tpu[@]}" scp "$name:$remote_dir/logs/$run_name/*" "$logs_dir/" "${where[@]}" --worker=all)"
}

down() {
  do_line "$(quote "${tpu[@]}" delete "$name" "${where[@]}" --quiet)"
}

case "$command" in
  up) up ;;
  run) run ;;
  logs) logs ;;
  down) down ;;
  all)
    up
    status=0
    run || status=$?
    logs
    exit "$status"
    ;;
esac
