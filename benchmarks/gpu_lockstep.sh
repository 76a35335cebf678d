#!/usr/bin/env bash
# The lockstep M2N's GPU runs (issues 10 and 11). GPUS=1 (`nvidia-h200`: ipc between two processes on the one GPU,
# under CUDA MPS) or GPUS=2 (`nvidia-h200-x2`: nccl, one GPU per node). PARTS picks among
#   tests  - tests/gpu (the lockstep tests among them: float32 exactness, no host sync per step, a dead expert node)
#   exact  - benchmarks/gpu_exactness.py through the launcher over each of EXACT (default: ucx, then on 2 GPUs
#            nccl and ipc): float32 greedy tokens against transformers, attention and expert nodes on different GPUs;
#            MAX_BATCH_TOKENS=8: the longer prompts prefill in chunks
#   bench  - `bench transport`: the lockstep M2N round over ipc, ipc with the SM send kernel (ipc-sm) and ucx (and,
#            on 2 GPUs, nccl; with point-to-point rows over each, beside NCCL's send/recv and all_to_all_single)
#   serve  - served decode, Qwen3-30B-A3B / Mixtral-8x7B shapes with layers reduced (SHAPES): disaggregated 1+1 at
#            m = MICROBATCHES over each of TRANSPORTS, and colocated (--expert-nodes 0) on every GPU (data parallel on 2),
#            same workload (REQUESTS_PER_SLOT x concurrency requests, default 8: 4 gave rows of 1.9-4.6 s on 2 x H200,
#            mostly ramp-up and tail, too short to calibrate the planner from); each colocated node has a quarter
#            more batch slots than its even share (with exactly c / GPUS, one request routed off even made a
#            one-wave run take two waves on that node: RESULTS.md, eighth session);
#            each node's GPU busy fraction, timed on the GPU around its compute; TRACE=1: each node's host phases
#            as a Chrome trace beside the JSON (where a step's host time goes), with a GPU row per node over ipc
#            (each whole-step graph's last replay), which gpu_timeline.py reads: waits per layer, crossings
#            async scheduling is the default on GPUs; ASYNC=0 turns it off (--no-async-scheduling; JSON and logs
#            named *_sync), ASYNC=1 names it (*_async); GATEWAY_WORKERS=N:
#            N gateway processes (one streams ~20k tok/s at most: `expertmesh bench gateway`);
#            CLIENT_PROCESSES=N: bench serve's client in N processes (one tops out near 45-55k tok/s);
#            INPUT_LEN / OUTPUT_LEN ("lo hi", default "64 128") and MAX_POS (the random model's positions, default
#            1024): long contexts, where the planner predicts ping-pong pays (RESULTS.md, seventh session);
#            MICROBATCHES="1 1 1": the same row three times, each on a fresh cluster (plan_validation.row_of
#            "m=1" takes their median; one configuration varied by up to 29% between runs on one H200);
#            MAX_WAITING_STEPS=N: new prompts wait up to N steps to join the decoding ones (--max-waiting-steps; JSON
#            named *_wN): fewer steps that prefill beside decodes, which run eagerly (RESULTS.md, eighth session);
#            PREFILL_GRAPH_TOKENS=N: steps with prompts replay CUDA graphs up to N tokens (--prefill-graph-tokens,
#            default: every step; 0: they run eagerly, as before the ninth session; JSON named *_gN);
#            PROFILE=1: py-spy (.whl/py-spy, carried beside the site tarball: benchmarks/gpu_wheels.sh) samples every
#            node process of the serve part for its whole life; each sweep's profiles go into one tarball, and
#            pyspy_summary.py prints where each attention node's host time went while it served;
#            SM_SHARES="A E" (GPUS=1, under MPS): the attention node gets A% of the SMs and the expert node E%
#            (one GPU standing in for two types, issue 14), with `bench layer` of the shape under each share first
#            (layer_<shape>_sm<P>.json: the planner's calibration of that "type")
#   diagnose - TESTS until they end or hang, then the stacks of the test and of every node process left
#   each     - every test of TESTS in a pytest of its own, EACH_S seconds at most: a hang or a failure costs one test,
#              and each failure's traceback is printed as it happens (a whole-suite run killed at TESTS_S prints none)
# The device tool brings back at most 8 files from $OUT (no deeper than 2 folders): a call that runs several parts
# should give each its own OUT folder and end with `rm -f $OUT/*/*.log $OUT/*/topo.txt`, keeping the JSON.
# PYTEST_ADDOPTS=-s shows the node processes' output live (a node that dies while the test blocks in C, e.g. in
# NCCL, otherwise leaves nothing on screen). Logs and JSON in $OUT. Needs .whl/site312.txz (benchmarks/gpu_wheels.sh) carried,
# and models/ in the tree it runs in (the bf16 agreement test reads models/expertmesh-mini's tokenizer).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvidia-smi topo -m > "$OUT/topo.txt"; head -4 "$OUT/topo.txt"
GPUS=${GPUS:-1}
# disaggregated runs over each of TRANSPORTS (2 GPUs: ipc over NVLink, whole steps as graphs, then nccl, whose
# rounds run eagerly and so have their GPU busy time metered); 1 GPU: ipc under MPS. ipc-sm: ipc with the SM send kernel
TRANSPORTS=${TRANSPORTS:-$([ "$GPUS" = 1 ] && echo ipc || echo "ipc nccl")}
[ "${DISAGG:-1}" = 1 ] || TRANSPORTS=""  # DISAGG=0: the serve part's colocated rows alone
[ "$GPUS" = 1 ] && nvidia-cuda-mps-control -d && echo "MPS on"
# Output goes to files, never through a pipe: a node process left behind by a timed-out command would hold a pipe
# open, and the script with it, to the end of the device call. Leftover nodes are killed after every command.
reap() { pkill -9 -f "m expertmesh[.](attention_node|expert_node|gateway) --config" 2>/dev/null; true; }
# PROFILE=1: a py-spy recorder on each node process as it appears, until the process ends (folded stacks in $1)
profile() {
  mkdir -p "$1"
  while sleep 0.2; do
    for pid in $(pgrep -f "m expertmesh[.](attention_node|expert_node) --config"); do
      [ -e "$1/.$pid" ] && continue
      touch "$1/.$pid"
      role=$(tr '\0' ' ' < /proc/$pid/cmdline | grep -oE "attention_node|expert_node")
      .whl/py-spy record -p $pid -r ${PROFILE_HZ:-100} -f raw -o "$1/${role}_$pid.folded" --nonblocking \
        > "$1/${role}_$pid.log" 2>&1 &
    done
  done
}
quiet() { grep -vE "frame #|TCPStore|Exception raised from|should dump|^\s*$" "$@"; }
for part in ${PARTS:-tests bench serve}; do
  case $part in
  tests)  # -v: a line per test as it ends, so a run that TESTS_S cuts short still says which passed and failed
    timeout -k 10 ${TESTS_S:-300} python3 -m pytest -v -rf -p no:cacheprovider --timeout ${TEST_TIMEOUT_S:-150} \
      ${TESTS:-tests/gpu} > "$OUT/gpu_tests.log" 2>&1
    [ $? = 124 ] && echo "cut short at TESTS_S=${TESTS_S:-300} s; the tests that ended:"; reap
    grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu_tests.log" | sed -E 's/ +\[ *[0-9]+%\]$//' | grep -v SKIPPED
    quiet "$OUT/gpu_tests.log" | grep -vE " (PASSED|FAILED|ERROR|SKIPPED)" | tail -${TESTS_TAIL:-25} ;;
  diagnose)  # TESTS, for a hang: pytest-timeout prints the test process's stacks at TEST_TIMEOUT_S and exits; then
             # every node process left prints its Python stack (faulthandler, on SIGABRT)
    PYTHONFAULTHANDLER=1 NCCL_DEBUG=WARN timeout -k 10 ${TESTS_S:-150} python3 -m pytest -x -s -q -p no:cacheprovider \
      --timeout ${TEST_TIMEOUT_S:-75} ${TESTS} > "$OUT/diagnose.log" 2>&1 &
    while kill -0 $! 2>/dev/null; do sleep 1; done
    pkill -ABRT -f "m expertmesh[.](attention_node|expert_node|gateway) --config"; sleep 2; reap
    quiet "$OUT/diagnose.log" | grep -v "Loading weights" | tail -${TESTS_TAIL:-80} ;;
  each)
    n=0
    for t in ${TESTS}; do
      n=$((n + 1))
      # the thread method: a test blocked in C (an NCCL wait, a device sync) still prints every thread's stack
      PYTHONFAULTHANDLER=1 timeout -k 10 ${EACH_S:-120} python3 -m pytest -q -p no:cacheprovider --tb=short \
        --timeout $((${EACH_S:-120} - 15)) --timeout-method=thread "$t" > "$OUT/each_$n.log" 2>&1
      rc=$?; reap
      echo "== $n rc=$rc $t"
      [ $rc = 0 ] || quiet "$OUT/each_$n.log" | grep -v "Loading weights" | tail -${TESTS_TAIL:-25}
    done ;;
  exact)
    timeout -k 10 ${EXACT_S:-240} python3 benchmarks/gpu_exactness.py \
      --transports ${EXACT:-$([ "$GPUS" = 1 ] && echo ucx || echo ucx,nccl,ipc)} \
      ${MAX_BATCH_TOKENS:+--max-batch-tokens $MAX_BATCH_TOKENS} > "$OUT/exactness.log" 2>&1; reap
    grep -E "DIFFERENT|identical$|MISMATCH|Error|Traceback" "$OUT/exactness.log" | sort | uniq -c | tail -20 ;;
  bench)
    BACKENDS=${BACKENDS:-lockstep-ipc,lockstep-ipc-sm$([ "$GPUS" = 2 ] && echo ,lockstep-nccl),ucx}
    timeout -k 10 ${BENCH_S:-200} python3 -m expertmesh bench transport --device cuda --backends $BACKENDS \
      $([ "$GPUS" = 2 ] && echo --nccl) --m2n 1x1 --json "$OUT/bench_transport.json" > "$OUT/bench_transport.log" 2>&1
    reap; tail -60 "$OUT/bench_transport.log" ;;
  serve)
    for shape in ${SHAPES:-qwen3}; do
      if [ $shape = mixtral ]; then
        ARGS="--hidden-size 4096 --num-layers ${LAYERS:-4} --num-heads 32 --num-kv-heads 8 --head-dim 128
              --intermediate-size 14336 --num-experts 8 --top-k 2 --vocab-size 32000"
      else
        ARGS="--arch qwen3_moe --hidden-size 2048 --num-layers ${LAYERS:-8} --num-heads 32 --num-kv-heads 4
              --head-dim 128 --intermediate-size 768 --dense-intermediate-size 6144 --num-experts 128 --top-k 8
              --vocab-size 151936"
      fi
      model=/tmp/$shape${MAX_POS:+_p$MAX_POS}
      [ -e $model/config.json ] || python3 -m expertmesh make-model --out $model --dtype bfloat16 $ARGS \
        --max-position-embeddings ${MAX_POS:-1024} >/dev/null
      shares=${SM_SHARES:+--sm-percent $SM_SHARES}
      for share in ${SM_SHARES:-}; do
        CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$share timeout -k 10 ${LAYER_S:-150} python3 -m expertmesh bench layer \
          --shapes $model --tokens 1,16,64,256 --contexts 512 --prefill-tokens 1024,4096 \
          --json "$OUT/layer_${shape}_sm$share.json" > "$OUT/layer_${shape}_sm$share.log" 2>&1
        tail -${LAYER_TAIL:-6} "$OUT/layer_${shape}_sm$share.log" | sed "s/^/$shape at $share% of the SMs: /"
      done
      for c in ${CONCURRENCY:-64}; do
        async=$(case "${ASYNC:-}" in 1) echo _async;; 0) echo _sync;; esac)
        waits=${MAX_WAITING_STEPS:+_w$MAX_WAITING_STEPS}${PREFILL_GRAPH_TOKENS:+_g$PREFILL_GRAPH_TOKENS}
        common="--model $model --device cuda --dtype bfloat16 --concurrency $c
                $(case "${ASYNC:-}" in 1) echo --async-scheduling;; 0) echo --no-async-scheduling;; esac)
                --gateway-workers ${GATEWAY_WORKERS:-1} ${CLIENT_PROCESSES:+--client-processes $CLIENT_PROCESSES}
                --num-requests $((${REQUESTS_PER_SLOT:-8} * c))
                --max-num-seqs $c --input-len ${INPUT_LEN:-64 128} --output-len ${OUTPUT_LEN:-64 128}
                --max-waiting-steps ${MAX_WAITING_STEPS:-0}
                ${PREFILL_GRAPH_TOKENS:+--prefill-graph-tokens $PREFILL_GRAPH_TOKENS}"
        for transport in $TRANSPORTS; do
          name=serve_${shape}${MAX_POS:+_p$MAX_POS}_c${c}_disagg_${transport}$async$waits
          [ "${PROFILE:-0}" = 1 ] && { profile /tmp/prof_$name & profiler=$!; }
          timeout -k 10 ${SWEEP_S:-240} python3 benchmarks/microbatch_sweep.py $common --transport ${transport%-sm} \
            $([ "${transport%-sm}" != "$transport" ] && echo --ipc-copy sm) \
            --expert-nodes 1 --microbatches ${MICROBATCHES:-1 2} $shares --json "$OUT/$name${SM_SHARES:+_sm${SM_SHARES// /_}}.json" \
            $([ "${TRACE:-0}" = 1 ] && echo --trace "$OUT/$name.trace.json") > "$OUT/$name.log" 2>&1
          reap; grep -E "^m=|Error|error|Traceback" "$OUT/$name.log" | sed "s/^/$shape c=$c disagg 1+1 $transport /" \
            | head -20
          for trace in "$OUT/$name".trace*.json; do  # TRACE=1: where each step's device time went (ipc: GPU rows)
            [ -e "$trace" ] && python3 benchmarks/gpu_timeline.py "$trace" | sed "s|^|$(basename $trace): |" \
              && mv "$trace" "${trace//=/}"  # the device tool brings back no file named with "=" (trace.m=1.json)
          done
          if [ "${PROFILE:-0}" = 1 ]; then  # the recorders write their files once their processes have ended
            kill $profiler; sleep 2; tar czf "$OUT/$name.profiles.tgz" -C /tmp/prof_$name .
            python3 benchmarks/pyspy_summary.py --top ${PROFILE_TOP:-30} /tmp/prof_$name/attention_node_*.folded
          fi
        done
        name=serve_${shape}${MAX_POS:+_p$MAX_POS}_c${c}_colocated$async$waits
        [ "${COLOCATED:-1}" = 1 ] && timeout -k 10 ${COLOCATED_S:-${SWEEP_S:-240}} python3 benchmarks/microbatch_sweep.py $common --expert-nodes 0 \
          --attention-nodes $GPUS --max-num-seqs $((c / GPUS + c / GPUS / 4)) --microbatches 1 --json "$OUT/$name.json" \
          > "$OUT/$name.log" 2>&1
        reap; grep -E "^m=|Error|error|Traceback" "$OUT/$name.log" | sed "s/^/$shape c=$c colocated on $GPUS GPUs /" \
          | head -20
      done
    done ;;
  esac
done
[ "$GPUS" = 1 ] && echo quit | nvidia-cuda-mps-control
exit 0
