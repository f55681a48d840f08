#!/usr/bin/env bash
# A Cloud TPU VM or pod slice with gcloud: create or reuse it, put the code on every worker, install
# the TPU runtime, start the trainer detached on every worker (--worker=all) so that it outlives the
# ssh session, follow and collect its logs, recreate a preempted slice and resume, tear it down.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] COMMAND [-- extra train flags]

Starts `python -m notagen_jax.train` (or clamp_dpo, generate: --module) on every worker of the
slice.

Commands:
  up      create the TPU VM / pod slice (or reuse it when it exists), copy or pull the code on
          every worker and install the package with its tpu extra only (no torch, transformers
          or test tools)
  run     start the trainer on every worker at once, detached (setsid nohup, stdin from /dev/null:
          on every TPU VM image, unlike tmux): it outlives the ssh session and the launching
          machine; jax.distributed finds the slice's hosts. Each worker appends to
          ~/REMOTE_DIR/logs/RUN_NAME/<hostname>.log and copies that log itself (gcloud storage cp,
          with the VM's own credentials) to WORKDIR/logs/<start time>/<hostname>.log every
          LOG_SYNC_EVERY seconds and when the run ends: a worker's own copy outlives a preempted
          slice (which scp can no longer reach) and needs no launching machine online. With a
          gs:// workdir, run also writes its flags to WORKDIR/tpu_vm.args, which resume reads.
  follow  print worker 0's log as it grows until the run ends, then exit with the run's status
          (Ctrl-C stops the following only, not the run)
  logs    copy every worker's log to LOGS_DIR: with a gs:// workdir all of WORKDIR/logs (every
          start's, also after the slice is gone), else the workers' logs with scp
  stop    SIGTERM the run on every worker: the trainer saves a checkpoint and exits, the log is
          copied
  resume  after a preemption (Spot) or any loss of the slice, one command: read the launch's flags
          from WORKDIR/tpu_vm.args (with --dry-run too: reading changes nothing), delete the TPU
          unless it is READY, create it again (same type, version, --spot), up, and run the same
          training command with the same --workdir: the trainer resumes from the latest Orbax
          checkpoint there. Name the run as at launch (--workdir, or --bucket with --run_name or
          --name); flags given to resume override the recorded ones, train flags after -- are
          added. Without a record (a workdir not on gs://) resume uses the flags given.
  all     up, run, follow, then logs from the workers (the default)
  down    delete the TPU VM

Options (each also reads the environment variable named beside it; nothing is hard-coded):
  --name=NAME              TPU_NAME          TPU VM / slice name (required)
  --project=PROJECT        PROJECT           GCP project (default: CLOUDSDK_CORE_PROJECT)
  --zone=ZONE              ZONE              e.g. us-east5-a (required)
  --accelerator_type=TYPE  ACCELERATOR_TYPE  e.g. v5p-16: 8 chips on 2 hosts (up)
  --runtime_version=V      RUNTIME_VERSION   e.g. v2-alpha-tpuv5 (up)
  --spot                   TPU_SPOT=1        create a Spot TPU
  --code=copy|git          CODE              copy: this checkout's files (git ls-files, less
                                             logs/) as a tarball; git: clone / pull GIT_REPO at
                                             GIT_REF
  --git_repo=URL           GIT_REPO          (--code=git)
  --git_ref=REF            GIT_REF           default main (--code=git)
  --remote_dir=DIR         REMOTE_DIR        code dir on the workers, default notagen-jax (in ~)
  --jax_version=V          JAX_VERSION       workers install jax[tpu]==V; default: the jax floor
                                             in this checkout's pyproject.toml
  --install=CMD            INSTALL_CMD       default: PYTHON -m pip install -e '.[tpu]'
                                             'jax[tpu]==V' (a .pth init_checkpoint needs the
                                             torch extra too: '.[tpu,torch]' here, or start from
                                             an Orbax checkpoint)
  --module=M               MODULE            train (default), clamp_dpo (the CLaMP-DPO loop,
                                             every stage over every worker; resume goes on
                                             where it stopped, drawn pieces kept) or generate
                                             (pieces into the workdir; pass --resume after --
                                             to keep those drawn before)
  --config=FILE[:ARG]      CONFIG            default configs/pretrain.py:small (train),
                                             configs/clamp_dpo.py:small (clamp_dpo)
  --bucket=gs://B          BUCKET            runs go to BUCKET/runs/RUN_NAME unless --workdir
  --workdir=PATH           WORKDIR           gs://... or a shared filesystem path
  --shards_dir=PATH        SHARDS_DIR        gs://... or shared; passed as config.data.shards_dir
  --run_name=NAME          RUN_NAME          default: the TPU name
  --logs_dir=DIR           LOGS_DIR          local dir for collected logs, default logs/RUN_NAME
  --logs_from=workdir|workers  LOGS_FROM     where logs copies from (default above)
  --log_sync_every=S       LOG_SYNC_EVERY    seconds between a worker's log copies, default 60
  --num_hosts=N            NUM_HOSTS         hosts of the slice (default: from the type)
  --python=PY              REMOTE_PYTHON     default python3
  --libtpu_init_args=ARGS  LIBTPU_INIT_ARGS  XLA:TPU flags for the run on every worker, e.g.
                                             the ones `plan --compile` names to compile
                                             without collective-matmul loops
  --dry-run                                  print the commands, run nothing
  -h, --help

Example (2-host v5p Spot slice; after a preemption the second line brings it back and resumes):
  launch/tpu_vm.sh --name=ng-v5p --project=my-proj --zone=us-east5-a --spot \
      --accelerator_type=v5p-16 --runtime_version=v2-alpha-tpuv5 --bucket=gs://my-bucket \
      --shards_dir=gs://my-bucket/shards/notagen_shards/p16_prompt/1.0.0 all
  launch/tpu_vm.sh --workdir=gs://my-bucket/runs/ng-v5p resume
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

defaults() {
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
  jax_version="${JAX_VERSION:-}"
  install_cmd="${INSTALL_CMD:-}"
  module="${MODULE:-train}"
  config="${CONFIG:-}"
  bucket="${BUCKET:-}"
  workdir="${WORKDIR:-}"
  shards_dir="${SHARDS_DIR:-}"
  run_name="${RUN_NAME:-}"
  logs_dir="${LOGS_DIR:-}"
  logs_from="${LOGS_FROM:-}"
  log_sync_every="${LOG_SYNC_EVERY:-60}"
  num_hosts="${NUM_HOSTS:-}"
  python="${REMOTE_PYTHON:-python3}"
  libtpu_init_args="${LIBTPU_INIT_ARGS:-}"
  extra=()
}

parse() {
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
      --jax_version=*) jax_version="${1#*=}" ;;
      --install=*) install_cmd="${1#*=}" ;;
      --module=*) module="${1#*=}" ;;
      --config=*) config="${1#*=}" ;;
      --bucket=*) bucket="${1#*=}" ;;
      --workdir=*) workdir="${1#*=}" ;;
      --shards_dir=*) shards_dir="${1#*=}" ;;
      --run_name=*) run_name="${1#*=}" ;;
      --logs_dir=*) logs_dir="${1#*=}" ;;
      --logs_from=*) logs_from="${1#*=}" ;;
      --log_sync_every=*) log_sync_every="${1#*=}" ;;
      --num_hosts=*) num_hosts="${1#*=}" ;;
      --python=*) python="${1#*=}" ;;
      --libtpu_init_args=*) libtpu_init_args="${1#*=}" ;;
      --dry-run|--dry_run) dry_run=1 ;;
      -h|--help) usage; exit 0 ;;
      up|run|follow|logs|stop|resume|all|down) command="$1" ;;
      --) shift; extra+=("$@"); break ;;
      --config.*) extra+=("$1") ;;
      *) echo "tpu_vm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

dry_run=0
command=""
defaults
parse "$@"
command="${command:-all}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

resolve_workdir() {
  run_name="${run_name:-$name}"
  if [[ -z "$workdir" && -n "$bucket" ]]; then
    workdir="${bucket%/}/runs/$run_name"
  fi
}
resolve_workdir

# What the code is: the launch record notes it and resume warns when it changed.
code_id() {
  if [[ "$code" == copy ]]; then
    git -C "$repo_root" describe --always --dirty 2>/dev/null || echo unknown
  else
    echo "$git_repo@$git_ref"
  fi
}

# resume: the launch's flags from WORKDIR/tpu_vm.args, then this command line's on top of them.
if [[ "$command" == resume && "$workdir" == gs://* ]]; then
  record_url="$workdir/tpu_vm.args"
  echo "+ $(quote gcloud storage cat "$record_url")" >&2
  if record="$(gcloud storage cat "$record_url")"; then
    recorded=()
    launched_code=""
    while IFS= read -r line; do
      case "$line" in
        "# code: "*) launched_code="${line#"# code: "}" ;;
        "#"*) ;;
        *) recorded+=("$line") ;;
      esac
    done <<<"$record"
    defaults
    parse "${recorded[@]}"
    parse "$@"
    resolve_workdir
    if [[ -n "$launched_code" && "$launched_code" != "$(code_id)" ]]; then
      echo "tpu_vm.sh: note: the run was launched with code $launched_code, this is $(code_id)" >&2
    fi
  else
    echo "tpu_vm.sh: no launch record at $record_url: resuming with the flags given" >&2
  fi
fi

[[ -n "$name" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$project" ]] || die "--project (or PROJECT) is required"
[[ -n "$zone" ]] || die "--zone (or ZONE) is required"
[[ "$code" == copy || "$code" == git ]] || die "--code must be copy or git"
case "$module" in
  train) config="${config:-configs/pretrain.py:small}" ;;
  clamp_dpo) config="${config:-configs/clamp_dpo.py:small}" ;;
  generate) ;;
  *) die "--module must be train, clamp_dpo or generate, got $module" ;;
esac
if [[ "$module" != train && -n "$shards_dir" ]]; then
  die "--shards_dir is train's data; $module samples its own"
fi
[[ "$log_sync_every" =~ ^[1-9][0-9]*$ ]] || die "--log_sync_every must be a positive integer"
[[ -z "$logs_from" || "$logs_from" == workdir || "$logs_from" == workers ]] \
  || die "--logs_from must be workdir or workers"
logs_dir="${logs_dir:-logs/$run_name}"
if [[ -z "$jax_version" ]]; then
  jax_version="$(sed -n 's/^ *"jax>=\([0-9][0-9.]*\)".*/\1/p' "$repo_root/pyproject.toml")"
  [[ -n "$jax_version" ]] || die "no \"jax>=\" dependency in pyproject.toml: pass --jax_version"
fi
# Editable: the code the trainer runs (python -m from REMOTE_DIR) is the one installed.
install_line="${install_cmd:-$(quote "$python" -m pip install -e ".[tpu]" \
                                      "jax[tpu]==$jax_version")}"

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
[[ "$num_hosts" =~ ^[1-9][0-9]*$ ]] || die "--num_hosts must be a positive integer"

tpu=(gcloud compute tpus tpu-vm)
where=("--project=$project" "--zone=$zone")
tarball="/tmp/notagen-jax-$run_name.tar.gz"
logs_rel="logs/$run_name"  # the run's logs on a worker, under REMOTE_DIR

# Runs (or with --dry-run prints) one shell line; the printed line is exactly what is run.
do_line() {
  if ((dry_run)); then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    eval "$1"
  fi
}

# A worker's shell line: NAME=VALUE assignments, each value quoted, then a script that uses them.
assign() {
  local kv out=""
  for kv in "$@"; do
    out+="${kv%%=*}=$(quote "${kv#*=}"); "
  done
  printf '%s' "$out"
}

# A script below as one line (--dry-run prints one line per command): its lines, less their
# indentation, joined by spaces; so a line breaks only between words, and a statement ends in `;`.
one_line() {
  local line out=""
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"
    out+="${out:+ }$line"
  done
  printf '%s' "$out"
}

ssh_on() {  # ssh_on WORKER REMOTE_COMMAND: the command on one worker or on all of them
  do_line "$(quote "${tpu[@]}" ssh "$name" "${where[@]}" "--worker=$1" "--command=$2")"
}

need_create_flags() {
  [[ -n "$accelerator_type" ]] || die "--accelerator_type (or ACCELERATOR_TYPE) is required"
  [[ -n "$runtime_version" ]] || die "--runtime_version (or RUNTIME_VERSION) is required"
}

up() {
  need_create_flags
  local create=("${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type"
                "--version=$runtime_version")
  if ((spot)); then create+=(--spot); fi
  # Reuse: describe succeeds when the VM exists, and create runs only when it does not.
  do_line "$(quote "${tpu[@]}" describe "$name" "${where[@]}" --format=value\(state\)) || $(quote "${create[@]}")"
  local dir
  dir="$(quote "$remote_dir")"
  if [[ "$code" == copy ]]; then
    # Less logs/, where `logs` puts what it collects.
    do_line "git -C $(quote "$repo_root") ls-files -z --cached --others --exclude-standard -- . $(quote ':(exclude)logs') | tar -C $(quote "$repo_root") --null -T - -czf $(quote "$tarball")"
    do_line "$(quote "${tpu[@]}" scp "$tarball" "$name:notagen-jax.tar.gz" "${where[@]}" --worker=all)"
    ssh_on all "mkdir -p $dir && tar -xzf notagen-jax.tar.gz -C $dir && cd $dir && $install_line"
  else
    [[ -n "$git_repo" ]] || die "--code=git needs --git_repo (or GIT_REPO)"
    local repo ref
    repo="$(quote "$git_repo")"
    ref="$(quote "$git_ref")"
    ssh_on all "if [ -d $dir/.git ]; then git -C $dir fetch origin $ref; else git clone $repo $dir && git -C $dir fetch origin $ref; fi && git -C $dir checkout --force FETCH_HEAD && cd $dir && $install_line"
  fi
}

# The detached process on each worker (bash -c): $1 its log, $2 where to copy the log, $3 seconds
# between copies, then the training command. It writes LOG.pid, runs the trainer as its child
# (SIGTERM / SIGINT are passed on to it, SIGHUP is ignored through nohup), copies the log
# periodically and at the end, writes the exit status to the log's last line and to LOG.status.
worker_script="$(one_line <<'EOF'
log=$1 dest=$2 every=$3; shift 3;
echo $$ > "$log.pid"; rm -f "$log.status";
copy() {
  d="$dest/$(hostname).log";
  case "$dest" in
    gs://*) gcloud storage cp "$log" "$d" > /dev/null 2>&1 ;;
    *) mkdir -p "$dest" && cp "$log" "$d" ;;
  esac || echo "[tpu_vm.sh] could not copy the log to $d";
};
(while sleep "$every"; do copy; done) & syncer=$!;
echo "[tpu_vm.sh] $(date -u +%FT%TZ) $(hostname) starts: $*";
"$@" & child=$!;
trap 'kill -TERM "$child" 2> /dev/null' TERM INT;
status=0; wait "$child" || status=$?;
while kill -0 "$child" 2> /dev/null; do status=0; wait "$child" || status=$?; done;
kill "$syncer" 2> /dev/null;
echo "[tpu_vm.sh] $(date -u +%FT%TZ) $(hostname) exit status $status";
echo "$status" > "$log.status"; copy; exit "$status"
EOF
)"

# Each worker: refuse when its previous run is still going (its pid lives and it wrote no exit
# status), else start the one above detached (its own session, no terminal, stdin from /dev/null,
# output appended to the log) and return once it has written its pid. SIGHUP is ignored from
# before the fork, so a session that ends at once cannot hang up on it before nohup and setsid.
start_script="$(one_line <<'EOF'
cd "$dir" && mkdir -p "$logs" || exit 1;
log="$logs/$(hostname).log";
if [ -f "$log.pid" ] && [ ! -f "$log.status" ] && kill -0 "$(cat "$log.pid")" 2> /dev/null; then
  echo "$(hostname): the run in $PWD/$logs is still going (pid $(cat "$log.pid")):"
    "stop it first" >&2;
  exit 1;
fi;
rm -f "$log.pid" "$log.status"; trap '' HUP;
setsid nohup bash -c "$script" tpu_vm.sh "$log" "$dest" "$every" "$@" >> "$log" 2>&1 < /dev/null &
i=0; while [ ! -s "$log.pid" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done;
if [ -s "$log.pid" ]; then echo "$(hostname): started pid $(cat "$log.pid"), log $PWD/$log";
else echo "$(hostname): did not start, see $PWD/$log" >&2; exit 1; fi
EOF
)"

# Worker 0's log until its run ends (tail --pid), then the run's exit status.
follow_script="$(one_line <<'EOF'
cd "$dir" || exit 1; log="$logs/$(hostname).log"; pid=$(cat "$log.pid" 2> /dev/null);
if [ -n "$pid" ] && [ ! -f "$log.status" ] && kill -0 "$pid" 2> /dev/null; then
  tail -n 100 -F --pid="$pid" "$log";
else tail -n 100 "$log"; fi;
exit "$(cat "$log.status" 2> /dev/null || echo 1)"
EOF
)"

stop_script="$(one_line <<'EOF'
cd "$dir" || exit 1; log="$logs/$(hostname).log"; pid=$(cat "$log.pid" 2> /dev/null);
if [ -n "$pid" ] && kill -TERM "$pid" 2> /dev/null; then echo "$(hostname): stopping pid $pid";
else echo "$(hostname): no run going"; fi
EOF
)"

# resume reads these lines back: the resolved flags, one a line, then -- and the train flags.
write_record() {
  local url="$workdir/tpu_vm.args" value
  local flags=("# launch/tpu_vm.sh flags of run $run_name, read by resume" "# code: $(code_id)"
               "--name=$name" "--project=$project" "--zone=$zone"
               "--accelerator_type=$accelerator_type" "--runtime_version=$runtime_version"
               "--code=$code" "--git_repo=$git_repo" "--git_ref=$git_ref"
               "--remote_dir=$remote_dir" "--jax_version=$jax_version" "--module=$module"
               "--config=$config"
               "--workdir=$workdir" "--shards_dir=$shards_dir" "--run_name=$run_name"
               "--num_hosts=$num_hosts" "--python=$python" "--log_sync_every=$log_sync_every")
  if [[ -n "$install_cmd" ]]; then flags+=("--install=$install_cmd"); fi
  if [[ -n "$libtpu_init_args" ]]; then flags+=("--libtpu_init_args=$libtpu_init_args"); fi
  if ((spot)); then flags+=(--spot); fi
  flags+=(-- "${extra[@]}")
  for value in "${flags[@]}"; do
    [[ "$value" != *$'\n'* ]] || die "a flag holds a newline: $value"
  done
  do_line "$(quote printf '%s\n' "${flags[@]}") | $(quote gcloud storage cp - "$url")"
}

run() {
  [[ -n "$workdir" ]] || die "--workdir or --bucket (or WORKDIR / BUCKET) is required to run"
  local train=("$python" -m "notagen_jax.$module")
  if [[ "$module" == generate ]]; then
    train+=("--output=$workdir")  # its flags after --, e.g. --checkpoint=... --num_pieces=...
  else
    train+=("--config=$config" "--workdir=$workdir")
  fi
  if [[ -n "$shards_dir" ]]; then train+=("--config.data.shards_dir=$shards_dir"); fi
  # More than one host: every worker calls jax.distributed.initialize(), which reads the slice
  # from the TPU environment (coordinator, process ids).
  if ((num_hosts > 1)); then train+=("--config.distributed.num_processes=$num_hosts"); fi
  train+=("${extra[@]}")
  if [[ -n "$libtpu_init_args" ]]; then
    train=(env "LIBTPU_INIT_ARGS=$libtpu_init_args" "${train[@]}")
  fi
  if [[ "$workdir" == gs://* ]]; then
    write_record
  else
    echo "tpu_vm.sh: the workdir is not on gs://: no launch record, resume needs these flags" >&2
  fi
  # Each start's logs get their own folder, so a resumed run's logs do not replace the last's.
  local dest
  dest="${workdir%/}/logs/$(date -u +%Y%m%d-%H%M%SZ)"
  ssh_on all "$(assign "dir=$remote_dir" "logs=$logs_rel" "dest=$dest" "every=$log_sync_every" \
                       "script=$worker_script")set -- $(quote "${train[@]}"); $start_script"
}

follow() {
  ssh_on 0 "$(assign "dir=$remote_dir" "logs=$logs_rel")$follow_script"
}

stop() {
  ssh_on all "$(assign "dir=$remote_dir" "logs=$logs_rel")$stop_script"
}

logs() {  # logs [workdir|workers]
  local from="${1:-$logs_from}"
  if [[ -z "$from" ]]; then
    if [[ "$workdir" == gs://* ]]; then from=workdir; else from=workers; fi
  fi
  do_line "mkdir -p $(quote "$logs_dir")"
  if [[ "$from" == workdir ]]; then
    [[ "$workdir" == gs://* ]] || die "logs from the workdir need a gs:// workdir"
    do_line "$(quote gcloud storage rsync --recursive "${workdir%/}/logs" "$logs_dir")"
  else
    do_line "$(quote "${tpu[@]}" scp "$name:$remote_dir/$logs_rel/*" "$logs_dir/" "${where[@]}" \
                     --worker=all)"
  fi
}

# A TPU that is not READY (PREEMPTED, TERMINATED, ...) cannot run again: delete it so that up
# creates it anew. A READY one is reused (run refuses while its previous run is still going).
recreate() {
  local describe delete
  describe="$(quote "${tpu[@]}" describe "$name" "${where[@]}" --format=value\(state\))"
  delete="$(quote "${tpu[@]}" delete "$name" "${where[@]}" --quiet)"
  local line="state=\$($describe 2> /dev/null) || state=; "
  line+="if [ -n \"\$state\" ] && [ \"\$state\" != READY ]; then "
  line+="echo \"the TPU is \$state: deleting it\" >&2; $delete; fi"
  do_line "$line"
}

down() {
  do_line "$(quote "${tpu[@]}" delete "$name" "${where[@]}" --quiet)"
}

case "$command" in
  up) up ;;
  run) run ;;
  follow) follow ;;
  logs) logs ;;
  stop) stop ;;
  down) down ;;
  resume)
    need_create_flags  # before anything is deleted
    [[ -n "$workdir" ]] || die "--workdir or --bucket (or WORKDIR / BUCKET) is required to resume"
    recreate
    up
    run
    ;;
  all)
    up
    run
    status=0
    follow || status=$?
    logs workers
    exit "$status"
    ;;
esac
