#!/usr/bin/env bash
# The paper's synthetic tasks on one GPU, in one job of about 8 minutes: Induction Heads (trained
# at L = 2^8, evaluated at every L = 2^6 .. 2^20) and Selective Copying (L = 4096), each with the
# selective model (S6) and the non-selective LTI ablation (model.selective=false), plus recipe
# variants of both (ONLY=all).
#
#   OUT=/path/to/results bash benchmarks/tasks_gpu.sh
#   ONLY="selective_copying_s6 induction_heads_s6_b64" OUT=... bash benchmarks/tasks_gpu.sh
#   ONLY=all OUT=... bash benchmarks/tasks_gpu.sh    # every recipe variant below
#   CKPT_IN=benchmarks/checkpoints OUT=... bash benchmarks/tasks_gpu.sh   # continue earlier runs
#
# The runs share the GPU concurrently (each takes MEM_FRACTION of its memory). Each trains with
# train.py in one or more stages under a wall-clock budget (train.time_limit_s, with a checkpoint
# when it runs out); a stage may change train.seq_len, and the next stage resumes the checkpoint
# (a length curriculum). Then `benchmarks/tasks.py` evaluates 1000 fresh sequences per length.
# Every part runs under `timeout`, so one failure keeps the others' results. Written under $OUT:
#   <run>.json          a `tasks` record (benchmarks/record.py): accuracy per length; its config
#                       holds the training step, the recipe, and each stage's train summary
#   <run>.ckpt.tar.gz   the run's checkpoint directory (a few MB): with CKPT_IN pointing at a
#                       folder of these, the same command resumes every run where it stopped
#   <run>.train.log / <run>.eval.log / <run>.stages.jsonl / <run>.status (exit codes, wall times)
#   tasks_summary.jsonl all runs, one JSON line each; the same table is printed last
# Only the records are *.json, so $OUT's records can be copied into benchmarks/results/ as they are.
#
# Recipes (the paper's are in appendix E.1; what we change is said per run):
#   induction_heads_s6        the paper's: Adam 1e-3 constant, batch 8, 20,000 steps
#   induction_heads_s6_lr3e-3 batch 8 at a constant 3e-3 for the whole budget: the recipe that
#                             reaches 100% at every length to 2^20
#   induction_heads_s6_lr1e-2 batch 8 at 1e-2 (does not learn)
#   induction_heads_s6_then3e-3   the paper's 20,000 steps, then 3e-3 for IH_VAR_S seconds
#   induction_heads_s6_long   the paper's recipe for IH_S6_S + IH_VAR_S seconds
#   induction_heads_s6_b64 / _b64_lr3e-3 / _b64_lr1e-2   the same at batch 64 (1e-3, 3e-3, 1e-2)
#   induction_heads_lti       the paper's recipe with model.selective=false
#   selective_copying_s6      a length curriculum: L 256 for 150 s, then L 4096 for 270 s (the
#                             paper trains at 4096 throughout, 400K steps at 1e-4); Adam 1e-3
#                             constant after a 200-step warmup
#   selective_copying_s6_lr3e-3   the curriculum at 3e-3
#   selective_copying_s6_flat L 4096 throughout at 1e-3
#   selective_copying_lti     the curriculum with model.selective=false
set -u
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python}
RUNS=${RUNS_DIR:-/tmp/mamba_tasks_runs}
# Seconds of training per stage (compilation included), overridable from the environment.
IH_S6_S=${IH_S6_S:-200}
IH_VAR_S=${IH_VAR_S:-240}
IH_LTI_S=${IH_LTI_S:-60}
SC_SHORT_S=${SC_SHORT_S:-150}
SC_LONG_S=${SC_LONG_S:-270}
SC_FLAT_S=${SC_FLAT_S:-290}
SC_LTI_S=${SC_LTI_S:-60}
SC_SHORT_LEN=${SC_SHORT_LEN:-256}
SC_LONG_LEN=${SC_LONG_LEN:-4096}
EVAL_S=${EVAL_S:-240}
EVAL_IMPL=${EVAL_IMPL:-pallas}
# The runs to make (names below). The default is the README's table: the recipes that reach the
# paper's numbers, the paper's own Induction Heads recipe, and the LTI ablations. ONLY=all: every run.
ONLY=${ONLY:-induction_heads_s6 induction_heads_s6_lr3e-3 induction_heads_lti selective_copying_s6 selective_copying_lti}
[ "$ONLY" = all ] && ONLY=
CKPT_IN=${CKPT_IN:-}
LONG_RUN=train.steps=100000000  # the time budget, not a step count, ends these runs
# Extra words for every train.py / benchmarks/tasks.py call (e.g. a CPU dry run at toy sizes).
read -r -a EXTRA_TRAIN <<<"${EXTRA_TRAIN:-}"
read -r -a EXTRA_EVAL <<<"${EXTRA_EVAL:-}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.12}
mkdir -p "$OUT" "$RUNS"
START=$(date +%s)

# run NAME TASK STAGES [train.py overrides...]
# STAGES: comma-separated LEN:SECONDS[:OVERRIDES], trained in order, each resuming the one before;
# OVERRIDES are train.py overrides for that stage alone, separated by spaces.
run() {
  local name=$1 task=$2 stages=$3
  shift 3
  case " $ONLY " in *" $name "* | "  ") ;; *) return 0 ;; esac
  local ckpt="$RUNS/$name" t0 t1 t2 rc_train=0 rc_eval stage len seconds rest stage_args
  rm -rf "$ckpt" "$OUT/$name.stages.jsonl"
  if [ -n "$CKPT_IN" ] && [ -f "$CKPT_IN/$name.ckpt.tar.gz" ]; then
    mkdir -p "$ckpt" && tar -xzf "$CKPT_IN/$name.ckpt.tar.gz" -C "$ckpt"
  fi
  t0=$(date +%s)
  local stage_list
  IFS=, read -r -a stage_list <<<"$stages"
  for stage in "${stage_list[@]}"; do
    len=${stage%%:*}
    rest=${stage#*:}
    seconds=${rest%%:*}
    case "$len:$seconds" in
      *[!0-9:]* | :* | *:) echo "$name: stage '$stage' is not LEN:SECONDS[:OVERRIDES]" >&2; return 1 ;;
    esac
    stage_args=()
    [ "$rest" != "$seconds" ] && read -r -a stage_args <<<"${rest#*:}"
    timeout $((seconds + 120)) "$PY" train.py --config "configs/$task.yaml" \
      checkpoint.dir="$ckpt" train.seq_len="$len" train.time_limit_s="$seconds" \
      train.progress=false "$@" "${stage_args[@]}" "${EXTRA_TRAIN[@]}" \
      >>"$OUT/$name.train.log" 2>&1
    rc_train=$?
    "$PY" - "$ckpt/train_summary.json" "$len" "$seconds" "$rc_train" \
      >>"$OUT/$name.stages.jsonl" <<'EOF'
import json, os, sys
path, length, budget, rc = sys.argv[1:]
summary = json.load(open(path)) if os.path.exists(path) else {}
print(json.dumps({"seq_len": int(length), "budget_s": int(budget), "rc": int(rc), **summary}))
EOF
    [ $rc_train -ne 0 ] && break
  done
  t1=$(date +%s)
  cp "$ckpt/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  tar -czf "$OUT/$name.ckpt.tar.gz" -C "$ckpt" . 2>/dev/null
  timeout "$EVAL_S" "$PY" benchmarks/tasks.py --task "$task" --checkpoint "$ckpt" \
    --num 1000 --scan-impl "$EVAL_IMPL" --out "$OUT/$name.json" \
    --recipe "stages (len:seconds) $stages; overrides: $*" --stages "$OUT/$name.stages.jsonl" \
    "${EXTRA_EVAL[@]}" >"$OUT/$name.eval.log" 2>&1
  rc_eval=$?
  t2=$(date +%s)
  printf '{"run": "%s", "task": "%s", "train_rc": %d, "train_wall_s": %d, "eval_rc": %d, "eval_wall_s": %d}\n' \
    "$name" "$task" $rc_train $((t1 - t0)) $rc_eval $((t2 - t1)) >"$OUT/$name.status"
}

# Induction Heads scores one token per sequence, so batch 8 gives 8 labels per step.
run induction_heads_s6 induction_heads "256:$IH_S6_S" train.batch_size=8 &
run induction_heads_s6_lr3e-3 induction_heads "256:$IH_VAR_S" train.batch_size=8 \
  train.lr=3e-3 train.min_lr=3e-3 "$LONG_RUN" &
run induction_heads_s6_lr1e-2 induction_heads "256:$IH_VAR_S" train.batch_size=8 \
  train.lr=1e-2 train.min_lr=1e-2 "$LONG_RUN" &
run induction_heads_s6_b64 induction_heads "256:$IH_VAR_S" train.batch_size=64 "$LONG_RUN" &
run induction_heads_s6_b64_lr3e-3 induction_heads "256:$IH_VAR_S" train.batch_size=64 \
  train.lr=3e-3 train.min_lr=3e-3 "$LONG_RUN" &
run induction_heads_s6_b64_lr1e-2 induction_heads "256:$IH_VAR_S" train.batch_size=64 \
  train.lr=1e-2 train.min_lr=1e-2 "$LONG_RUN" &
run induction_heads_s6_then3e-3 induction_heads \
  "256:$IH_S6_S:train.stop_at=20000,256:$IH_VAR_S:train.lr=3e-3 train.min_lr=3e-3" \
  train.batch_size=8 "$LONG_RUN" &
run induction_heads_s6_long induction_heads "256:$((IH_S6_S + IH_VAR_S))" train.batch_size=8 \
  "$LONG_RUN" &
run induction_heads_lti induction_heads "256:$IH_LTI_S" model.selective=false \
  train.batch_size=8 &
run selective_copying_s6 selective_copying "$SC_SHORT_LEN:$SC_SHORT_S,$SC_LONG_LEN:$SC_LONG_S" "$LONG_RUN" &
run selective_copying_s6_lr3e-3 selective_copying "$SC_SHORT_LEN:$SC_SHORT_S,$SC_LONG_LEN:$SC_LONG_S" \
  train.lr=3e-3 train.min_lr=3e-3 "$LONG_RUN" &
run selective_copying_s6_flat selective_copying "$SC_LONG_LEN:$SC_FLAT_S" "$LONG_RUN" &
run selective_copying_lti selective_copying "$SC_SHORT_LEN:$SC_LTI_S,$SC_LONG_LEN:$SC_LTI_S" \
  model.selective=false "$LONG_RUN" &
wait

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
runs = []
for status in sorted(glob.glob(os.path.join(out, "*.status"))):
    with open(status) as f:
        row = json.load(f)
    path = os.path.join(out, row["run"] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)  # benchmarks/record.py's format
        config = record["config"]
        row.update(device=record["device"], commit=record["commit"],
                   scan_impl=config["scan_impl"], selective=config["selective"],
                   train_step=config["train_step"],
                   train_seconds=sum(s.get("train_seconds", 0) for s in config.get("stages", [])),
                   accuracy={r["length"]: r["accuracy"] for r in record["rows"]})
    runs.append(row)
with open(os.path.join(out, "tasks_summary.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in runs)
for row in runs:
    acc = row.get("accuracy", {})
    text = " ".join(f"{k}:{100 * v:.1f}" for k, v in acc.items()) or "no result"
    print(f"{row['run']:30s} steps {row.get('train_step')} train {row.get('train_seconds')} s "
          f"(rc {row['train_rc']}/{row['eval_rc']})  acc% {text}")
EOF
echo "total wall: $(($(date +%s) - START)) s"
