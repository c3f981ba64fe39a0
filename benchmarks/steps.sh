# Sourced by the GPU scripts (gpu_check.sh, gpu_tp.sh): `step NAME TIMEOUT CMD...` runs one
# step if NAME is in $STEPS, under TIMEOUT seconds and what is left of $BUDGET (counted from
# $T0); a step that would start after the budget is skipped. Sets RC (the command's exit
# status, or "skip").
step() {
  local name=$1 t=$2; shift 2
  RC=skip
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local el=$(( $(date +%s) - T0 ))
  if [ $el -ge $BUDGET ]; then echo "== $name: skipped (budget ${BUDGET}s spent)"; return; fi
  [ $t -gt $(( BUDGET - el )) ] && t=$(( BUDGET - el ))
  echo "== $name (t=${el}s, limit ${t}s)"
  timeout $t "$@" 2>&1 | tail -${TAIL:-40}
  RC=${PIPESTATUS[0]}
}
