"""Every kernel in `shaders/` on an independent WebGPU runtime (wgpu-py), against torch.

The WGSL is exactly what the engine compiles: `_native.shader_source(name, defines)` runs the
engine's own preprocessor with the defines the Rust launchers use (`rust/gpu/ops/*.rs`). Each
kernel is launched as its launcher does (bind group layout derived from the WGSL the way
`rust/gpu/pipeline.rs::parse_bindings` does it, the parameter block at a dynamic offset, the
same workgroup counts) on a device with WebGPU's default limits, over a sweep of sizes
including ones not divisible by 4, and compared with the equivalent torch op (float64; for
the bicubic resize also the float32 op the reference runs; for the selection step the
reference's `select_step`).

This also proves the shaders valid for a second WebGPU implementation (wgpu-native through
wgpu-py, not the engine's `wgpu` crate build). Like the Rust kernel tests it needs an adapter
(lavapipe is enough) and fails, not skips, without one.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import wgpu
except ImportError as e:  # a test dependency (pyproject `test` extra, `make venv`)
    pytest.fail(f"wgpu-py is needed for the shader tests (pip install 'wgpu'): {e}", pytrace=False)

from autogaze_wgpu import _native

PARAMS_BLOCK = 256  # bytes reserved per parameter block (rust/gpu/buffer.rs)

# WebGPU's default limits for compute (the spec's "Limits" table): what a browser device has
# unless more is requested. wgpu-py otherwise hands out the adapter's limits (lavapipe: 32 KiB
# of workgroup memory, 1024 invocations), which would hide a kernel that only fits there.
WEBGPU_DEFAULT_LIMITS = {
    "max-compute-workgroup-storage-size": 16384,
    "max-compute-invocations-per-workgroup": 256,
    "max-compute-workgroup-size-x": 256,
    "max-compute-workgroup-size-y": 256,
    "max-compute-workgroup-size-z": 64,
    "max-compute-workgroups-per-dimension": 65535,
    "max-storage-buffers-per-shader-stage": 8,
    "max-uniform-buffers-per-shader-stage": 12,
    "max-dynamic-uniform-buffers-per-pipeline-layout": 8,
    "max-storage-buffer-binding-size": 134217728,
    "max-uniform-buffer-binding-size": 65536,
    "max-buffer-size": 268435456,
    "max-bind-groups": 4,
    "max-bindings-per-bind-group": 1000,
    "min-uniform-buffer-offset-alignment": 256,
    "min-storage-buffer-offset-alignment": 256,
}

# Generation state layout (shaders/common.wgsl).
S_BASE, S_FIRST, S_COUNT, S_DONE = 2, 3, 4, 6
S_HDR, ROW_WORDS, R_FIN, R_TOK = 16, 288, 0, 12

# MatmulSpec::key / Tile::dims / Tile::depth: (TM, TN, RM, RN, TK).
TILES = {"large": (64, 64, 4, 4, 16), "small": (16, 32, 4, 2, 64)}
# (tile, entry): Large and Small run `main`; Tile::Gemv runs `gemv` with Small's defines;
# CPU devices run `direct` (any tile's defines: it uses none of them).
MATMUL_ENTRIES = [("large", "main"), ("small", "main"), ("small", "gemv"), ("small", "direct")]
ENTRY_IDS = ["large-main", "small-main", "gemv", "direct"]
# DIRECT_BLOCK (DM, DN) and DIRECT_WORKGROUP of rust/gpu/ops/matmul.rs.
DIRECT = (8, 4, 16)

SIZES_M = (1, 10, 13, 37)
SIZES_N = (6, 33, 192)
SIZES_K = (29, 131, 192)


# ---------------------------------------------------------------------------------------------
# A minimal WebGPU launcher (the Python twin of rust/gpu/{pipeline,buffer}.rs)
# ---------------------------------------------------------------------------------------------


def parse_bindings(src: str) -> list[tuple[int, str]]:
    """`@group(0) @binding(n) var<...>` lines -> [(n, "params" | "read" | "read_write")]."""
    out = []
    for line in src.splitlines():
        t = line.strip()
        if t.startswith("//") or "@binding(" not in t:
            continue
        n = int(t.split("@binding(", 1)[1].split(")", 1)[0])
        if "var<uniform>" in t:
            kind = "params"
        elif "var<storage, read_write>" in t:
            kind = "read_write"
        elif "var<storage, read>" in t or "var<storage>" in t:
            kind = "read"
        else:
            raise AssertionError(f"unsupported binding `{t}`")
        out.append((n, kind))
    return sorted(out)


def parse_params(src: str) -> list[tuple[str, str]]:
    """Fields of `struct Params` in declaration order, as (name, struct format char)."""
    m = re.search(r"struct Params\s*\{(.*?)\}", src, re.DOTALL)
    assert m, "no `struct Params` in the shader"
    fields = []
    for line in m.group(1).splitlines():
        line = line.split("//", 1)[0].strip().rstrip(",")
        if line:
            name, ty = (s.strip() for s in line.split(":"))
            fields.append((name, {"u32": "I", "i32": "i", "f32": "f"}[ty]))
    return fields


def _const_eval(expr: str, consts: dict[str, int]) -> int:
    """A u32 constant expression of the shaders (`TK * TM`, `max(KT / QT, 1u)`, ...)."""
    py = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[ui]\b", r"\1", expr).replace("/", "//")
    return int(eval(py, {"__builtins__": {}, "max": max, "min": min}, dict(consts)))


def _type_size(ty: str, consts: dict[str, int]) -> int:
    ty = ty.strip()
    if ty in ("f32", "u32", "i32", "atomic<u32>", "atomic<i32>"):
        return 4
    if ty == "vec4<f32>":
        return 16
    if ty == "vec2<f32>":
        return 8
    m = re.fullmatch(r"array<\s*(vec4<f32>|vec2<f32>|f32|u32|i32)\s*,\s*(.+)>", ty)
    assert m, f"workgroup type `{ty}` not understood"
    return _type_size(m.group(1), consts) * _const_eval(m.group(2), consts)


def workgroup_bytes(src: str, entry: str) -> int:
    """Workgroup memory of `entry` as WebGPU counts it against
    maxComputeWorkgroupStorageSize: roundUp(16, size) of every `var<workgroup>` statically
    used by the entry point or a function it calls. (wgpu-native does not check this limit,
    browsers do.)"""
    code = re.sub(r"//[^\n]*", "", src)
    consts: dict[str, int] = {}
    for name, expr in re.findall(r"\bconst\s+(\w+)\s*(?::\s*u32)?\s*=\s*([^;]+);", code):
        consts[name] = _const_eval(expr, consts)  # (f32 constants don't match the pattern)
    bodies: dict[str, str] = {}
    for m in re.finditer(r"\bfn\s+(\w+)\s*\(", code):
        i = j = code.index("{", m.end())
        depth = 0
        while True:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            if depth == 0:
                break
            j += 1
        bodies[m.group(1)] = code[i : j + 1]
    seen, todo = set(), [entry]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += [c for c in re.findall(r"\b(\w+)\s*\(", bodies[f]) if c in bodies]
    used = "".join(bodies[f] for f in seen)
    total = 0
    for name, ty in re.findall(r"var<workgroup>\s+(\w+)\s*:\s*([^;]+);", code):
        if re.search(rf"\b{name}\b", used):
            total += -(-_type_size(ty, consts) // 16) * 16
    return total


@dataclass
class Kernel:
    name: str
    entry: str
    src: str
    bindings: list[tuple[int, str]]
    params: list[tuple[str, str]]
    layout: object
    pipeline: object

    def pack(self, **values) -> bytes:
        """The parameter block: every field of `Params` in order, 0 unless given."""
        unknown = set(values) - {n for n, _ in self.params}
        assert not unknown, f"{self.name}: no Params fields {sorted(unknown)}"
        fmt = "<" + "".join(f for _, f in self.params)
        return struct.pack(fmt, *(values.get(n, 0) for n, _ in self.params))


class WebGpu:
    def __init__(self) -> None:
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        except RuntimeError as e:  # wgpu-py: "Request adapter failed"
            adapter, err = None, e
        else:
            err = None
        if adapter is None:
            pytest.fail(
                "wgpu-py found no WebGPU adapter (lavapipe is enough: install "
                f"mesa-vulkan-drivers, `make sysdeps`): {err}",
                pytrace=False,
            )
        self.info = adapter.info
        # WebGPU's default limits, not the adapter's: the kernels must fit a browser's device.
        self.device = adapter.request_device_sync(required_limits=WEBGPU_DEFAULT_LIMITS)
        for name, value in WEBGPU_DEFAULT_LIMITS.items():
            assert self.device.limits[name] == value, f"device limit {name}"
        self.align = max(self.device.limits["min-uniform-buffer-offset-alignment"], PARAMS_BLOCK)
        self._layouts: dict = {}
        self._kernels: dict = {}

    def kernel(self, name: str, entry: str, **defines) -> Kernel:
        defs = tuple(sorted((k, str(v)) for k, v in defines.items()))
        key = (name, entry, defs)
        if key in self._kernels:
            return self._kernels[key]
        if (name, defs) not in self._layouts:
            src = _native.shader_source(name, list(defs))
            bindings = parse_bindings(src)
            entries = []
            for n, kind in bindings:
                ty = {"params": "uniform", "read": "read-only-storage", "read_write": "storage"}
                entries.append(
                    {
                        "binding": n,
                        "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": ty[kind], "has_dynamic_offset": kind == "params"},
                    }
                )
            bgl = self.device.create_bind_group_layout(entries=entries)
            pl = self.device.create_pipeline_layout(bind_group_layouts=[bgl])
            module = self.device.create_shader_module(label=name, code=src)
            self._layouts[(name, defs)] = (src, bindings, bgl, pl, module)
        src, bindings, bgl, pl, module = self._layouts[(name, defs)]
        pipeline = self.device.create_compute_pipeline(
            label=f"{name}::{entry}", layout=pl, compute={"module": module, "entry_point": entry}
        )
        wg_bytes = workgroup_bytes(src, entry)
        limit = WEBGPU_DEFAULT_LIMITS["max-compute-workgroup-storage-size"]
        assert wg_bytes <= limit, f"{name}::{entry} {defs}: {wg_bytes} B of workgroup memory"
        k = Kernel(name, entry, src, bindings, parse_params(src), bgl, pipeline)
        self._kernels[key] = k
        return k

    def run(
        self,
        dispatches: list[tuple[Kernel, tuple[int, int, int]]],
        params: bytes,
        buffers: dict[int, np.ndarray],
        read: tuple[int, ...],
    ) -> dict[int, np.ndarray]:
        """One pass of `dispatches` (kernels of one source sharing a bind group, as the
        engine's attention + merge do) with the parameter block at a non-zero dynamic offset;
        returns the buffers in `read` after."""
        dev = self.device
        k0 = dispatches[0][0]
        declared = {n for n, kind in k0.bindings if kind != "params"}
        assert set(buffers) == declared, (
            f"{k0.name}: bound {sorted(buffers)}, declared {sorted(declared)}"
        )
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        gpu = {}
        for n, arr in buffers.items():
            data = np.ascontiguousarray(arr).tobytes()
            data += bytes(max(16, -(-len(data) // 16) * 16) - len(data))  # as storage_init
            gpu[n] = dev.create_buffer_with_data(data=data, usage=usage)
        # Block 0 is garbage, the real one sits at `align`: the offset must be honoured.
        assert len(params) <= PARAMS_BLOCK
        arena = b"\xa5" * self.align + params.ljust(PARAMS_BLOCK, b"\0")
        pbuf = dev.create_buffer_with_data(data=arena, usage=wgpu.BufferUsage.UNIFORM)
        entries = [
            {"binding": n, "resource": {"buffer": pbuf, "offset": 0, "size": PARAMS_BLOCK}}
            if kind == "params"
            else {"binding": n, "resource": {"buffer": gpu[n], "offset": 0, "size": gpu[n].size}}
            for n, kind in k0.bindings
        ]
        bg = dev.create_bind_group(layout=k0.layout, entries=entries)
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        for k, groups in dispatches:
            assert k.layout is k0.layout
            cp.set_pipeline(k.pipeline)
            cp.set_bind_group(0, bg, [self.align])
            cp.dispatch_workgroups(*groups)
        cp.end()
        dev.queue.submit([enc.finish()])
        out = {}
        for n in read:
            a = buffers[n]
            raw = dev.queue.read_buffer(gpu[n], 0, a.nbytes)
            out[n] = np.frombuffer(raw, dtype=a.dtype).reshape(a.shape).copy()
        return out


@pytest.fixture(scope="module")
def gpu() -> WebGpu:
    return WebGpu()


# kernel family -> (worst abs error, where), (worst error / tolerance, where)
MAX_ERR: dict[str, tuple[float, str]] = {}
MAX_RATIO: dict[str, tuple[float, str]] = {}


def assert_close(what: str, got, want, atol: float, rtol: float) -> None:
    """|got - want| <= atol + rtol |want| everywhere (want in float64); names the first bad
    index and both values."""
    got = np.asarray(got, np.float64)
    if isinstance(want, torch.Tensor):
        want = want.detach().double().numpy()
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    d = np.abs(got - want)
    bad = np.argwhere(~(d <= atol + rtol * np.abs(want)))
    assert bad.size == 0, (
        f"{what}: {len(bad)} bad values, first at {tuple(bad[0])}: got {got[tuple(bad[0])]}, "
        f"want {want[tuple(bad[0])]}"
    )
    worst = float(d.max()) if d.size else 0.0
    fam = what.split(" ", 1)[0]
    MAX_ERR[fam] = max(MAX_ERR.get(fam, (0.0, "")), (worst, what))
    if d.size and atol + rtol > 0:
        ratio = float((d / (atol + rtol * np.abs(want))).max())
        MAX_RATIO[fam] = max(MAX_RATIO.get(fam, (0.0, "")), (ratio, what))


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    print("\nwgpu-py shader tests, max abs error vs torch:")
    for fam, (err, what) in sorted(MAX_ERR.items()):
        ratio, where = MAX_RATIO.get(fam, (0.0, ""))
        print(f"  {fam}: {err:.3e} ({what}); worst {ratio:.0%} of the tolerance ({where})")


def rand(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).double()


# ---------------------------------------------------------------------------------------------
# probe.wgsl: a device-accuracy probe; it only has to compile on another runtime
# ---------------------------------------------------------------------------------------------


def test_probe_compiles(gpu):
    for entry in ("cos_sin", "stream", "chase"):
        gpu.kernel("probe", entry)


def test_workgroup_memory_count():
    """The workgroup-memory count that every kernel above is checked against, on known
    cases: matmul `main` Large (sa + sw + wg_flag + rstat), `gemv` with Small's defines (its
    reduction array + wg_flag); `gemv` with Large's tile would need 48 KiB, which is why
    Tile::Gemv compiles it with Small's shape only; `direct` has the skip flag only."""

    def src(tile: str) -> str:
        dims = zip(("TM", "TN", "RM", "RN", "TK"), TILES[tile], strict=True)
        other = [("A", "rms"), ("EPI", "store"), ("NORM", "1"), ("DEC", "1")]
        other += list(zip(("DM", "DN", "DWG"), map(str, DIRECT), strict=True))
        return _native.shader_source("matmul", [(k, str(v)) for k, v in dims] + other)

    assert workgroup_bytes(src("large"), "main") == 4 * (16 * 64 * 2) + 16 + 4 * 64
    assert workgroup_bytes(src("small"), "gemv") == 4 * 64 * 16 * 3 + 16
    assert workgroup_bytes(src("large"), "gemv") == 4 * 64 * 64 * 3 + 16 > 16384
    assert workgroup_bytes(src("small"), "direct") == 16  # the skip flag only
    ln = _native.shader_source("layernorm")
    assert workgroup_bytes(ln, "main") == 4 * 64  # `red`, used through reduce_sum


# ---------------------------------------------------------------------------------------------
# resize.wgsl: F.interpolate(bicubic, align_corners=False), as resize_to_model_input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "planes,hin,win,hout,wout,atol64",
    [
        (3, 37, 53, 21, 29, 2e-5),  # downscale, odd sizes
        (2, 13, 7, 31, 17, 2e-5),  # upscale (negative source coordinates at the border)
        (3, 23, 41, 23, 23, 2e-5),  # one axis unchanged
        (1, 6, 33, 10, 13, 2e-5),
        (2, 1, 5, 3, 2, 2e-5),  # a single source row
        (3, 224, 398, 224, 224, 2e-4),  # the model's squash of a 16:9 frame (224x398)
    ],
)
def test_resize_bicubic(gpu, planes, hin, win, hout, wout, atol64):
    """Against the float32 op the reference backend runs (resize_to_model_input) at 1e-5, and
    against float64. The float32 sampling coordinate scale * (x + 0.5) - 0.5 is part of the
    op (ulp 3e-5 px near x = 400): torch's own float32 result differs from its float64 one by
    9e-5 on the 224x398 frame, so the float64 bound is looser there."""
    k = gpu.kernel("resize", "bicubic")
    rng = np.random.default_rng(planes * 1000 + hin + win)
    src = rand(rng, planes, hin, win, scale=2.0)
    params = k.pack(
        h_in=hin, w_in=win, h_out=hout, w_out=wout, planes=planes,
        scale_h=np.float32(hin) / np.float32(hout), scale_w=np.float32(win) / np.float32(wout),
    )  # fmt: skip
    groups = (math.ceil(wout / 16), math.ceil(hout / 16), planes)  # Bicubic::record
    dst = np.zeros((planes, hout, wout), np.float32)
    got = gpu.run([(k, groups)], params, {1: src, 2: dst}, read=(2,))[2]
    what = f"resize {planes}x{hin}x{win}->{hout}x{wout}"
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, atol64)):
        x = torch.from_numpy(src).to(dtype)[None]
        want = F.interpolate(x, size=(hout, wout), mode="bicubic", align_corners=False)[0]
        assert_close(f"{what} vs {dtype}", got, want, atol, 1e-5)


def test_resize_same_size_is_identity(gpu):
    k = gpu.kernel("resize", "bicubic")
    src = rand(np.random.default_rng(9), 2, 19, 19, scale=3.0)
    params = k.pack(h_in=19, w_in=19, h_out=19, w_out=19, planes=2, scale_h=1.0, scale_w=1.0)
    got = gpu.run([(k, (2, 2, 2))], params, {1: src, 2: np.zeros_like(src)}, read=(2,))[2]
    assert np.array_equal(got, src)


# ---------------------------------------------------------------------------------------------
# layernorm.wgsl: F.layer_norm per token, written into the causal-conv ring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,frames,hw,c,ring,t0,gx",
    [
        (2, 3, 5, 45, 4, 3, None),  # the Rust test's shape
        (1, 1, 13, 29, 3, 0, None),
        (2, 2, 10, 131, 5, 7, None),
        (1, 3, 37, 192, 3, 1, None),  # the model's channels
        (3, 2, 7, 33, 4, 2, 5),  # 2-D grid (row_groups_x < rows), as for huge batches
    ],
)
def test_layernorm_into_ring(gpu, batch, frames, hw, c, ring, t0, gx):
    k = gpu.kernel("layernorm", "main")
    rng = np.random.default_rng(c + hw)
    rows = batch * frames * hw
    x = rand(rng, batch, frames, hw, c, scale=3.0)
    g_off = 7  # weights not at offset 0: the offsets are honoured
    wts = rand(rng, g_off + 2 * c)
    gx = gx or min(rows, 32768)  # LayerNorm::record
    params = k.pack(
        rows=rows, c=c, hw=hw, in_frames=frames, out_frames=ring, t0=t0,
        g_off=g_off, b_off=g_off + c, eps=1e-5, row_groups_x=gx,
    )  # fmt: skip
    dst = np.full((batch, ring, hw, c), 7.5, np.float32)
    groups = (gx, math.ceil(rows / gx), 1)
    got = gpu.run([(k, groups)], params, {1: x, 2: wts, 3: dst}, read=(3,))[3]
    ln = F.layer_norm(t64(x), (c,), t64(wts[g_off : g_off + c]), t64(wts[g_off + c :]), eps=1e-5)
    want = torch.full(dst.shape, 7.5, dtype=torch.float64)  # slots not written keep their value
    for t in range(frames):
        want[:, (t0 + t + 2) % ring] = ln[:, t]
    assert_close(f"layernorm B{batch} T{frames} hw{hw} C{c}", got, want, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# matmul.wgsl: F.linear with the fused loaders and epilogues, `main` and `gemv` entries
# ---------------------------------------------------------------------------------------------


def matmul_kernel(gpu, tile, entry, *, a="plain", epi="store", last=False, bias=False,
                  relu=False, addrow=False, dec=False) -> Kernel:  # fmt: skip
    """MatmulSpec::key (+ `entry`)."""
    tm, tn, rm, rn, tk = TILES[tile]

    def b(v: bool) -> str:
        return "1" if v else "0"

    return gpu.kernel(
        "matmul", entry, TM=tm, TN=tn, RM=rm, RN=rn, TK=tk, A=a, EPI=epi,
        NORM=b(a in ("rms", "embed")), LAST=b(last), BIAS=b(bias), RELU=b(relu),
        ADDROW=b(addrow), DEC=b(dec or a == "embed" or epi == "qkv"),
        DM=DIRECT[0], DN=DIRECT[1], DWG=DIRECT[2],
    )  # fmt: skip


def matmul_groups(tile, entry, m, n):
    """Matmul::record: gemv [ceil(N/2), ceil(M/16), 1], direct [ceil(N/(DWG*DN)),
    ceil(M/DM), 1], main [ceil(N/TN), ceil(M/TM), 1]."""
    tm, tn = TILES[tile][:2]
    if entry == "gemv":
        return (math.ceil(n / 2), math.ceil(m / tm), 1)
    if entry == "direct":
        dm, dn, dwg = DIRECT
        return (math.ceil(n / (dwg * dn)), math.ceil(m / dm), 1)
    return (math.ceil(n / tn), math.ceil(m / tm), 1)


def sweep(m_sizes=SIZES_M, n_sizes=SIZES_N, k_sizes=SIZES_K):
    return list(itertools.product(m_sizes, n_sizes, k_sizes))


@pytest.mark.parametrize("tile,entry", MATMUL_ENTRIES, ids=ENTRY_IDS)
def test_matmul_bias_relu_and_addrow(gpu, tile, entry):
    relu_k = matmul_kernel(gpu, tile, entry, bias=True, relu=True)
    add_k = matmul_kernel(gpu, tile, entry, bias=True, addrow=True)
    for m, n, k in sweep():
        rng = np.random.default_rng(m * 10007 + n * 101 + k)
        a, w, bias, add = rand(rng, m, k), rand(rng, n, k), rand(rng, n), rand(rng, 5, n)
        wts = np.concatenate([w.ravel(), bias, add.ravel()])
        lin = F.linear(t64(a), t64(w), t64(bias))
        for kern, want in ((relu_k, lin.relu()), (add_k, lin + t64(add)[torch.arange(m) % 5])):
            params = kern.pack(m=m, n=n, k=k, ldc=n, b_off=n * k, add_off=n * k + n, add_mod=5)
            out = np.zeros((m, n), np.float32)
            got = gpu.run([(kern, matmul_groups(tile, entry, m, n))], params,
                          {1: a, 2: wts, 3: out}, read=(3,))[3]  # fmt: skip
            what = "relu" if kern is relu_k else "addrow"
            assert_close(f"matmul {tile}/{entry} bias+{what} M{m} N{n} K{k}", got, want, 2e-5, 1e-5)


@pytest.mark.parametrize("tile,entry", MATMUL_ENTRIES, ids=ENTRY_IDS)
def test_matmul_residual_and_swiglu(gpu, tile, entry):
    res_k = matmul_kernel(gpu, tile, entry, epi="residual")
    swi_k = matmul_kernel(gpu, tile, entry, epi="swiglu")
    for m, n, k in sweep(n_sizes=(6, 34, 192)):  # SwiGLU pairs columns: N even
        rng = np.random.default_rng(m * 7919 + n * 31 + k)
        a, w, x0 = rand(rng, m, k), rand(rng, n, k), rand(rng, m, n)
        lin = F.linear(t64(a), t64(w))
        groups = matmul_groups(tile, entry, m, n)
        params = res_k.pack(m=m, n=n, k=k, ldc=n)
        got = gpu.run([(res_k, groups)], params, {1: a, 2: w, 3: x0}, read=(3,))[3]
        want = t64(x0) + lin
        assert_close(f"matmul {tile}/{entry} residual M{m} N{n} K{k}", got, want, 2e-5, 1e-5)

        params = swi_k.pack(m=m, n=n, k=k, ldc=n // 2)
        out = np.zeros((m, n // 2), np.float32)
        got = gpu.run([(swi_k, groups)], params, {1: a, 2: w, 3: out}, read=(3,))[3]
        want = F.silu(lin[:, 0::2]) * lin[:, 1::2]  # W rows interleave gate (even) / up (odd)
        assert_close(f"matmul {tile}/{entry} swiglu M{m} N{n} K{k}", got, want, 2e-5, 1e-5)


@pytest.mark.parametrize("tile,entry", MATMUL_ENTRIES, ids=ENTRY_IDS)
def test_matmul_rmsnorm_rows_and_last_slot(gpu, tile, entry):
    rms_k = matmul_kernel(gpu, tile, entry, a="rms")
    last_k = matmul_kernel(gpu, tile, entry, a="rms", last=True)
    for m, n, k in sweep():
        rng = np.random.default_rng(m * 3 + n * 5 + k * 7)
        a, w, g = rand(rng, m, k, scale=2.0), rand(rng, n, k), rand(rng, k)
        wts = np.concatenate([w.ravel(), g])
        params = rms_k.pack(m=m, n=n, k=k, ldc=n, g_off=n * k, eps=1e-5)
        out = np.zeros((m + 3, n), np.float32)  # rows past M must stay untouched
        got = gpu.run([(rms_k, matmul_groups(tile, entry, m, n))], params,
                      {1: a, 2: wts, 3: out}, read=(3,))[3]  # fmt: skip
        want = F.linear(F.rms_norm(t64(a), (k,), t64(g), eps=1e-5), t64(w))
        assert_close(f"matmul {tile}/{entry} rmsnorm M{m} N{n} K{k}", got[:m], want, 2e-5, 1e-5)
        assert not got[m:].any(), "rows past M written"

        # The heads: output row b is the last of nt slots of batch row b.
        nt = 3
        x = rand(rng, m, nt, k, scale=2.0)
        params = last_k.pack(m=m, n=n, k=k, ldc=n, g_off=n * k, eps=1e-5, nt=nt)
        got = gpu.run([(last_k, matmul_groups(tile, entry, m, n))], params,
                      {1: x, 2: wts, 3: np.zeros((m, n), np.float32)}, read=(3,))[3]  # fmt: skip
        want = F.linear(F.rms_norm(t64(x[:, -1]), (k,), t64(g), eps=1e-5), t64(w))
        assert_close(f"matmul {tile}/{entry} rmsnorm-last B{m} N{n} K{k}", got, want, 2e-5, 1e-5)


@pytest.mark.parametrize(
    "frames,grid,ps,n",
    [(3, 3, 5, 6), (2, 4, 7, 33), (1, 14, 16, 192)],  # the last is the model's patchify
)
@pytest.mark.parametrize("entry", ["main", "direct"])
def test_matmul_patchify_is_conv2d(gpu, entry, frames, grid, ps, n):
    kern = matmul_kernel(gpu, "large", entry, a="patch", bias=True)
    img, k = grid * ps, 3 * ps * ps
    rng = np.random.default_rng(ps * n)
    x, w, bias = rand(rng, frames, 3, img, img), rand(rng, n, 3, ps, ps), rand(rng, n)
    m = frames * grid * grid
    wts = np.concatenate([w.ravel(), bias])
    params = kern.pack(m=m, n=n, k=k, ldc=n, b_off=n * k, grid=grid, img=img, psize=ps)
    got = gpu.run([(kern, matmul_groups("large", entry, m, n))], params,
                  {1: x, 2: wts, 3: np.zeros((m, n), np.float32)}, read=(3,))[3]  # fmt: skip
    want = F.conv2d(t64(x), t64(w), t64(bias), stride=ps).permute(0, 2, 3, 1).reshape(m, n)
    assert_close(f"matmul patchify F{frames} g{grid} p{ps} N{n}", got, want, 2e-5, 1e-5)


@pytest.mark.parametrize(
    "b,tc,ring,g,cin,n,t0",
    [(2, 3, 5, 4, 7, 6, 4), (1, 1, 3, 5, 13, 33, 0), (1, 2, 4, 3, 29, 10, 9)],
)
@pytest.mark.parametrize("entry", ["main", "direct"])
def test_matmul_causal_conv3_is_conv3d(gpu, entry, b, tc, ring, g, cin, n, t0):
    """Causal 3x3x3 conv (no temporal padding, spatial padding 1) reading a ring window:
    session frame t lives in slot (t + 2) % ring; output frame t0 + j reads t0 + j - 2 ..."""
    kern = matmul_kernel(gpu, "large", entry, a="conv3", bias=True, relu=True)
    rng = np.random.default_rng(cin * n + t0)
    hw, k, nf = g * g, 27 * cin, tc + 2
    frames = rand(rng, b, nf, hw, cin)  # session frames t0-2 .. t0+tc-1
    ring_buf = np.zeros((b, ring, hw, cin), np.float32)
    for f in range(nf):
        ring_buf[:, (t0 + f - 2 + 2) % ring] = frames[:, f]
    w = rand(rng, n, cin, 3, 3, 3)  # torch layout, reordered to [n, tap, cin] for the kernel
    wr = w.reshape(n, cin, 27).transpose(0, 2, 1)
    bias = rand(rng, n)
    m = b * tc * hw
    wts = np.concatenate([wr.ravel(), bias])
    params = kern.pack(m=m, n=n, k=k, ldc=n, b_off=n * k, grid=g, cin=cin, frames_in=ring,
                       frames_out=tc, t0=t0)  # fmt: skip
    got = gpu.run([(kern, matmul_groups("large", entry, m, n))], params,
                  {1: ring_buf, 2: wts, 3: np.zeros((m, n), np.float32)}, read=(3,))[3]  # fmt: skip
    vid = t64(frames).reshape(b, nf, g, g, cin).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    y = F.conv3d(vid, t64(w), t64(bias), padding=(0, 1, 1)).relu()  # (B, n, tc, g, g)
    want = y.permute(0, 2, 3, 4, 1).reshape(m, n)
    assert_close(f"matmul conv3 B{b} T{tc} g{g} cin{cin} N{n}", got, want, 2e-5, 1e-5)


@pytest.mark.parametrize("tile,entry", MATMUL_ENTRIES, ids=ENTRY_IDS)
def test_matmul_decoder_skips_when_frame_done(gpu, tile, entry):
    """DEC=1 (o_proj/down): with the frame's done flag set and skip_if_done the kernel writes
    nothing; with the flag clear (or skip_if_done 0) it computes."""
    kern = matmul_kernel(gpu, tile, entry, epi="residual", dec=True)
    m, n, k = 13, 33, 131
    rng = np.random.default_rng(5)
    a, w, x0 = rand(rng, m, k), rand(rng, n, k), rand(rng, m, n)
    want = t64(x0) + F.linear(t64(a), t64(w))
    for done, skip in ((1, 1), (0, 1), (1, 0)):
        gen = np.zeros(S_HDR + ROW_WORDS, np.uint32)
        gen[S_DONE] = done
        params = kern.pack(m=m, n=n, k=k, ldc=n, skip_if_done=skip)
        got = gpu.run([(kern, matmul_groups(tile, entry, m, n))], params,
                      {1: a, 2: w, 3: x0, 4: gen}, read=(3,))[3]  # fmt: skip
        if done and skip:
            assert np.array_equal(got, x0), "a done frame's decoder kernel wrote its output"
        else:
            assert_close(f"matmul {tile}/{entry} dec residual done={done}", got, want, 2e-5, 1e-5)


def rope_table(npos: int, hd: int, theta: float = 10000.0) -> np.ndarray:
    """[npos, hd]: cos | sin of pos * inv_freq (the layout rust/gpu/rope.rs uploads)."""
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(npos, dtype=np.float64)[:, None] * inv[None]
    return np.concatenate([np.cos(ang), np.sin(ang)], 1).astype(np.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


@pytest.mark.parametrize(
    "tile,entry", [("large", "main"), ("small", "gemv"), ("small", "direct")],
    ids=["prefill", "decode", "cpu"],
)
def test_matmul_embed_qkv_rope_kv_write(gpu, tile, entry):
    """The decoder's first projection (DEC=1): gather plan tokens' embeddings or vision tokens,
    RMSNorm, q|k|v, RoPE at the plan's positions, q out and k, v of active slots into the KV
    cache; against torch's rms_norm/linear and the llama rotate_half RoPE."""
    kern = matmul_kernel(gpu, tile, entry, a="embed", epi="qkv")
    b, heads, hd, lead, npatch, vocab = 2, 3, 32, 4, 9, 11
    c, nt = heads * hd, lead + npatch
    cap, base, first, npos = 40, 17, 1, 64
    vis_frames, vis_frame = 2, 1
    rng = np.random.default_rng(77)
    embed, wq, g = rand(rng, vocab, c), rand(rng, 3 * c, c, scale=0.3), rand(rng, c)
    # The launcher's row permutation: rows (n, n + 1) hold dims (q, q + hd/2) of one head.
    perm = [s * c + h * hd + e // 2 + (e % 2) * (hd // 2)
            for s in range(3) for h in range(heads) for e in range(hd)]  # fmt: skip
    w_off, g_off = vocab * c, vocab * c + 3 * c * c
    wts = np.concatenate([embed.ravel(), wq[perm].ravel(), g])
    vis = rand(rng, b, vis_frames, npatch, c)
    toks = rng.integers(0, vocab, size=(b, lead))
    pos = rng.integers(0, npos, size=(b, nt))
    gen = np.zeros(S_HDR + b * ROW_WORDS + b * lead + b * nt, np.uint32)
    gen[S_BASE], gen[S_FIRST] = base, first
    ptok = S_HDR + b * ROW_WORDS
    gen[ptok : ptok + b * lead] = toks.ravel()
    gen[ptok + b * lead :] = pos.ravel()
    rope = rope_table(npos, hd)
    kv0 = rand(rng, b, cap, 2, c)
    m, n = b * nt, 3 * c
    params = kern.pack(
        m=m, n=n, k=c, ldc=c, w_off=w_off, g_off=g_off, nt=nt, batch=b, cap=cap, lead=lead,
        eps=1e-5, vis_frames=vis_frames, vis_frame=vis_frame, heads=heads, head_dim=hd,
        a_off=0, pos_stride=nt,
    )  # fmt: skip
    bufs = {1: vis, 2: wts, 3: np.zeros((m, c), np.float32), 4: gen,
            5: np.zeros((m, c), np.float32), 6: kv0, 7: rope}  # fmt: skip
    got = gpu.run([(kern, matmul_groups(tile, entry, m, n))], params, bufs, read=(3, 5, 6))

    x = torch.cat([t64(embed)[torch.from_numpy(toks)], t64(vis[:, vis_frame])], 1)  # (B, nt, C)
    assert_close(f"matmul embed-gather {entry}", got[5].reshape(b, nt, c), x, 0.0, 0.0)
    qkv = F.linear(F.rms_norm(x, (c,), t64(g), eps=1e-5), t64(wq)).reshape(b, nt, 3, heads, hd)
    at = torch.from_numpy(pos)
    cos = t64(rope[:, : hd // 2])[at].repeat(1, 1, 2)[:, :, None]  # (B, nt, 1, hd)
    sin = t64(rope[:, hd // 2 :])[at].repeat(1, 1, 2)[:, :, None]
    q = qkv[:, :, 0] * cos + rotate_half(qkv[:, :, 0]) * sin
    kk = qkv[:, :, 1] * cos + rotate_half(qkv[:, :, 1]) * sin
    assert_close(f"matmul qkv-rope q {entry}", got[3].reshape(b, nt, heads, hd), q, 2e-5, 1e-5)
    kv_want = t64(kv0).clone()
    kv_want[:, base + first : base + nt, 0] = kk[:, first:].reshape(b, nt - first, c)
    kv_want[:, base + first : base + nt, 1] = qkv[:, first:, 2].reshape(b, nt - first, c)
    assert_close(f"matmul qkv-rope kv-write {entry}", got[6], kv_want, 2e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# attention.wgsl: softmax attention with causal + key-padding mask, `main` chunks + `merge`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,heads,hd,qt,lanes,nt,base,first,cap,chunk",
    [
        (2, 6, 32, 16, 4, 10, 213, 0, 256, 128),  # a decode step (model shape: 16 x 4 lanes)
        (2, 6, 32, 16, 1, 10, 213, 0, 256, 64),  # the same, one lane
        (1, 6, 32, 64, 1, 206, -4, 4, 256, 64),  # a first prefill: negative base, idle slots
        (2, 2, 8, 4, 1, 7, 45, 1, 80, 32),  # the Rust test's shape
        (2, 2, 8, 4, 4, 7, 45, 1, 80, 32),  # ... with lanes
        (3, 2, 32, 64, 1, 37, 50, 3, 96, 96),  # one chunk
        (1, 3, 8, 16, 4, 13, 0, 0, 13, 32),  # chunk past the cache's end, lanes
        (2, 1, 32, 16, 4, 1, 29, 0, 33, 32),  # one query, lanes
    ],
)
def test_attention_and_merge(gpu, b, heads, hd, qt, lanes, nt, base, first, cap, chunk):
    """`main` against torch, and `direct` (CPU devices) against `main`'s bits."""
    main = gpu.kernel("attention", "main", HEAD_DIM=hd, QT=qt, LANES=lanes)
    direct = gpu.kernel("attention", "direct", HEAD_DIM=hd, QT=qt, LANES=lanes)
    merge = gpu.kernel("attention", "merge", HEAD_DIM=hd, QT=qt, LANES=lanes)
    c = heads * hd
    nchunk = math.ceil((base + nt) / chunk)
    rng = np.random.default_rng(nt * 13 + hd)
    q, kv = rand(rng, b, nt, c), rand(rng, b, cap, 2, c)
    kvmask = (rng.integers(0, 4, size=(b, cap)) != 0).astype(np.uint32)
    kvmask[:, 0] = 1
    if b > 1:
        kvmask[-1, : cap // 2] = 0  # a row whose early keys are all padding
    gen = np.zeros(S_HDR, np.uint32)
    gen[S_BASE], gen[S_FIRST] = np.int32(base).view(np.uint32), first
    scale = np.float32(1.0 / math.sqrt(hd))
    part = np.full((b, heads, nt, nchunk, hd + 2), 3.0, np.float32)
    threads = b * nt * heads * (hd // 4)
    groups = math.ceil(threads / 64)
    gx = min(groups, 32768)
    for done in (0, 1):
        gen[S_DONE] = done
        params = main.pack(batch=b, nt=nt, cap=cap, nchunk=nchunk, chunk=chunk, heads=heads,
                           skip_if_done=1, scale=scale)  # fmt: skip
        runs = [
            gpu.run(
                [
                    (kern, (math.ceil(nt / qt), nchunk, b * heads)),  # Attention::record
                    (merge, (gx, math.ceil(groups / gx), 1)),
                ],
                params,
                {1: gen, 2: q, 3: kv, 4: kvmask, 5: part},
                read=(2, 5),
            )
            for kern in (main, direct)
        ]
        got = runs[0]
        for key in (2, 5):
            assert np.array_equal(runs[1][key], got[key]), f"direct != main (binding {key})"
        if done:
            assert np.array_equal(got[2], q), "a done frame's attention wrote its output"
            assert (got[5] == 3.0).all(), "a done frame's attention wrote partials"
            continue
        # torch: (B, H, nt, HD) x (B, H, cap, HD); slot i sees keys j <= base + i with mask 1.
        Q = t64(q).reshape(b, nt, heads, hd).transpose(1, 2)
        K = t64(kv[:, :, 0]).reshape(b, cap, heads, hd).transpose(1, 2)
        V = t64(kv[:, :, 1]).reshape(b, cap, heads, hd).transpose(1, 2)
        ci = base + torch.arange(nt)
        causal = torch.arange(cap)[None] <= ci[:, None]  # (nt, cap)
        allowed = causal[None] & torch.from_numpy(kvmask != 0)[:, None]  # (B, nt, cap)
        scores = (Q @ K.transpose(-1, -2)) * float(scale)
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out = probs @ V  # (B, H, nt, HD)
        out[:, :, :first] = 0.0  # idle slots merge to zeros
        want = out.transpose(1, 2).reshape(b, nt, c)
        assert_close(f"attention B{b} H{heads} hd{hd} QT{qt}x{lanes} nt{nt} base{base} {nchunk} chunks",
                     got[2], want, 2e-5, 1e-5)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# select.wgsl: the greedy selection step, against the reference's select_step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,budget,req,b",
    [(41, 10, 0.3, 3), (42, 7, None, 2), (43, 11, 0.6, 11)],  # 11 rows: two passes of 8
)
def test_select_matches_reference_select_step(gpu, seed, budget, req, b):
    """Several frames of selection steps on quantised logits (ties) with task-loss stops: the
    kernel's tokens, frame lengths and done flags against
    `reference.generation.select_step` driven as the reference loop drives it."""
    from autogaze_wgpu.reference.generation import select_step

    kern = gpu.kernel("select", "main")
    K, V, npatch = 4, 12, 6
    pad, cap, rowlen, ps = V - 1, 200, K * V + K, K + npatch
    out_frames, out_stride = 3, 16
    rng = np.random.default_rng(seed)
    # Initial session state (select.rs layout::initial).
    words = S_HDR + b * ROW_WORDS + b * K + b * ps
    gen = np.zeros(words, np.uint32)
    gen[S_BASE], gen[S_FIRST], gen[S_DONE] = np.int32(-K).view(np.uint32), K, 1
    for r in range(b):
        gen[S_HDR + r * ROW_WORDS + 1] = npatch - 1
    kvmask = np.zeros((b, cap), np.uint32)
    out = np.zeros(out_frames + b * out_frames * out_stride, np.uint32)
    debug = np.zeros(4, np.float32)
    for frame in range(out_frames):
        chosen = torch.zeros(b, V, dtype=torch.bool)
        finished = torch.zeros(b, dtype=torch.bool)
        toks: list[torch.Tensor] = []
        n_frame = 0
        for s in range(math.ceil(budget / K)):
            logits = np.zeros((b, rowlen), np.float32)
            logits[:, : K * V] = rng.integers(0, 9, size=(b, K * V)) * 0.25
            logits[:, K * V :] = rng.integers(0, 1000, size=(b, K)) / 1000.0
            phase, nt = (0, K + npatch) if s == 0 else (1, K)
            params = kern.pack(
                batch=b, budget=budget, has_req=int(req is not None), req=req or 0.0,
                phase=phase, nt=nt, out_frame=frame, cap=cap, lead=K, npatch=npatch, vocab=V,
                pad=pad, out_stride=out_stride, out_frames=out_frames, debug_rows=1,
                pos_stride=ps,
            )  # fmt: skip
            bufs = {1: gen, 2: logits, 3: kvmask, 4: out, 5: debug}
            res = gpu.run([(kern, (1, 1, 1))], params, bufs, read=(1, 3, 4))  # Select::record
            gen, kvmask, out = res[1], res[3], res[4]

            lg = torch.from_numpy(logits)
            step, finished, exhausted = select_step(
                lg[:, : K * V].reshape(b, K, V), lg[:, K * V :], chosen, finished, n_frame,
                budget, req, s == 0, pad,
            )  # fmt: skip
            assert not exhausted
            chosen.scatter_(1, step, True)  # as the reference loop
            toks.append(step)
            n_frame += step.shape[1]
            frame_done = n_frame >= budget or bool(finished.all())
            what = f"select seed {seed} frame {frame} step {s}"
            assert gen[S_COUNT] == n_frame, f"{what}: count {gen[S_COUNT]} != {n_frame}"
            assert bool(gen[S_DONE]) == frame_done, f"{what}: done flag"
            want = torch.cat(toks, 1).numpy()
            for r in range(b):
                rb = S_HDR + r * ROW_WORDS
                assert bool(gen[rb + R_FIN]) == bool(finished[r]), f"{what}: row {r} finished"
                got_r = gen[rb + R_TOK : rb + R_TOK + n_frame]
                assert np.array_equal(got_r, want[r]), f"{what}: row {r}: {got_r} != {want[r]}"
            if frame_done:
                break
        assert out[frame] == n_frame, f"frame {frame}: n_t"
        got_out = out[out_frames:].reshape(b, out_frames, out_stride)[:, frame, :n_frame]
        assert np.array_equal(got_out, torch.cat(toks, 1).numpy()), f"frame {frame}: out tokens"


# ---------------------------------------------------------------------------------------------
# score.wgsl: the teacher-forced gather, against SPEC §5b's indexing in torch
# ---------------------------------------------------------------------------------------------

S_SC_SLOT, S_SC_START, S_SC_END = 9, 10, 11


@pytest.mark.parametrize("b,n,so", [(1, 8, 0), (3, 10, 2), (2, 3, 5)])
def test_score_matches_the_teacher_forced_indexing(gpu, b, n, so):
    """A frame of n slots (from slot `so` of the outputs) scored as the engine does: the
    heads after the vision forward and after each group of K slots, one launch each. The
    result equals SPEC §5b's gather over the whole sequence's heads (softmax in float64), and
    slots outside the frame keep their sentinel."""
    kern = gpu.kernel("score", "main")
    K, V, P = 4, 9, 5
    nslots = so + n + 1
    rng = np.random.default_rng(100 * b + n)
    L = P + n  # the frame's sequence: P vision tokens then the n slots
    lm = torch.from_numpy(rng.normal(0, 3, (b, L, K, V)))
    tl = torch.from_numpy(rng.normal(0, 1, (b, L, K)))
    tok = rng.integers(0, V, size=(b, nslots)).astype(np.uint32)
    out = np.full(2 * b * nslots, -7.0, np.float32)
    gen = np.zeros(S_HDR + b * ROW_WORDS + b * K + b * (K + P), np.uint32)
    params = kern.pack(batch=b, vocab=V, k=K, nslots=nslots, rows=1)
    for f in range(math.ceil(n / K) + 1):
        row = min(P - 1 + f * K, L - 1)  # last slot of forward f (a partial last group)
        logits = np.concatenate([lm[:, row].reshape(b, K * V), tl[:, row]], 1).astype(np.float32)
        gen[S_SC_SLOT], gen[S_SC_START], gen[S_SC_END] = so + f * K, so, so + n
        bufs = {1: gen, 2: logits, 3: tok, 4: out}
        out = gpu.run([(kern, (b, 1, 1))], params, bufs, read=(4,))[4]  # Score::record

    i = torch.arange(n)
    j = i % K
    k = (j + 1) % K
    ids = torch.from_numpy(tok[:, so : so + n].astype(np.int64))
    probs = lm.softmax(-1)[:, P + i - (j + 1), j]  # (b, n, V)
    want_gp = probs.gather(-1, ids[..., None])[..., 0]
    want_tl = tl[:, P + i - k, k]
    got = out.reshape(2, b, nslots)
    assert_close(f"score gaze_probs b{b} n{n}", got[0, :, so : so + n], want_gp, 1e-6, 1e-5)
    assert_close(f"score task_loss b{b} n{n}", got[1, :, so : so + n], want_tl, 1e-6, 1e-6)
    outside = np.r_[0:so, so + n : nslots]
    assert (got[:, :, outside] == -7.0).all(), "slots outside the frame were written"
