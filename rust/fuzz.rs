//! Property tests ("fuzzing") of the file loaders (issue 6): `AutoGazeConfig` from JSON text,
//! bytes and files, and `Weights` from safetensors bytes and files.
//!
//! Each property asserts that the loader never panics, that a refusal is only the documented
//! variant (`Error::Config` / `Error::Weights`, or `Error::Io` of that role for files), and
//! that valid input loads to exactly the values written. Inputs are random bytes, mutations of
//! the seed corpus `tests/fuzz_corpus/` (shared with the hypothesis tests), mutations of the
//! official fixture, and random valid models.
//!
//! The case counts are small so that `cargo test` stays fast (a few seconds in release);
//! `PROPTEST_CASES=N` runs every property N times (docs/reliability.md has a long run).
//! A failing case is saved (as its RNG seed) in `proptest-regressions/fuzz.txt` and replayed
//! first on every later run: commit it with the fix.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

use crate::config::tests::fixture_model_dir;
use crate::config::{AutoGazeConfig, CONFIG_FILE, tokens_each_scale};
use crate::error::{Error, FileRole};
use crate::weights::{Weights, expected_tensors, weights_path};

/// Relative to the crate root, where `cargo test` runs.
const REGRESSIONS: &str = "proptest-regressions/fuzz.txt";

/// `PROPTEST_CASES` when set, else this property's CI default.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus")
}

/// (file name, bytes) of the corpus files in `sub` ending with `ext`, sorted by name.
fn corpus(sub: &str, ext: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir().join(sub);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == ext)
                && p.file_name() != Some(std::ffi::OsStr::new(CONFIG_FILE))
        })
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read corpus file"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

/// The corpus configs and weights, read once for all cases.
fn config_seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| corpus("config", "json"))
}

fn weights_seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| corpus("weights", "safetensors"))
}

/// The config the weights corpus is checked against.
fn corpus_weights_config() -> AutoGazeConfig {
    AutoGazeConfig::load(&corpus_dir().join("weights")).expect("corpus weights config loads")
}

fn fixture_config_json() -> Value {
    let text = std::fs::read_to_string(fixture_model_dir().join(CONFIG_FILE)).expect("read");
    serde_json::from_str(&text).expect("fixture config is JSON")
}

fn fixture_config() -> AutoGazeConfig {
    AutoGazeConfig::load(&fixture_model_dir()).expect("fixture config loads")
}

/// The fixture checkpoint (13 MB), read once for all cases.
fn fixture_weights_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        std::fs::read(weights_path(&fixture_model_dir())).expect("read fixture weights")
    })
}

// ---------------------------------------------------------------------------------------
// What every outcome must look like.

/// A config that loaded must be consistent, and everything sized from it must not panic.
fn check_loaded_config(c: &AutoGazeConfig) {
    c.validate("loaded").expect("a loaded config validates");
    let counts = c.num_tokens_each_scale();
    assert_eq!(counts.iter().sum::<usize>(), c.num_vision_tokens_each_frame);
    assert!(c.grid_each_scale().iter().all(|&g| g > 0));
    let _ = c.to_json();
    let _ = expected_tensors(c);
}

fn check_config_result(r: crate::Result<AutoGazeConfig>, from_file: bool) {
    match r {
        Ok(c) => check_loaded_config(&c),
        Err(Error::Config { .. }) => {}
        Err(Error::Io {
            role: FileRole::Config,
            ..
        }) if from_file => {}
        Err(e) => panic!("undocumented error for a config: {e:?}"),
    }
}

/// Weights that loaded match the config's names and shapes and are finite.
fn check_weights_result(r: crate::Result<Weights>, config: &AutoGazeConfig, from_file: bool) {
    match r {
        Ok(w) => {
            let expected = expected_tensors(config);
            assert_eq!(w.len(), expected.len());
            for (name, shape) in &expected {
                let t = w.get(name).expect("expected tensor present");
                assert_eq!(&t.shape, shape, "{name}");
                assert_eq!(t.numel(), shape.iter().product::<usize>(), "{name}");
                assert!(t.data.iter().all(|x| x.is_finite()), "{name} non-finite");
            }
        }
        Err(Error::Weights { .. }) => {}
        Err(Error::Io {
            role: FileRole::Weights,
            ..
        }) if from_file => {}
        Err(e) => panic!("undocumented error for weights: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Mutations.

/// One edit of a byte string: most land in the first `hot` bytes (JSON text, or the
/// safetensors header), where the parsing is.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// A decimal number spliced in (a size field or offset gone wild).
    Number(usize, i128),
}

fn edits(hot: usize) -> impl Strategy<Value = Vec<Edit>> {
    let pos = prop_oneof![3 => 0..hot.max(1), 1 => any::<usize>()];
    let edit = (
        pos,
        0u8..6,
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 1..8),
        1usize..32,
    )
        .prop_flat_map(|(p, op, byte, bytes, n)| {
            let number = prop::sample::select(vec![
                -1i128,
                0,
                3,
                1 << 31,
                (1 << 32) + 1,
                1 << 63,
                u64::MAX as i128,
                10i128.pow(30),
            ]);
            number.prop_map(move |num| match op {
                0 => Edit::Flip(p, byte % 8),
                1 => Edit::Set(p, byte),
                2 => Edit::Insert(p, bytes.clone()),
                3 => Edit::Delete(p, n),
                4 => Edit::Truncate(p),
                _ => Edit::Number(p, num),
            })
        });
    prop::collection::vec(edit, 1..5)
}

fn apply(original: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut d = original.to_vec();
    for e in edits {
        if d.is_empty() {
            break;
        }
        let at = |p: usize| p % d.len();
        match e {
            Edit::Flip(p, bit) => {
                let i = at(*p);
                d[i] ^= 1 << bit;
            }
            Edit::Set(p, b) => {
                let i = at(*p);
                d[i] = *b;
            }
            Edit::Insert(p, bytes) => {
                let i = at(*p);
                d.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(p, n) => {
                let i = at(*p);
                let end = (i + n).min(d.len());
                d.drain(i..end);
            }
            Edit::Truncate(p) => {
                let i = at(*p);
                d.truncate(i);
            }
            Edit::Number(p, num) => {
                let i = at(*p);
                d.splice(i..i, num.to_string().into_bytes());
            }
        }
    }
    d
}

/// JSON values a mutated config key may take.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            0u64,
            1,
            2,
            3,
            4,
            16,
            32,
            192,
            224,
            265,
            266,
            65_536,
            65_537,
            1 << 32,
            u64::MAX
        ])
        .prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "[a-z0-9+ .-]{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "32+64+112+224",
            "32+64",
            "224",
            "",
            "silu",
            "llama3",
            "default",
            "fixed",
            "none",
        ])
        .prop_map(Value::from),
        prop::collection::vec(0u64..300, 0..4).prop_map(|v| json!(v)),
        Just(json!({})),
    ]
}

/// JSON pointers of every node (objects, arrays and leaves) of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// Replaces (or, with `None`, deletes) the node at `pointer`; the whole document for "".
fn edit_json(doc: &mut Value, pointer: &str, new: Option<Value>) {
    if pointer.is_empty() {
        *doc = new.unwrap_or(Value::Null);
        return;
    }
    let Some((parent, key)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    match (doc.pointer_mut(parent), new) {
        (Some(Value::Object(m)), Some(v)) => {
            m.insert(key, v);
        }
        (Some(Value::Object(m)), None) => {
            m.remove(&key);
        }
        (Some(Value::Array(a)), new) => {
            if let Ok(i) = key.parse::<usize>()
                && i < a.len()
            {
                match new {
                    Some(v) => a[i] = v,
                    None => {
                        a.remove(i);
                    }
                }
            }
        }
        _ => {} // an earlier edit removed or retyped the parent
    }
}

// ---------------------------------------------------------------------------------------
// Random valid models.

/// The numbers of a small valid config.
#[derive(Debug, Clone)]
struct Dims {
    /// Grid side of each scale, ascending; V = sum of squares.
    grids: Vec<usize>,
    scale_unit: usize,
    heads: usize,
    /// Half the head dim (it must be even).
    half_head: usize,
    intermediate: usize,
    layers: usize,
    kernel: usize,
    side: usize,
    k: usize,
    max_frames: usize,
    task_loss: Option<f64>,
    ratio: Option<f64>,
    llama3: bool,
    omit_head_dim: bool,
    omit_kv_heads: bool,
    max_positions: usize,
}

impl Dims {
    fn v(&self) -> usize {
        self.grids.iter().map(|g| g * g).sum()
    }
    fn hidden(&self) -> usize {
        self.heads * 2 * self.half_head
    }
    fn scales(&self) -> Vec<usize> {
        self.grids.iter().map(|g| g * self.scale_unit).collect()
    }
}

fn dims() -> impl Strategy<Value = Dims> {
    (
        (prop::collection::vec(1usize..5, 1..4), 1usize..40),
        (1usize..4, 1usize..4, 1usize..24, 1usize..3),
        (
            prop::sample::select(vec![1usize, 2, 4, 8]),
            1usize..4,
            1usize..20,
        ),
        (
            prop::option::of(0.0f64..2.0),
            prop::option::of(0.001f64..=1.0),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            1usize..1_000_000,
        ),
    )
        .prop_map(
            |(
                (mut grids, scale_unit),
                (heads, half_head, intermediate, layers),
                (kernel, side, max_frames),
                (task_loss, ratio, llama3, omit_head_dim, omit_kv_heads, max_positions),
            )| {
                grids.sort_unstable();
                Dims {
                    grids,
                    scale_unit,
                    heads,
                    half_head,
                    intermediate,
                    layers,
                    kernel,
                    side,
                    k: 1,
                    max_frames,
                    task_loss,
                    ratio,
                    llama3,
                    omit_head_dim,
                    omit_kv_heads,
                    max_positions,
                }
            },
        )
        .prop_flat_map(|d| {
            let v = d.v();
            (Just(d), 1..=v.min(12))
        })
        .prop_map(|(mut d, k)| {
            d.k = k;
            d
        })
}

/// The released config.json with `d`'s numbers.
fn config_json(d: &Dims) -> Value {
    let mut c = fixture_config_json();
    let v = d.v();
    let scales: Vec<String> = d.scales().iter().map(|s| s.to_string()).collect();
    c["scales"] = json!(scales.join("+"));
    c["num_vision_tokens_each_frame"] = json!(v);
    c["max_num_frames"] = json!(d.max_frames);
    c["has_task_loss_requirement_during_inference"] = json!(d.task_loss.is_some());
    if let Some(req) = d.task_loss {
        c["task_loss_requirement_config"]["fixed"]["task_loss_requirement"] = json!(req);
    }
    match d.ratio {
        Some(r) => {
            c["gazing_ratio_config"]["sample_strategy_during_inference"] = json!("fixed");
            c["gazing_ratio_config"]["fixed"]["gazing_ratio"] = json!(r);
        }
        None => c["gazing_ratio_config"]["sample_strategy_during_inference"] = json!("uniform"),
    }
    let g = &mut c["gaze_model_config"];
    g["input_img_size"] = json!(d.kernel * d.side);
    g["num_vision_tokens_each_frame"] = json!(v);
    let h = d.hidden();
    let vis = &mut g["vision_model_config"];
    vis["hidden_dim"] = json!(h);
    vis["out_dim"] = json!(h);
    vis["kernel_size"] = json!(d.kernel);
    g["connector_config"] = json!({"hidden_dim": h, "num_tokens": d.side * d.side});
    let dec = &mut g["gaze_decoder_config"];
    dec["vocab_size"] = json!(v + 1);
    dec["eos_token_id"] = json!(v);
    dec["hidden_size"] = json!(h);
    dec["intermediate_size"] = json!(d.intermediate);
    dec["num_hidden_layers"] = json!(d.layers);
    dec["num_attention_heads"] = json!(d.heads);
    dec["num_key_value_heads"] = json!(d.heads);
    dec["head_dim"] = json!(2 * d.half_head);
    dec["num_multi_token_pred"] = json!(d.k);
    dec["max_position_embeddings"] = json!(d.max_positions);
    if !d.llama3 {
        dec["rope_scaling"] = Value::Null;
    }
    let dec = dec.as_object_mut().expect("decoder object");
    if d.omit_head_dim {
        dec.remove("head_dim");
    }
    if d.omit_kv_heads {
        dec.remove("num_key_value_heads");
    }
    c
}

/// Whether the float64 split of the scales gives exactly the squares (it can round down).
fn split_is_exact(d: &Dims) -> bool {
    let want: Vec<usize> = d.grids.iter().map(|g| g * g).collect();
    tokens_each_scale(&d.scales(), d.v()) == want
}

/// Values for one tensor: mostly small, with the edge values every dtype holds exactly or
/// finitely (signed zero, f16's max, subnormal-ish magnitudes).
fn tensor_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            match s % 16 {
                0 => 0.0,
                1 => -0.0,
                2 => 65504.0,
                3 => -1e-7,
                _ => ((s >> 11) as f64 / (1u64 << 53) as f64 * 2000.0 - 1000.0) as f32,
            }
        })
        .collect()
}

fn encode(values: &[f32], dtype: Dtype) -> (Vec<u8>, Vec<f32>) {
    match dtype {
        Dtype::F16 => (
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        ),
        Dtype::BF16 => (
            values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        ),
        _ => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.to_vec(),
        ),
    }
}

/// A random valid safetensors file for `config`, and the f32 values it must load to.
fn valid_weights(
    config: &AutoGazeConfig,
    seed: u64,
    dtypes: &[Dtype],
    with_extra: bool,
    with_metadata: bool,
) -> (Vec<u8>, Vec<(String, Vec<f32>)>) {
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut want = Vec::new();
    for (i, (name, shape)) in expected_tensors(config).into_iter().enumerate() {
        let dtype = dtypes[i % dtypes.len()];
        let values = tensor_values(shape.iter().product(), seed.wrapping_add(i as u64 * 7919));
        let (bytes, loaded) = encode(&values, dtype);
        want.push((name.clone(), loaded));
        raw.push((name, dtype, shape, bytes));
    }
    if with_extra {
        // Ignored by the loader: recomputed from the config.
        raw.push((
            "gazing_model.gaze_decoder.model.rotary_emb.inv_freq".into(),
            Dtype::F32,
            vec![2],
            encode(&[1.0, 0.5], Dtype::F32).0,
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    let metadata = with_metadata.then(|| [("format".to_string(), "pt".to_string())].into());
    (
        safetensors::serialize(views, metadata).expect("serialize"),
        want,
    )
}

fn dtype_list() -> impl Strategy<Value = Vec<Dtype>> {
    prop::collection::vec(
        prop::sample::select(vec![Dtype::F32, Dtype::F16, Dtype::BF16]),
        1..4,
    )
}

/// Corpus seed `i` (modulo their number) with the edits applied.
fn seed_with_edits(seeds: &[(String, Vec<u8>)], i: usize, e: &[Edit]) -> Vec<u8> {
    apply(&seeds[i % seeds.len()].1, e)
}

// ---------------------------------------------------------------------------------------
// The corpus, as-is.

#[test]
fn config_corpus_files_load_or_are_refused_as_named() {
    for (name, bytes) in corpus("config", "json") {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), &bytes).expect("write");
        let r = AutoGazeConfig::load(dir.path());
        match (&r, name.starts_with("ok_")) {
            (Ok(c), true) => check_loaded_config(c),
            (Err(Error::Config { .. }), false) => {}
            _ => panic!("corpus config {name}: unexpected {r:?}"),
        }
        // The text API agrees with the file API.
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let t = AutoGazeConfig::from_json_str(text, "t");
            assert_eq!(t.is_ok(), r.is_ok(), "{name}: {t:?}");
        }
    }
}

#[test]
fn weights_corpus_files_load_or_are_refused_as_named() {
    let config = corpus_weights_config();
    for (name, bytes) in corpus("weights", "safetensors") {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).expect("write");
        let r = Weights::load(&path, &config);
        match (&r, name.starts_with("ok_")) {
            (Ok(_), true) | (Err(Error::Weights { .. }), false) => {}
            _ => panic!("corpus weights {name}: unexpected {r:?}"),
        }
        check_weights_result(r, &config, true);
    }
}

// ---------------------------------------------------------------------------------------
// config.json

proptest! {
    #![proptest_config(cases(256))]

    /// Any text: a config or `Error::Config`.
    #[test]
    fn config_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            "[\\[\\]{}\":,0-9a-z.eE+ -]{0,64}",
            "\\{\"scales\": *[\\[\"0-9+e.-]{0,24}[\\]\"]?,? *\\}",
        ]
    ) {
        check_config_result(AutoGazeConfig::from_json_str(&text, "fuzz.json"), false);
    }

    /// Up to 4 byte edits of a corpus config (or its first bytes as-is).
    #[test]
    fn config_corpus_byte_edits(i in any::<usize>(), e in edits(4096)) {
        let bytes = seed_with_edits(config_seeds(), i, &e);
        match std::str::from_utf8(&bytes) {
            Ok(text) => check_config_result(AutoGazeConfig::from_json_str(text, "fuzz.json"), false),
            Err(_) => check_config_result(
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|e| Error::config("fuzz.json", e.to_string()))
                    .and_then(|v| AutoGazeConfig::from_value(&v, "fuzz.json")),
                false,
            ),
        }
    }

    /// Up to 3 keys or sections of the released config replaced, deleted or retyped; what
    /// still loads must also give a clean answer about the fixture weights.
    #[test]
    fn config_key_mutations(
        picks in prop::collection::vec((any::<prop::sample::Index>(), prop::option::weighted(0.8, json_value())), 1..4)
    ) {
        let mut doc = fixture_config_json();
        for (idx, new) in picks {
            let mut all = Vec::new();
            pointers(&doc, String::new(), &mut all);
            let p = idx.get(&all).clone();
            edit_json(&mut doc, &p, new);
        }
        let r = AutoGazeConfig::from_value(&doc, "fuzz.json");
        if let Ok(c) = &r {
            let w = Weights::from_bytes(fixture_weights_bytes(), c, "fixture");
            check_weights_result(w, c, false);
        }
        check_config_result(r, false);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Random bytes through the file loader (size and directory checks included).
    #[test]
    fn config_file_bytes_load_or_config_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), &bytes).expect("write");
        check_config_result(AutoGazeConfig::load(dir.path()), true);
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// Valid configs load, through text and through a file, to exactly the numbers written.
    #[test]
    fn valid_configs_round_trip(d in dims()) {
        prop_assume!(split_is_exact(&d));
        let doc = config_json(&d);
        let c = AutoGazeConfig::from_value(&doc, "gen.json").expect("a valid config loads");
        let v = d.v();
        prop_assert_eq!(&c.scales, &d.scales());
        prop_assert_eq!(c.num_vision_tokens_each_frame, v);
        prop_assert_eq!(c.max_num_frames, d.max_frames);
        prop_assert_eq!(c.has_task_loss_requirement_during_inference, d.task_loss.is_some());
        prop_assert_eq!(c.default_task_loss_requirement, d.task_loss.map(|r| r as f32));
        prop_assert_eq!(c.default_gazing_ratio, d.ratio.map(|r| r as f32));
        prop_assert_eq!(c.input_img_size, d.kernel * d.side);
        prop_assert_eq!(c.vision.hidden_dim, d.hidden());
        prop_assert_eq!(c.vision.kernel_size, d.kernel);
        prop_assert_eq!(c.connector.num_tokens, d.side * d.side);
        prop_assert_eq!(c.patches_per_side(), d.side);
        prop_assert_eq!(c.grid_each_scale(), d.grids.clone());
        let dec = &c.decoder;
        prop_assert_eq!((dec.vocab_size, dec.eos_token_id), (v + 1, v));
        prop_assert_eq!(dec.hidden_size, d.hidden());
        prop_assert_eq!(dec.intermediate_size, d.intermediate);
        prop_assert_eq!(dec.num_hidden_layers, d.layers);
        prop_assert_eq!((dec.num_attention_heads, dec.num_key_value_heads), (d.heads, d.heads));
        prop_assert_eq!(dec.head_dim, 2 * d.half_head);
        prop_assert_eq!(dec.num_multi_token_pred, d.k);
        prop_assert_eq!(dec.max_position_embeddings, d.max_positions);
        prop_assert_eq!(dec.rope_scaling.is_some(), d.llama3);
        check_loaded_config(&c);

        let text = serde_json::to_string_pretty(&doc).expect("to text");
        prop_assert_eq!(&AutoGazeConfig::from_json_str(&text, "gen.json").expect("text"), &c);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), &text).expect("write");
        prop_assert_eq!(&AutoGazeConfig::load(dir.path()).expect("file"), &c);
    }
}

// ---------------------------------------------------------------------------------------
// model.safetensors

proptest! {
    #![proptest_config(cases(256))]

    /// Random bytes, and a random 8-byte header length before random bytes: always refused.
    #[test]
    fn weights_random_bytes_are_refused(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1024),
            (any::<u64>(), prop::collection::vec(any::<u8>(), 0..128)).prop_map(|(n, tail)| {
                let mut b = n.to_le_bytes().to_vec();
                b.extend(tail);
                b
            }),
            (0u64..256, "\\{[\"a-zA-Z0-9_:,\\[\\] ]{0,120}\\}").prop_map(|(pad, json)| {
                let mut b = (json.len() as u64 + pad % 3).to_le_bytes().to_vec();
                b.extend(json.into_bytes());
                b
            }),
        ]
    ) {
        let config = fixture_config();
        let r = Weights::from_bytes(&bytes, &config, "fuzz.safetensors");
        prop_assert!(matches!(r, Err(Error::Weights { .. })), "{:?}", r);
    }

    /// Up to 4 byte edits of a corpus file, mostly in its header.
    #[test]
    fn weights_corpus_byte_edits(i in any::<usize>(), e in edits(1536)) {
        let config = corpus_weights_config();
        let bytes = seed_with_edits(weights_seeds(), i, &e);
        check_weights_result(Weights::from_bytes(&bytes, &config, "fuzz.safetensors"), &config, false);
    }

    /// Header entries edited (dtype, shape, offsets, dropped, duplicated) and a lying header
    /// length, over the real data of a random valid file.
    #[test]
    fn weights_header_mutations(
        d in dims(),
        seed in any::<u64>(),
        picks in prop::collection::vec(
            (any::<prop::sample::Index>(), 0u8..6, any::<u64>(), prop::collection::vec(0u64..300, 0..5)),
            1..4,
        ),
        lie in prop::option::weighted(0.2, prop::sample::select(vec![0i64, 1, -1, 8, -8, i64::MAX])),
    ) {
        prop_assume!(split_is_exact(&d));
        let config = AutoGazeConfig::from_value(&config_json(&d), "gen.json").expect("valid");
        let (file, _) = valid_weights(&config, seed, &[Dtype::F32], false, false);
        let n = u64::from_le_bytes(file[..8].try_into().expect("8")) as usize;
        let mut header: serde_json::Map<String, Value> =
            serde_json::from_slice(&file[8..8 + n]).expect("header");
        let data = &file[8 + n..];
        for (idx, op, big, small) in picks {
            let names: Vec<String> = header.keys().cloned().collect();
            let name = idx.get(&names).clone();
            let entry = header[&name].clone();
            match op {
                0 => {
                    let dtypes = ["F64", "I32", "U8", "BOOL", "F16", "BF16", "F8_E4M3", "F4", "XX"];
                    header[&name]["dtype"] = json!(dtypes[(big % 9) as usize]);
                }
                1 => header[&name]["shape"] = json!(small),
                2 => header[&name]["shape"] = json!([big, small.first().copied().unwrap_or(1)]),
                3 => header[&name]["data_offsets"] = json!(small.iter().map(|x| x * 4).collect::<Vec<_>>()),
                4 => {
                    header.remove(&name);
                }
                _ => {
                    header.insert(format!("{name}x"), entry);
                }
            }
        }
        let mut hb = serde_json::to_vec(&header).expect("json");
        hb.resize(hb.len().div_ceil(8) * 8, b' ');
        let claimed = match lie {
            None => hb.len() as u64,
            Some(i64::MAX) => u64::MAX,
            Some(delta) => (hb.len() as i64 + delta).max(0) as u64,
        };
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend(hb);
        bytes.extend_from_slice(data);
        check_weights_result(Weights::from_bytes(&bytes, &config, "fuzz.safetensors"), &config, false);
    }
}

proptest! {
    #![proptest_config(cases(32))]

    /// Bit flips in the fixture's tensor data: loads, or is refused as non-finite.
    #[test]
    fn fixture_data_bit_flips(flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4)) {
        let config = fixture_config();
        let mut bytes = fixture_weights_bytes().to_vec();
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        let data_len = bytes.len() - 8 - n;
        for (i, bit) in &flips {
            let at = 8 + n + i.index(data_len);
            bytes[at] ^= 1 << bit;
        }
        let r = Weights::from_bytes(&bytes, &config, "fuzz.safetensors");
        if let Err(e) = &r {
            prop_assert!(e.to_string().contains("non-finite values"), "{}", e);
        }
        check_weights_result(r, &config, false);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Random valid models (any mix of F32/F16/BF16, an ignored inv_freq buffer, metadata)
    /// load to exactly the values written, from bytes and from a file.
    #[test]
    fn valid_weights_round_trip(
        d in dims(),
        seed in any::<u64>(),
        dtypes in dtype_list(),
        extra in any::<bool>(),
        metadata in any::<bool>(),
    ) {
        prop_assume!(split_is_exact(&d));
        let config = AutoGazeConfig::from_value(&config_json(&d), "gen.json").expect("valid");
        let (file, want) = valid_weights(&config, seed, &dtypes, extra, metadata);
        let w = Weights::from_bytes(&file, &config, "gen.safetensors").expect("valid weights load");
        prop_assert_eq!(w.len(), want.len());
        for (name, values) in &want {
            let t = w.get(name).expect("present");
            let same = t.data.len() == values.len()
                && t.data.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same, "{} differs", name);
        }
        check_weights_result(Ok(w.clone()), &config, false);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &file).expect("write");
        let from_file = Weights::load(&path, &config).expect("file loads");
        prop_assert_eq!(from_file.tensors, w.tensors);
    }
}
