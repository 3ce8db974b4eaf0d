// common.wgsl: helpers shared by every kernel family (prepended to each shader file).
//
// Portable WGSL only: no f16, no subgroups, no immediates. No infinities are produced by
// constant expressions (WGSL forbids it); "minus infinity" in softmax/argmax code is the
// lowest finite f32 plus explicit validity flags.

const F32_LOWEST: f32 = -3.4028234663852886e38;

// ---- Generation state (`gen` buffer, u32 words) ---------------------------------------------
// Header, shared by every batch row.
const S_FRAME: u32 = 0u;   // frames finished so far in this session
const S_L: u32 = 1u;       // tokens in the KV cache (same for every row)
const S_BASE: u32 = 2u;    // i32: cache index of slot 0 of the next forward
const S_FIRST: u32 = 3u;   // first active slot of the next forward (earlier slots are idle)
const S_COUNT: u32 = 4u;   // gaze slots chosen so far in the current frame
const S_STEP: u32 = 5u;    // selection steps done in the current frame
const S_DONE: u32 = 6u;    // 1 once the current frame is finished (decode work no-ops)
const S_G: u32 = 7u;       // cache index of the current frame's first gaze token
const S_GSTEP: u32 = 8u;   // selection steps done in the session (debug logits row)
// Teacher-forced scoring only (score.wgsl), set per forward by the scoring pass:
const S_SC_SLOT: u32 = 9u;   // first slot scored by this forward's heads (gaze probs)
const S_SC_START: u32 = 10u; // this frame's slots: [start, end) in the score outputs
const S_SC_END: u32 = 11u;
const S_HDR: u32 = 16u;
// Per batch row, at S_HDR + b * ROW_WORDS.
const R_FIN: u32 = 0u;     // row finished in the current frame
const R_P: u32 = 1u;       // position id of the current frame's last vision token
const R_USED: u32 = 2u;    // 10 words: bitmask of ids chosen in the current frame (+ eos)
const R_TOK: u32 = 12u;    // MAX_FRAME words: the current frame's tokens (pads = eos)
const MAX_FRAME: u32 = 276u;
const ROW_WORDS: u32 = 288u;
// After the rows: the next forward's plan.
//   plan_tok[b * LEAD + i]  token ids of the token slots (LEAD = K = 10 per row)
//   plan_pos[b * NT_PRE + i] position ids of every slot (NT_PRE = LEAD + patches)

fn row_base(b: u32) -> u32 {
    return S_HDR + b * ROW_WORDS;
}

fn silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

// torch's bicubic convolution coefficients (A = -0.75) for fractional offset t.
fn cubic_coeffs(t: f32) -> vec4<f32> {
    let a = -0.75;
    let x0 = t + 1.0;
    let x1 = t;
    let x2 = 1.0 - t;
    let x3 = x2 + 1.0;
    let c0 = ((a * x0 - 5.0 * a) * x0 + 8.0 * a) * x0 - 4.0 * a;
    let c1 = ((a + 2.0) * x1 - (a + 3.0)) * x1 * x1 + 1.0;
    let c2 = ((a + 2.0) * x2 - (a + 3.0)) * x2 * x2 + 1.0;
    let c3 = ((a * x3 - 5.0 * a) * x3 + 8.0 * a) * x3 - 4.0 * a;
    return vec4<f32>(c0, c1, c2, c3);
}

fn plan_tok_base(batch: u32) -> u32 {
    return S_HDR + batch * ROW_WORDS;
}

fn plan_pos_base(batch: u32, lead: u32) -> u32 {
    return S_HDR + batch * ROW_WORDS + batch * lead;
}
