#!/usr/bin/env bash
# Parity suite + benchmarks on the GPU machine (no cargo/network there). Carry `.gl`
# (Vulkan loader .debs), `.whl` (the abi3 wheel from `maturin build --release -o .whl`; the
# GPU image has Pillow, numpy, torch and Triton) and `.fixtures` (a copy of
# ../shared/fixtures/official); results go to $OUT.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
# The wheel brings the native module; the Python sources are the working tree's (so a
# Python-only change needs no new wheel).
cp /tmp/site/autogaze_wgpu/_native*.so python/autogaze_wgpu/ || exit 1
export PYTHONPATH=$PWD/python:/tmp/site AUTOGAZE_FIXTURES=$PWD/.fixtures PYTHONUNBUFFERED=1
# Triton's compiled kernels stay in the (git-ignored) checkout: a warm machine reuses them.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
python3 -c "import autogaze_wgpu._native as n; n.wgpu_adapter_info()" 2>/dev/null ||
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import autogaze_wgpu._native as n; print(n.wgpu_adapter_info())" 2>/dev/null | tee -a "$OUT/device.txt" ||
  # no adapter: what the Vulkan loader says (2026-12-05's hosts: the ICD found, then
  # "Could not get 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'")
  VK_LOADER_DEBUG=error,warn python3 -c "import autogaze_wgpu._native as n; n.wgpu_adapter_info()" > "$OUT/vulkan-loader.txt" 2>&1
case "${1:-all}" in
  all|test)
    AUTOGAZE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_official_fixtures.py tests/test_api.py tests/test_generation_rules.py \
      tests/test_torch_backend.py tests/test_torch_fused_decode.py tests/test_stream_horizon.py tests/test_processor.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25 ;;
esac
case "${1:-all}" in
  all|bench)
    timeout "${BENCH_TIMEOUT:-280}" python3 -m autogaze_wgpu.bench --model "$AUTOGAZE_FIXTURES/model" --repeat "${REPEAT:-5}" \
      --backends "${BACKENDS:-reference,torch,torch-eager,wgpu}" --workloads "${WORKLOADS:-clip,no-stop,clip788,tiles45,stream,score,video1080}" \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
esac
case "${1:-all}" in
  tune)  # launch configurations of the fused decoder kernels (scripts/tune_triton_decode.py)
    timeout "${TUNE_TIMEOUT:-250}" python3 scripts/tune_triton_decode.py --model "$AUTOGAZE_FIXTURES/model" \
      --block-n "${BLOCK_N:-16,32}" --batch "${BATCH:-1,45}" --attn "${ATTN:-2x64}" --warps "${WARPS:-4}" \
      --prefill-attn "${PREFILL_ATTN:-4}" --prefill-q "${PREFILL_Q:-32}" ${TUNE_SET:-} \
      2>&1 | tee -a "$OUT/tune.log" ;;
esac
case "${1:-all}" in
  ab)  # the torch backend's settings against each other, alternating (scripts/ab_torch.py);
    # by default the defaults (status ring and PDL off), each of them on, and both
    AB_VARIANTS=${AB_VARIANTS:---variant base: --variant overlap:TorchBackend.OVERLAP_STATUS_READS=True,TorchBackend.STEPS_PER_SYNC=2 --variant pdl:FusedDecoder.PDL=True --variant overlap+pdl:TorchBackend.OVERLAP_STATUS_READS=True,TorchBackend.STEPS_PER_SYNC=2,FusedDecoder.PDL=True}
    timeout "${AB_TIMEOUT:-400}" python3 scripts/ab_torch.py --model "$AUTOGAZE_FIXTURES/model" \
      --workloads "${WORKLOADS:-clip788,clip,tiles45,tiles788,stream}" --rounds "${ROUNDS:-5}" $AB_VARIANTS \
      --json "$OUT/ab.json" 2>&1 | tee "$OUT/ab.log" ;;
esac
case "${1:-all}" in
  agreement)  # the torch backend's fast modes against its float32 mode (docs/benchmarks.md)
    timeout 500 python3 scripts/fast_mode_agreement.py --device cuda --model "$AUTOGAZE_FIXTURES/model" \
      --repeat "${REPEAT:-5}" --json "$OUT/fast_modes.json" 2>&1 | tee "$OUT/fast_modes.log" ;;
esac
case "${1:-all}" in
  profile)  # GPU time per kernel from timestamp queries (docs/benchmarks.md)
    for wl in clip tiles45; do
      timeout 200 python3 scripts/profile_wgpu.py --model "$AUTOGAZE_FIXTURES/model" --workload $wl \
        --json "$OUT/profile_$wl.json" 2>&1 | tee "$OUT/profile_$wl.log"
    done ;;
esac
case "${1:-all}" in
  profile-torch)  # kernel time and launch counts of the torch backend (docs/benchmarks.md)
    for wl in ${PROFILE_WORKLOADS:-clip tiles45}; do
      timeout 200 python3 scripts/profile_torch.py --model "$AUTOGAZE_FIXTURES/model" --workload $wl --sweep-steps "${SWEEP-4,8,16}" \
        --json "$OUT/profile_torch_$wl.json" 2>&1 | tee "$OUT/profile_torch_$wl.log"
    done ;;
esac
case "${1:-all}" in
  divergence)  # where a workload's tokens part between backends/devices, and by how much
    timeout "${DIVERGENCE_TIMEOUT:-550}" python3 scripts/divergence.py --model "$AUTOGAZE_FIXTURES/model" --workload "${WORKLOAD:-tiles45}" \
      --runs "${RUNS:-reference:cuda,reference:cpu,torch:cuda,wgpu}" 2>&1 | tee -a "$OUT/divergence.log" ;;
esac
case "${1:-all}" in
  soak)  # long streams: memory and per-frame latency (docs/reliability.md)
    M="$AUTOGAZE_FIXTURES/model"; N=${SOAK_FRAMES:-3000}
    timeout 150 python3 scripts/soak_stream.py --model "$M" --backend wgpu --frames $N --json "$OUT/soak_wgpu.json" 2>&1 | tee "$OUT/soak_wgpu.log"
    timeout 60 python3 scripts/soak_stream.py --model "$M" --backend wgpu --frames 400 --horizon none --window 50 --json "$OUT/soak_wgpu_unbounded.json" 2>&1 | tee "$OUT/soak_wgpu_unbounded.log"
    timeout 200 python3 scripts/soak_stream.py --model "$M" --backend torch --device cuda --frames $N --json "$OUT/soak_torch.json" 2>&1 | tee "$OUT/soak_torch.log"
    timeout 150 python3 scripts/soak_stream.py --model "$M" --backend reference --device cuda --frames $((N / 3)) --window 250 --json "$OUT/soak_reference.json" 2>&1 | tee "$OUT/soak_reference.log" ;;
esac
