//! Parity with the official implementation: the fixtures in `shared/fixtures/official`
//! (`$AUTOGAZE_FIXTURES`). These tests fail, not skip, when the fixtures are missing.
//!
//! Vision embeddings within 1e-4 (cases a, d), step logits of case a within 1e-3, exact
//! tokens, padding flags and frame lengths for cases a, b, c, e, f (streaming), g1 (AnyRes
//! tiles as batch rows), teacher-forced scores of a and e.
//!
//! Generation runs on the first [`FRAMES`] frames of each clip and is checked against the
//! same frames of the official 16-frame outputs: the model is causal in time (case f: one
//! frame per call gives the whole clip's tokens), so a prefix's tokens are the clip's first
//! tokens. That keeps these engine-level tests to minutes on lavapipe; the Python suite
//! (tests/test_official_fixtures.py) runs the whole clips through the same engine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use super::engine::{Engine, Frames, GenerateOutput, GenerateParams, fixtures_dir};

struct Case {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, (Vec<usize>, Vec<i64>)>,
    bools: HashMap<String, (Vec<usize>, Vec<bool>)>,
    u8s: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

fn case_path(name: &str) -> PathBuf {
    fixtures_dir()
        .join("cases")
        .join(format!("{name}.safetensors"))
}

fn load_case(name: &str) -> Case {
    let path = case_path(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} missing ({e}); set AUTOGAZE_FIXTURES",
            path.display()
        )
    });
    let st = SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut c = Case {
        f32s: HashMap::new(),
        i64s: HashMap::new(),
        bools: HashMap::new(),
        u8s: HashMap::new(),
    };
    for (k, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let d = v.data();
        match v.dtype() {
            Dtype::F32 => {
                c.f32s.insert(k, (shape, bytemuck::pod_collect_to_vec(d)));
            }
            Dtype::I64 => {
                c.i64s.insert(k, (shape, bytemuck::pod_collect_to_vec(d)));
            }
            Dtype::BOOL => {
                c.bools
                    .insert(k, (shape, d.iter().map(|b| *b != 0).collect()));
            }
            Dtype::U8 => {
                c.u8s.insert(k, (shape, d.to_vec()));
            }
            other => panic!("unexpected dtype {other:?} for {k}"),
        }
    }
    c
}

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let dir = fixtures_dir().join("model");
        let (cfg, w) = crate::weights::load_model_dir(&dir)
            .unwrap_or_else(|e| panic!("fixture model {}: {e}", dir.display()));
        Engine::new(&cfg, &w).unwrap_or_else(|e| panic!("engine: {e}"))
    })
}

/// The processor formula for 224-sized frames: [B, T, H, W, 3] uint8 -> [B, T, 3, H, W].
fn pixels_from_raw(raw: &[u8], shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let (b, t, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let mut out = vec![0.0f32; b * t * 3 * h * w];
    for f in 0..b * t {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let v = raw[((f * h + y) * w + x) * 3 + ch] as f64;
                    let s = (v * (1.0 / 127.5)) as f32 - 1.0;
                    out[((f * 3 + ch) * h + y) * w + x] = (s - mean[ch]) / std[ch];
                }
            }
        }
    }
    (out, vec![b, t, 3, h, w])
}

/// Frames of each clip the generate tests run (see the module docs).
const FRAMES: usize = 3;

fn case_a_pixels() -> (Vec<f32>, Vec<usize>) {
    let a = load_case("a");
    let (shape, raw) = &a.u8s["raw_frames"];
    pixels_from_raw(raw, shape)
}

/// Case a's first [`FRAMES`] frames (the generate and score tests' clip).
fn case_a_prefix() -> (Vec<f32>, Vec<usize>) {
    let (px, shape) = case_a_pixels();
    first_frames(&px, &shape, FRAMES)
}

/// The first `t` frames of a [B, T, C, H, W] clip.
fn first_frames(px: &[f32], shape: &[usize], t: usize) -> (Vec<f32>, Vec<usize>) {
    let (b, full) = (shape[0], shape[1]);
    assert!(t <= full, "{t} frames of a {full}-frame clip");
    let frame: usize = shape[2..].iter().product();
    let mut out = Vec::with_capacity(b * t * frame);
    for r in 0..b {
        out.extend_from_slice(&px[r * full * frame..(r * full + t) * frame]);
    }
    let mut s = shape.to_vec();
    s[1] = t;
    (out, s)
}

fn max_diff(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    let mut worst = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > worst.0 {
            worst = (if d.is_nan() { f32::INFINITY } else { d }, i);
        }
    }
    worst
}

/// `got`'s tokens equal those of the case's first `got.num_gazing_each_frame.len()` frames.
fn check_tokens(name: &str, got: &GenerateOutput, c: &Case) {
    let (shape, pos) = &c.i64s["gazing_pos"];
    let (_, pad) = &c.bools["if_padded_gazing"];
    let (_, counts) = &c.i64s["num_gazing_each_frame"];
    let frames = got.num_gazing_each_frame.len();
    assert!(
        frames <= counts.len(),
        "{name}: {frames} frames, the fixture has {}",
        counts.len()
    );
    let want_counts: Vec<usize> = counts[..frames].iter().map(|v| *v as usize).collect();
    assert_eq!(
        got.num_gazing_each_frame, want_counts,
        "{name}: num_gazing_each_frame"
    );
    let (rows, full) = (shape[0], shape[1]);
    let n: usize = want_counts.iter().sum();
    assert_eq!(got.batch, rows, "{name}: rows");
    assert_eq!(got.gazing_pos.len(), rows * n, "{name}: gazing_pos length");
    assert_eq!(got.if_padded_gazing.len(), rows * n, "{name}: flags length");
    for r in 0..rows {
        for i in 0..n {
            let (g, w) = (got.gazing_pos[r * n + i], pos[r * full + i]);
            assert_eq!(g, w, "{name}: gazing_pos[{r}, {i}]");
            let (g, w) = (got.if_padded_gazing[r * n + i], pad[r * full + i]);
            assert_eq!(g, w, "{name}: if_padded_gazing[{r}, {i}]");
        }
    }
    eprintln!(
        "{name}: {n} slots x {rows} rows match exactly (frames {:?})",
        got.num_gazing_each_frame
    );
}

fn params(t: usize, ratio: f32, req: Option<f32>) -> GenerateParams {
    GenerateParams {
        gazing_ratio_each_frame: vec![ratio; t],
        task_loss_requirement: req,
    }
}

#[test]
fn parity_embed_a_and_d() {
    let e = engine();
    let (px, shape) = case_a_pixels();
    let a = load_case("a");
    let got = e.embed(&px, &shape).expect("embed a");
    let (d, i) = max_diff(&got, &a.f32s["vision_embeds"].1);
    eprintln!("case a vision_embeds: max abs diff {d:.3e} (index {i})");
    assert!(d <= 1e-4, "case a vision_embeds: index {i}: diff {d}");

    // Same through the chunked path (vision in chunks of 5 frames, the conv ring carried).
    e.set_max_chunk_frames(5);
    let chunked = e.embed(&px, &shape);
    e.set_max_chunk_frames(0);
    let (dc, i) = max_diff(
        &chunked.expect("embed a chunked"),
        &a.f32s["vision_embeds"].1,
    );
    eprintln!("case a vision_embeds in chunks of 5 frames: max abs diff {dc:.3e} (index {i})");
    assert!(
        dc <= 1e-4,
        "case a chunked vision_embeds: index {i}: diff {dc}"
    );

    let dcase = load_case("d");
    let (shape, px) = &dcase.f32s["pixel_values"];
    let got = e.embed(px, shape).expect("embed d");
    let (dd, i) = max_diff(&got, &dcase.f32s["vision_embeds"].1);
    eprintln!("case d (224x398 input) vision_embeds: max abs diff {dd:.3e} (index {i})");
    assert!(dd <= 1e-4, "case d vision_embeds: index {i}: diff {dd}");
}

/// Case a: tokens exact and every step's raw logits within 1e-3 of the official ones.
#[test]
fn parity_generate_a_with_step_logits() {
    let e = engine();
    let (px, shape) = case_a_prefix();
    let a = load_case("a");
    let (out, steps, stats) = e
        .generate_debug(&px, &shape, &params(shape[1], 0.75, Some(0.7)))
        .expect("generate a");
    let (lshape, want) = &a.f32s["step_logits"];
    // One row (B = 1): the debug output is [steps, 2670] (10 x 266 logits, then 10 task
    // losses); the official step_logits [steps, 2660] are the logits of every step of the clip.
    let row = lshape[1];
    let stride = row + 10;
    assert_eq!(
        steps.len() % stride,
        0,
        "debug logits hold {} values",
        steps.len()
    );
    let rows = steps.len() / stride;
    assert!(
        rows > 0 && rows < lshape[0],
        "{rows} steps for {FRAMES} frames, the clip has {}",
        lshape[0]
    );
    let mut worst = (0.0f32, 0usize, 0usize);
    for r in 0..rows {
        let g = &steps[r * stride..r * stride + row];
        let w = &want[r * row..(r + 1) * row];
        let (d, i) = max_diff(g, w);
        if d > worst.0 {
            worst = (d, r, i);
        }
    }
    eprintln!(
        "case a step_logits ({rows} steps): max abs diff {:.3e} (step {}, index {}); {} dispatches, {} submits, recording {} us of {} us",
        worst.0, worst.1, worst.2, stats.dispatches, stats.submits, stats.record_us, stats.total_us
    );
    assert!(
        worst.0 <= 1e-3,
        "case a step_logits: step {} index {}: diff {}",
        worst.1,
        worst.2,
        worst.0
    );
    check_tokens("a", &out, &a);
}

#[test]
fn parity_generate_b_ratio_only() {
    let (px, shape) = case_a_prefix();
    let out = engine()
        .generate(&px, &shape, &params(shape[1], 0.75, None))
        .expect("generate b");
    check_tokens("b", &out, &load_case("b"));
}

/// The timestamp profiler changes nothing and accounts for every dispatch.
#[test]
fn profiled_generate_b_is_the_same_generation() {
    let e = engine();
    let c = load_case("b");
    let (px, shape) = case_a_prefix();
    let p = params(shape[1], 0.75, None);
    if !e.context().info.timestamp_inside_passes {
        let err = e
            .generate_profiled(&px, &shape, &p)
            .expect_err("profiling must fail");
        assert!(err.to_string().contains("timestamp"), "{err}");
        return;
    }
    let (out, kernels, stats) = e.generate_profiled(&px, &shape, &p).expect("profiled");
    check_tokens("b", &out, &c);
    assert_eq!(
        kernels.iter().map(|k| k.dispatches).sum::<usize>(),
        stats.dispatches
    );
    assert!(
        kernels
            .iter()
            .all(|k| k.total_us.is_finite() && k.total_us >= 0.0)
    );
    assert!(kernels.iter().any(|k| k.kernel.starts_with("attention::")));
    assert!(kernels.windows(2).all(|w| w[0].total_us >= w[1].total_us));
}

/// A lost device fails every later call with `Error::Device` saying to reload (no panic, no
/// hang); a new engine on a new device works.
#[test]
fn device_lost_fails_cleanly_and_a_reload_works() {
    let load = || {
        let (cfg, w) = crate::weights::load_model(&fixtures_dir().join("model")).expect("model");
        Engine::new(&cfg, &w).expect("engine")
    };
    let e = load();
    let px = vec![0.5f32; 3 * 32 * 32];
    let shape = [1usize, 1, 3, 32, 32];
    let p = params(1, 0.05, None);
    let before = e.generate(&px, &shape, &p).expect("generate");
    e.context().simulate_device_lost();
    for r in [
        e.generate(&px, &shape, &p).map(|_| ()),
        e.embed(&px, &shape).map(|_| ()),
        e.session(1, 2, (32, 32), None, None).map(|_| ()),
    ] {
        let err = r.expect_err("a lost device must fail");
        assert!(matches!(err, crate::Error::Device(_)), "{err}");
        assert!(err.to_string().contains("load it again"), "{err}");
    }
    let again = load().generate(&px, &shape, &p).expect("reloaded");
    assert_eq!(again.gazing_pos, before.gazing_pos);
}

/// Out of memory while a call allocates: that call fails with `Error::Device`, the engine
/// stays usable and later calls give the tokens of an undisturbed engine.
#[test]
fn out_of_memory_fails_the_call_and_the_engine_stays_usable() {
    let (cfg, w) = crate::weights::load_model(&fixtures_dir().join("model")).expect("model");
    let e = Engine::new(&cfg, &w).expect("engine");
    let small = vec![0.25f32; 3 * 32 * 32];
    let big = vec![0.75f32; 2 * 2 * 3 * 40 * 40];
    let (s_small, s_big) = ([1usize, 1, 3, 32, 32], [2usize, 2, 3, 40, 40]);
    let want_small = e
        .generate(&small, &s_small, &params(1, 0.05, None))
        .expect("small");
    e.context().simulate_oom_on_next_allocation();
    // A new shape needs a new workspace: its first allocation fails.
    let err = e
        .generate(&big, &s_big, &params(2, 0.05, None))
        .expect_err("out of memory");
    assert!(matches!(err, crate::Error::Device(_)), "{err}");
    assert!(
        err.to_string()
            .contains("out of GPU memory while allocating"),
        "{err}"
    );
    let got_big = e
        .generate(&big, &s_big, &params(2, 0.05, None))
        .expect("retry");
    let fresh = Engine::new(&cfg, &w).expect("engine");
    let want_big = fresh
        .generate(&big, &s_big, &params(2, 0.05, None))
        .expect("fresh");
    assert_eq!(got_big.gazing_pos, want_big.gazing_pos);
    let again = e
        .generate(&small, &s_small, &params(1, 0.05, None))
        .expect("small again");
    assert_eq!(again.gazing_pos, want_small.gazing_pos);
}

#[test]
fn parity_generate_c_requirement_only() {
    let (px, shape) = case_a_prefix();
    let out = engine()
        .generate(&px, &shape, &params(shape[1], 1.0, Some(0.7)))
        .expect("generate c");
    check_tokens("c", &out, &load_case("c"));
}

/// The processor's float value of each uint8 level per channel (the release config: x / 127.5
/// - 1, then ImageNet normalisation), as `AutoGazeProcessor.normalization_table` gives it.
fn release_lut() -> Vec<f32> {
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    (0..768)
        .map(|i| {
            let (c, v) = (i / 256, (i % 256) as f64);
            ((v * (1.0 / 127.5)) as f32 - 1.0 - mean[c]) / std[c]
        })
        .collect()
}

/// Case a from its uint8 frames through the GPU preprocessing (224x224 frames: the
/// normalisation-only pass): the official tokens, also with the frames uploaded in chunks
/// of 2 frames per submit.
#[test]
fn parity_generate_a_from_uint8_frames() {
    let e = engine();
    let a = load_case("a");
    let (shape, raw) = &a.u8s["raw_frames"];
    // B = 1: the first FRAMES frames are the first bytes.
    let frame_bytes: usize = shape[2..].iter().product();
    let mut shape = shape.clone();
    shape[1] = FRAMES;
    let raw = &raw[..FRAMES * frame_bytes];
    let lut = release_lut();
    let frames = Frames::uint8(raw, &shape, (shape[2], shape[3]), &lut).expect("frames");
    let p = params(shape[1], 0.75, Some(0.7));
    check_tokens(
        "a (uint8)",
        &e.generate_frames(&frames, &p).expect("generate"),
        &a,
    );
    e.set_max_chunk_frames(2);
    let chunked = e.generate_frames(&frames, &p);
    e.set_max_chunk_frames(0);
    check_tokens(
        "a (uint8, chunks of 2)",
        &chunked.expect("generate chunked"),
        &a,
    );
}

/// Bad uint8 input is refused with an input error, never a panic.
#[test]
fn uint8_frames_are_checked() {
    let lut = release_lut();
    let bytes = vec![0u8; 2 * 3 * 4 * 3];
    assert!(Frames::uint8(&bytes, &[1, 2, 3, 4, 3], (5, 6), &lut).is_ok());
    for (shape, out, what) in [
        (vec![1usize, 2, 3, 4], (5usize, 6usize), "rank"),
        (vec![1, 2, 3, 4, 4], (5, 6), "channels"),
        (vec![1, 2, 3, 4, 2], (5, 6), "length"),
        (vec![1, 0, 3, 4, 3], (5, 6), "empty"),
        (vec![1, 2, 3, 4, 3], (0, 6), "empty output"),
        (vec![usize::MAX, 2, 3, 4, 3], (5, 6), "overflow"),
    ] {
        let err = Frames::uint8(&bytes, &shape, out, &lut).expect_err(what);
        assert!(
            matches!(err, crate::error::Error::Input(_)),
            "{what}: {err}"
        );
    }
    assert!(Frames::uint8(&bytes, &[1, 2, 3, 4, 3], (5, 6), &lut[..767]).is_err());
    let mut bad = lut.clone();
    bad[9] = f32::NAN;
    assert!(Frames::uint8(&bytes, &[1, 2, 3, 4, 3], (5, 6), &bad).is_err());
}

/// Score input is checked against the video: frame count, slots per frame, ids.
#[test]
fn score_input_is_checked() {
    let e = engine();
    let px = vec![0.0f32; 2 * 3 * 8 * 8];
    let shape = [1usize, 2, 3, 8, 8];
    for (lens, toks, what) in [
        (vec![2usize], vec![1u32, 2], "frame count"),
        (vec![2, 1], vec![1, 2], "token count"),
        (vec![266, 0], vec![0; 266], "slots per frame"),
        (vec![1, 1], vec![1, 266], "id"),
    ] {
        let err = e.score(&px, &shape, &lens, &toks).expect_err(what);
        assert!(
            matches!(err, crate::error::Error::Input(_)),
            "{what}: {err}"
        );
    }
    let (gp, tl) = e.score(&px, &shape, &[0, 0], &[]).expect("no slots");
    assert!(gp.is_empty() && tl.is_empty());
}

#[test]
fn parity_generate_e_batch() {
    let c = load_case("e");
    let (shape, raw) = &c.u8s["raw_frames"];
    let (px, shape) = pixels_from_raw(raw, shape);
    let (px, shape) = first_frames(&px, &shape, FRAMES);
    let out = engine()
        .generate(&px, &shape, &params(shape[1], 0.75, Some(0.7)))
        .expect("generate e");
    check_tokens("e", &out, &c);
}

/// Teacher-forced scores (SPEC §5b) of the official gazes of `name`, against its
/// `tf_gaze_probs` / `tf_task_loss_prediction` at the SPEC tolerances.
/// The clip `px` may be the first frames of the case's: the scores of those frames' gazes
/// are the first scores (causal).
fn check_scores(name: &str, px: &[f32], shape: &[usize]) {
    let c = load_case(name);
    let (pshape, pos) = &c.i64s["gazing_pos"];
    let (_, counts) = &c.i64s["num_gazing_each_frame"];
    let lens: Vec<usize> = counts[..shape[1]].iter().map(|v| *v as usize).collect();
    let (b, full) = (pshape[0], pshape[1]);
    let n: usize = lens.iter().sum();
    // gazing_pos holds token + 265 t (pads 265 (t + 1)): back to ids within the frame.
    let mut tokens = Vec::with_capacity(b * n);
    for r in 0..b {
        let mut s = 0;
        for (t, &len) in lens.iter().enumerate() {
            for _ in 0..len {
                tokens.push((pos[r * full + s] - 265 * t as i64) as u32);
                s += 1;
            }
        }
    }
    let (gp, tl) = engine()
        .score(px, shape, &lens, &tokens)
        .unwrap_or_else(|e| panic!("score {name}: {e}"));
    let first = |v: &[f32]| -> Vec<f32> {
        (0..b)
            .flat_map(|r| v[r * full..r * full + n].to_vec())
            .collect()
    };
    let (dp, ip) = max_diff(&gp, &first(&c.f32s["tf_gaze_probs"].1));
    let (dl, il) = max_diff(&tl, &first(&c.f32s["tf_task_loss_prediction"].1));
    eprintln!(
        "case {name} scores: gaze_probs max abs diff {dp:.3e} (index {ip}), task loss {dl:.3e} (index {il})"
    );
    assert!(
        dp <= 2e-4,
        "case {name} tf_gaze_probs: index {ip}: diff {dp}"
    );
    assert!(
        dl <= 5e-5,
        "case {name} tf_task_loss_prediction: index {il}: diff {dl}"
    );
}

/// Scores of case a and of the batch case e (first FRAMES frames), and of case a again with
/// the vision in chunks of 2 frames (several submits).
#[test]
fn parity_score_a_and_e() {
    let (px, shape) = case_a_prefix();
    check_scores("a", &px, &shape);
    engine().set_max_chunk_frames(2);
    check_scores("a", &px, &shape);
    engine().set_max_chunk_frames(0);
    let c = load_case("e");
    let (rshape, raw) = &c.u8s["raw_frames"];
    let (px, shape) = pixels_from_raw(raw, rshape);
    let (px, shape) = first_frames(&px, &shape, FRAMES);
    check_scores("e", &px, &shape);
}

#[test]
fn parity_generate_g1_tiles() {
    let c = load_case("g1");
    let (rshape, raw) = &c.u8s["raw_frames"];
    let (px, shape) = pixels_from_raw(raw, rshape);
    // 'B (nt t) C (nh h) (nw w) -> (B nt nh nw) t C h w' with t = 1, h = w = 224.
    let (t, s) = (shape[1], 224usize);
    let (big_h, big_w) = (shape[3], shape[4]);
    let (nh, nw) = (big_h / s, big_w / s);
    let mut tiles = Vec::with_capacity(px.len());
    for tile_t in 0..t {
        for i in 0..nh {
            for j in 0..nw {
                for ch in 0..3 {
                    for y in 0..s {
                        let row = ((tile_t * 3 + ch) * big_h + i * s + y) * big_w + j * s;
                        tiles.extend_from_slice(&px[row..row + s]);
                    }
                }
            }
        }
    }
    let tshape = vec![t * nh * nw, 1, 3, s, s];
    let out = engine()
        .generate(&tiles, &tshape, &params(1, 0.75, Some(0.7)))
        .expect("generate g1");
    check_tokens("g1", &out, &c);
}

/// Case f: the clip of case a streamed one frame per call gives case a's tokens, frame by
/// frame (`frameTT_*` keys; the first FRAMES frames).
#[test]
fn parity_streaming_f() {
    let e = engine();
    let (px, shape) = case_a_pixels();
    let f = load_case("f");
    let t = FRAMES;
    let fsz = 3 * shape[3] * shape[4];
    let mut sess = e
        .session(1, t, (shape[3], shape[4]), None, Some(0.7))
        .expect("session");
    let mut all_pos = Vec::new();
    let mut all_pad = Vec::new();
    let mut counts = Vec::new();
    for tt in 0..t {
        let frame = &px[tt * fsz..(tt + 1) * fsz];
        let o = sess
            .step(frame, &[1, 3, shape[3], shape[4]], 0.75)
            .expect("step");
        let (_, wpos) = &f.i64s[&format!("frame{tt:02}_gazing_pos")];
        let (_, wpad) = &f.bools[&format!("frame{tt:02}_if_padded_gazing")];
        assert_eq!(&o.tokens, wpos, "f: frame {tt} gazing_pos");
        assert_eq!(&o.if_padded, wpad, "f: frame {tt} if_padded_gazing");
        all_pos.extend(o.tokens.iter().map(|v| v + 265 * tt as i64));
        all_pad.extend(o.if_padded);
        counts.push(o.num_gazing);
    }
    let out = GenerateOutput {
        batch: 1,
        gazing_pos: all_pos,
        if_padded_gazing: all_pad,
        num_gazing_each_frame: counts,
    };
    check_tokens("f (streamed)", &out, &f);
    check_tokens("f = a", &out, &load_case("a"));
}

/// Timings (not a test of speed): `cargo test --release -- --ignored bench_ --nocapture`.
/// Warm medians of whole `generate` calls for case a (defaults) and case b (no stop), and
/// per-frame latency of a streaming session.
#[test]
#[ignore]
fn bench_generate_timings() {
    let e = engine();
    eprintln!("device: {:?}", e.context().info);
    let (px, shape) = case_a_pixels();
    for (name, p) in [
        ("a: 0.75 + 0.7", params(shape[1], 0.75, Some(0.7))),
        ("b: 0.75 only", params(shape[1], 0.75, None)),
    ] {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let (_, _, s) = e.generate_debug(&px, &shape, &p).expect("generate");
            times.push(s.total_us);
            last = Some(s);
        }
        times.sort();
        let s = last.unwrap_or_default();
        eprintln!(
            "{name}: median {:.2} ms (runs {:?} us); recording {} us; {} dispatches, {} submits",
            times[2] as f64 / 1000.0,
            times,
            s.record_us,
            s.dispatches,
            s.submits
        );
    }
    let fsz = 3 * shape[3] * shape[4];
    let mut sess = e
        .session(1, shape[1], (shape[3], shape[4]), None, Some(0.7))
        .expect("session");
    let mut times = Vec::new();
    for tt in 0..shape[1] {
        let t0 = std::time::Instant::now();
        sess.step(
            &px[tt * fsz..(tt + 1) * fsz],
            &[1, 3, shape[3], shape[4]],
            0.75,
        )
        .expect("step");
        times.push(t0.elapsed().as_micros());
    }
    let mut sorted = times.clone();
    sorted.sort();
    eprintln!(
        "streaming per-frame: median {} us (frames {:?})",
        sorted[sorted.len() / 2],
        times
    );
}

/// Per-dispatch timings: `cargo test --release -- --ignored bench_kernels --nocapture`.
#[test]
#[ignore]
fn bench_kernels() {
    let e = engine();
    let (px, shape) = case_a_pixels();
    let rows = e
        .profile_kernels(&px, &shape, &params(shape[1], 0.75, Some(0.7)), 50)
        .expect("profile");
    eprintln!("device: {}", e.context().info.name);
    for (name, us) in rows {
        eprintln!("{name:40} {us:10.1} us");
    }
}
