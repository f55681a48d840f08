# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# Prints its arguments as one shell-quoted line that pastes back as the same words.
quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${out:+ }$arg"
    else
      out+="${out:+ }'${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}
