#!/usr/bin/env bash
# The accelerator check: one command, about 4 minutes on one GPU (or NPU).
#
#   bash benchmarks/gpu_check.sh            # with the machine's own python3
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# It runs the checkout in place (PYTHONPATH, no install), so it works with a Python that has torch
# (2.11 or newer) and transformers but no package registry. Pure-Python wheels a machine lacks
# (pytest and its dependencies, for instance) can be put in benchmarks/wheels/: each .whl is put on
# PYTHONPATH as it is. Anything still missing is reported "not run".
#
# 1. the tests marked `gpu`: collectives on the device and over gloo, FSDP2 bf16 mixed precision,
#    SDPA / flash-attn varlen attention and ring attention's fused kernels against the reference,
#    compile with inductor, inference on the device;
# 2. a short bf16 training of a Qwen2.5-VL-3B-shaped random model (3B widths, vision tower included;
#    12 decoder layers and 16 vision blocks so that it fits twice, beside HF's copy) compiled, against
#    HF transformers eager (SDPA, uncompiled) on the same batches: tokens/s, MFU of the vendor's dense
#    bf16 peak, peak device memory.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for wheel in benchmarks/wheels/*.whl; do
    [ -e "$wheel" ] && PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPENSPEED_DEVICE=${OPENSPEED_DEVICE:-cuda}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "## machine"
"$PY" - <<'PYEOF'
import importlib.util, platform
import torch
from openspeed.accelerator import get_accelerator
acc = get_accelerator()
print(f"python {platform.python_version()}, torch {torch.__version__}, device {acc.device_type}: {acc.device_name()}")
for name in ("transformers", "peft", "diffusers", "flash_attn", "av", "pytest", "safetensors"):
    found = importlib.util.find_spec(name) is not None
    print(f"  {name}: {'present' if found else 'missing'}")
import torch
print(f"  bf16 peak used for MFU: {acc.peak_flops(torch.bfloat16) / 1e12:.0f} TFLOP/s ({acc.peak_source(torch.bfloat16)})")
PYEOF
[ $? -eq 0 ] || { echo "error: openspeed does not import with $PY"; exit 1; }

status=0
echo
echo "## tests marked gpu"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gpu_attention.py \
        tests/test_inference_device.py || status=1
else
    echo "not run: pytest is missing (put its wheels, with pluggy, iniconfig and packaging, in benchmarks/wheels/)"
fi

echo
echo "## bf16 training, Qwen2.5-VL-3B shape, compiled, against HF eager"
if "$PY" -c "import transformers" 2>/dev/null; then
    timeout 150 "$PY" -m benchmarks.train_throughput --quick --shape 3b --text-layers 12 --vision-depth 16 \
        --steps 3 || status=1
else
    echo "not run: transformers is missing"
fi
exit $status
