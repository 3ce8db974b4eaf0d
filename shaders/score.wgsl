// score.wgsl: teacher-forced scores (SPEC §5b) from the heads output of one forward.
//
// The scoring pass takes the heads at the rows just before each group of K slots (the last
// vision token, then the last slot of each full group): `rows` such rows per batch row in
// this launch, row j followed by the group starting at slot s0 = gen[S_SC_SLOT] + j K (an
// index into the [B, nslots] outputs):
//  * head k's softmax over all V ids (no masking) at the id of slot s0 + k is its gaze_prob;
//  * task-loss head k is the task_loss_prediction of slot s0 + k - 1 (head 0: the last slot
//    of the previous group), the one-slot shift of the official forward.
// Slots outside the frame's [S_SC_START, S_SC_END) are left alone. One workgroup per (batch
// row, heads row), one thread per head.

struct Params {
    batch: u32,
    vocab: u32,       // V = 266 ids per head
    k: u32,           // heads K (<= 16)
    nslots: u32,      // slots per batch row in `tok` / `out`
    rows: u32,        // heads rows per batch row in `logits`
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gen: array<u32>;          // generation state (S_SC_*)
@group(0) @binding(2) var<storage, read> logits: array<f32>;       // [B, rows, K*V + K]
@group(0) @binding(3) var<storage, read> tok: array<u32>;          // [B, nslots] ids (pad = V - 1)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;    // [2, B, nslots]: gaze_probs | task_loss

@compute @workgroup_size(16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) k: u32) {
    let b = wg.x;
    let j = wg.y;
    if (b >= p.batch || j >= p.rows || k >= p.k) {
        return;
    }
    let s0 = gen[S_SC_SLOT] + j * p.k;
    let start = gen[S_SC_START];
    let end = gen[S_SC_END];
    let row = (b * p.rows + j) * (p.k * p.vocab + p.k);
    let s = s0 + k;
    if (s < end) {
        // softmax as torch computes it: exp(x - max) / sum(exp(x - max)).
        let lo = row + k * p.vocab;
        var m = F32_LOWEST;
        for (var v = 0u; v < p.vocab; v++) {
            m = max(m, logits[lo + v]);
        }
        var sum = 0.0;
        for (var v = 0u; v < p.vocab; v++) {
            sum += exp(logits[lo + v] - m);
        }
        let id = min(tok[b * p.nslots + s], p.vocab - 1u);
        out[b * p.nslots + s] = exp(logits[lo + id] - m) / sum;
    }
    // Slot s0 + k - 1, written without unsigned underflow (s0 + k >= start + 1).
    if (s0 + k > start && s0 + k - 1u < end) {
        out[(p.batch + b) * p.nslots + s0 + k - 1u] = logits[row + p.k * p.vocab + k];
    }
}
