#!/usr/bin/env bash
# Mutation testing of the modules that judge outside input: would the unit tests notice
# if the code were wrong? cargo-mutants changes one operator or function body at a time
# and runs each module's library unit tests against it.
#
# Run on purpose, not part of scripts/test.sh (it takes tens of minutes):
#   nice -n 15 bash scripts/mutants.sh              # every module below
#   nice -n 15 bash scripts/mutants.sh gateway/src/esi.rs   # some of them
#
# The work tree is never mutated: the tracked and untracked (not ignored) files are
# copied to a throw-away tree, and cargo-mutants mutates that copy in place. Builds go
# to $TESSERA_MUTANTS_DIR/target (default /tmp/tessera-mutants), kept between runs so
# dependencies are built once; each module's report (caught.txt, missed.txt, …) lands in
# $TESSERA_MUTANTS_DIR/reports/. Equivalent mutants are excluded in .cargo/mutants.toml,
# each with its reason.
#
# Prints file | caught | missed | timeouts | score, where score = (caught + timeouts) /
# (caught + missed + timeouts); unviable mutants (that do not compile) are not counted.
# Exits non-zero when a module scores under $TESSERA_MUTANTS_MIN (default 95).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_MUTANTS_VERSION=27.1.0
MIN_SCORE=${TESSERA_MUTANTS_MIN:-95}
DIR=${TESSERA_MUTANTS_DIR:-${TMPDIR:-/tmp}/tessera-mutants}

# package and file of each module under test
MODULES=(
  "tessera-protocol protocol/src/key.rs"
  "tessera-protocol protocol/src/envelope.rs"
  "tessera-protocol protocol/src/message.rs"
  "tessera-protocol protocol/src/config/*.rs"
  "tessera-gateway gateway/src/esi.rs"
  "tessera-gateway gateway/src/cache/hot.rs"
  "tessera-gateway gateway/src/http/headers.rs"
  "tessera-workers fragment-workers/src/retry.rs"
)

selected=()
if [ "$#" -eq 0 ]; then
  selected=("${MODULES[@]}")
else
  for want in "$@"; do
    match=""
    for m in "${MODULES[@]}"; do
      [ "${m#* }" = "$want" ] && match=$m
    done
    if [ -z "$match" ]; then
      echo "mutants.sh: $want is not one of the modules under test:" >&2
      printf '  %s\n' "${MODULES[@]#* }" >&2
      exit 2
    fi
    selected+=("$match")
  done
fi

if ! cargo mutants --version 2>/dev/null | grep -qx "cargo-mutants $CARGO_MUTANTS_VERSION"; then
  echo "== installing cargo-mutants $CARGO_MUTANTS_VERSION"
  cargo install --locked "cargo-mutants@$CARGO_MUTANTS_VERSION"
fi

mkdir -p "$DIR/reports"
tree=$(mktemp -d "$DIR/tree.XXXXXX")
trap 'rm -rf "$tree"' EXIT
# --touch: the copy's files are newer than anything in the shared target directory.
# With their original times, cargo could take a test binary built from the last
# mutant of an earlier run (newer than the unchanged source) as up to date.
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --create --file=- |
  tar --extract --touch --file=- --directory="$tree"
export CARGO_TARGET_DIR="$DIR/target"

rows=()
below=0
for m in "${selected[@]}"; do
  pkg=${m%% *}
  file=${m#* }
  out="$DIR/reports/$(echo "$file" | tr '/*' '_x')"
  rm -rf "$out"
  echo "== $file ($pkg)"
  # In place means one mutant at a time (cargo-mutants refuses --jobs with it), which
  # suits a shared machine. Exit status 2 means missed mutants and 3 timeouts: both are
  # results, counted below.
  status=0
  (cd "$tree" && cargo mutants --in-place --no-shuffle -p "$pkg" -f "$file" \
    --timeout 60 --output "$out" -C --lib) || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 2 ] && [ "$status" -ne 3 ]; then
    echo "mutants.sh: cargo mutants failed on $file (exit $status); see $out" >&2
    exit "$status"
  fi
  count() { if [ -f "$out/mutants.out/$1.txt" ]; then grep -c . "$out/mutants.out/$1.txt" || true; else echo 0; fi; }
  caught=$(count caught)
  missed=$(count missed)
  timeouts=$(count timeout)
  score=$(awk -v c="$caught" -v m="$missed" -v t="$timeouts" \
    'BEGIN { n = c + m + t; printf "%.1f", n ? 100 * (c + t) / n : 100 }')
  rows+=("| $file | $caught | $missed | $timeouts | $score % |")
  if awk -v s="$score" -v min="$MIN_SCORE" 'BEGIN { exit !(s < min) }'; then
    below=1
  fi
  if [ "$missed" -gt 0 ]; then
    echo "-- missed in $file:"
    sed 's/^/   /' "$out/mutants.out/missed.txt"
  fi
done

echo
echo "| file | caught | missed | timeouts | score |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "reports: $DIR/reports"
if [ "$below" -ne 0 ]; then
  echo "mutants.sh: a module scores under $MIN_SCORE %" >&2
  exit 1
fi
