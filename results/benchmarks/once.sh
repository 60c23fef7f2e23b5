# Sourced by the resumable result scripts here.
# once OUT CMD...: run CMD unless OUT already holds a result; the last line CMD prints (the
# benchmarks print one JSON line) goes to OUT.part, renamed to OUT only when CMD succeeds, so an
# interrupted script reruns just what it had not finished.
once() {
  local out=$1; shift
  [ -s "$out" ] && { echo "kept $out" >&2; return 0; }
  "$@" | tail -n 1 > "$out.part" && mv "$out.part" "$out"
}
