#!/usr/bin/env bash
# One call on a GPU machine: the whole suite on the cuda backend ($SHARDS processes), the tests
# in $SANITIZE under compute-sanitizer, then the benchmarks named in $BENCHES (default: all),
# logs under $OUT (or results/); BENCHES="" runs none. Used for issue closing notes.
set -u
OUT=${OUT:-results}
LOG=$(mktemp -d)  # many logs; only a few files may come back from the device, so they travel as one tarball
mkdir -p "$OUT"
# the tarball is rewritten after every stage: a run cut at the device's time limit still returns
# what finished (files under $OUT come back even then)
pack() { tar -C "$LOG" -czf "$OUT/logs.tmp.tgz" . && mv "$OUT/logs.tmp.tgz" "$OUT/logs.tgz"; }
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the suite in $SHARDS processes side by side (test files dealt by size; each compiles the
  # kernels it runs) plus tests/dialect in a process of its own, or $TESTS in one. (The dialect
  # files dealt among the others lost their conftest's fixtures on the GPU machine's pytest:
  # "fixture 'load' not found" for those collected after a root file.)
  if [ -n "${TESTS:-}" ]; then files=("$TESTS"); else
    mapfile -t all < <(ls -S tests/test_*.py)
    n=${SHARDS:-6}; files=()
    for i in "${!all[@]}"; do files[$((i % n))]+=" ${all[$i]}"; done
    files+=("tests/dialect")
  fi
  for j in "${!files[@]}"; do
    ( PYMETALNN_BACKEND=cuda timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -p no:cacheprovider \
        -o addopts="" ${files[$j]} > "$LOG/tests_cuda_$j.log" 2>&1
      echo "tests shard $j rc=$?: $(tail -1 "$LOG/tests_cuda_$j.log")" ) &
  done
  wait
  grep -h -E "^(FAILED|ERROR)" "$LOG"/tests_cuda_*.log | head -40
  pack
  # $SANITIZE (pytest arguments, e.g. "tests/test_softmax.py -k seq"): those tests under
  # compute-sanitizer memcheck and racecheck, side by side
  if [ -n "${SANITIZE:-}" ]; then
    for tool in memcheck racecheck; do
      ( PYMETALNN_BACKEND=cuda timeout "${TEST_TIMEOUT:-300}" compute-sanitizer --tool $tool \
          --error-exitcode 9 --print-limit 5 python -m pytest -q -p no:cacheprovider -o addopts="" \
          $SANITIZE > "$LOG/sanitize_$tool.log" 2>&1
        echo "sanitize $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitize_$tool.log")" ) &
    done
    wait
    pack
  fi
  # cpu and cuda side by side: bit-identity of exact results (needs both backends selected)
  timeout 200 python -m pytest -q -p no:cacheprovider -o addopts="" tests/dialect/test_cross_backend.py \
    > "$LOG/tests_cross.log" 2>&1
  echo "cross rc=$?"; tail -1 "$LOG/tests_cross.log"
  pack
fi
for b in ${BENCHES-runtime gemm conv neuron pool arith copy dropout softmax loss norm optimizer rnn graph}; do
  timeout "${BENCH_TIMEOUT:-150}" python "benchmarks/bench_$b.py" --backend cuda > "$LOG/bench_$b.log" 2>&1
  echo "bench_$b rc=$?"
  pack
done
pack
