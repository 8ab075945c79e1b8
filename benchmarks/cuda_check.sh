#!/usr/bin/env bash
# The GPU checks of issue 17, in one run of under 8 minutes on one GPU (an H200: ~4).
#
#   bash benchmarks/cuda_check.sh            # from the repository root, on a machine with CUDA
#   PYTHON=/path/to/python bash benchmarks/cuda_check.sh
#   OUT=/some/dir bash benchmarks/cuda_check.sh   # logs and the JSON summary go there (default: runs/cuda_check)
#
# 1. The CUDA tests (tests/test_devices.py: training in bf16 at the quickstart's size, 20 tiny
#    steps fp32 vs the CPU, eval and generate, a CUDA checkpoint on the CPU, resume across
#    devices, EWC/distillation/replay, float64 streaming validation; tests/model/test_cuda.py:
#    the dispatch kernels and the tiny model against float64 / CPU references).  Every one of
#    them must run: a skip here means the GPU was not seen, and the script fails.
# 2. benchmarks/moe_dispatch.py --device cuda --dtype bfloat16, few repeats (timings of a first
#    look, not a record: every ratio is against the dense FFN measured in the same process).
# Then one summary: the tests' counts, the benchmark's ratios, and a last JSON line.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/cuda_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" - <<'EOF' || { echo "cuda_check: no usable CUDA device; nothing was checked"; exit 2; }
import torch, sys
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
from lite_llm.runtime.device import bf16_support, describe_device, resolve_device
d = resolve_device("auto")
print(f"device: {describe_device(d)}; {bf16_support(d).how}; cpu: {bf16_support('cpu').how}")
EOF

start=$(date +%s)
echo "== 1/2 CUDA tests"
timeout 330 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_devices.py tests/model/test_cuda.py \
    --junitxml="$OUT_DIR/cuda_tests.xml" 2>&1 | tee "$OUT_DIR/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
tests_s=$(( $(date +%s) - start ))

echo "== 2/2 moe_dispatch.py --device cuda --dtype bfloat16 (quick)"
start=$(date +%s)
timeout 150 "$PY" benchmarks/moe_dispatch.py --device cuda --dtype bfloat16 --quick --repeats 3 --warmup 2 \
    --decode-repeats 10 --no-thp 2>&1 | tee "$OUT_DIR/moe_dispatch_cuda_bf16.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$(( $(date +%s) - start ))

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$tests_s" "$bench_s" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, tests_s, bench_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
summary = {"tests_rc": tests_rc, "bench_rc": bench_rc, "tests_s": tests_s, "bench_s": bench_s}
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary["tests"] = counts
    summary["not_passed"] = [
        f"{case.get('classname')}::{case.get('name')}: {child.tag}"
        for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error", "skipped")
    ]
except (OSError, ET.ParseError, AttributeError) as exc:
    summary["tests"] = f"no junit report ({exc})"
lines = (out / "moe_dispatch_cuda_bf16.log").read_text(errors="replace").splitlines() if (out / "moe_dispatch_cuda_bf16.log").exists() else []
last = next((l for l in reversed(lines) if l.startswith("{")), None)
try:
    summary["moe_dispatch"] = json.loads(last) if last else "no JSON line"
except json.JSONDecodeError:
    summary["moe_dispatch"] = "unreadable JSON line"
ok = tests_rc == 0 and bench_rc == 0 and isinstance(summary["tests"], dict) and summary["tests"]["skipped"] == 0
summary["ok"] = ok
print("\n== summary")
if isinstance(summary["tests"], dict):
    t = summary["tests"]
    print(f"CUDA tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped ({tests_s} s)")
for line in summary.get("not_passed", []):
    print("  not passed:", line)
print(f"moe_dispatch (cuda, bf16): exit {bench_rc} in {bench_s} s; figures in {out / 'moe_dispatch_cuda_bf16.log'}")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
sys.exit(0 if ok else 1)
EOF
