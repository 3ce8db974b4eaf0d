#!/usr/bin/env bash
# Parity suite + benchmarks on the GPU machine (no cargo/network there). Carry `.gl`
# (Vulkan loader .debs), `.whl` (the abi3 wheel from `maturin build --release -o .whl`) and
# `.fixtures` (a copy of ../shared/fixtures/official); results go to $OUT.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site AUTOGAZE_FIXTURES=$PWD/.fixtures PYTHONUNBUFFERED=1
python3 -c "import autogaze_wgpu._native as n; n.wgpu_adapter_info()" 2>/dev/null ||
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import autogaze_wgpu._native as n; print(n.wgpu_adapter_info())" | tee -a "$OUT/device.txt"
case "${1:-all}" in
  all|test)
    AUTOGAZE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider \
      tests/test_official_fixtures.py tests/test_api.py tests/test_generation_rules.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25 ;;
esac
case "${1:-all}" in
  all|bench)
    timeout 280 python3 -m autogaze_wgpu.bench --model "$AUTOGAZE_FIXTURES/model" --repeat "${REPEAT:-5}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
esac
