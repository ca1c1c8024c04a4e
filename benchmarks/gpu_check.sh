#!/usr/bin/env bash
# The real-GPU check (docs/gpu.md), at most 8 minutes on one GPU:
#   1. the test suite's device cases with SPECTRAL_PEFT_DEVICE=gpu (pytest -k gpu; 300 s at most);
#   2. every CuPy kernel bit for bit against its NumPy twin (benchmarks/gpu_kernels.py; 60 s);
#   3. the LoRA step against torch + PEFT on CUDA (benchmarks/gpu_step.py; 120 s);
# then ONE JSON summary, written to $1 (default gpu_check.json) and printed.
#
# Usage: benchmarks/gpu_check.sh [OUT.json]
#   GPU_CHECK_DEVICE=gpu-emulated GPU_CHECK_TORCH_DEVICE=cpu  run the same parts without a GPU
#   GPU_CHECK_PARTS=suite,kernels,step                        the parts to run (default: all three)
#   GPU_CHECK_STEP_REPEATS=N                                  timed steps per side (default 20)
# Exit status: 0 when every part that ran passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.." || exit 1
out="${1:-gpu_check.json}"
device="${GPU_CHECK_DEVICE:-gpu}"
torch_device="${GPU_CHECK_TORCH_DEVICE:-cuda}"
parts=",${GPU_CHECK_PARTS:-suite,kernels,step},"
logdir="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

part() {  # part NAME SECONDS COMMAND...: run it under a time limit; its status in $logdir/NAME.rc
    local name="$1" limit="$2"
    shift 2
    if [[ "$parts" != *",$name,"* ]]; then
        echo skipped > "$logdir/$name.rc"
        return
    fi
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$logdir/$name.out" 2> "$logdir/$name.err"
    echo $? > "$logdir/$name.rc"
    echo $(( $(date +%s) - t0 )) > "$logdir/$name.s"
    echo "gpu_check: $name exited $(cat "$logdir/$name.rc") after $(cat "$logdir/$name.s") s" >&2
}

part suite 300 env SPECTRAL_PEFT_DEVICE="$device" python -m pytest -q -p no:cacheprovider -k gpu tests
part kernels 60 python benchmarks/gpu_kernels.py --device "$device"
part step 120 python benchmarks/gpu_step.py --device "$device" --torch-device "$torch_device" \
    --repeats "${GPU_CHECK_STEP_REPEATS:-20}"

python - "$logdir" "$out" "$device" "$(( $(date +%s) - start ))" <<'PY'
import json, os, re, sys
logdir, out, device, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
summary = {"check": "gpu_check", "device": device, "seconds": seconds, "parts": {}}
for name in ("suite", "kernels", "step"):
    rc = open(os.path.join(logdir, f"{name}.rc")).read().strip()
    part = {"status": "skipped" if rc == "skipped" else ("passed" if rc == "0" else f"failed (exit {rc})")}
    if rc != "skipped":
        part["seconds"] = int(open(os.path.join(logdir, f"{name}.s")).read())
        text = open(os.path.join(logdir, f"{name}.out")).read().strip().splitlines()
        last = text[-1] if text else ""
        if name == "suite":
            part["summary"] = last
            part.update({k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)})
        else:
            try:
                part["result"] = json.loads(last)
            except ValueError:
                part["result"] = None
                part["stderr_tail"] = open(os.path.join(logdir, f"{name}.err")).read()[-2000:]
    summary["parts"][name] = part
summary["ok"] = all(p["status"] in ("passed", "skipped") for p in summary["parts"].values())
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
PY
