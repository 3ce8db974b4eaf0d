//! `model.safetensors`: memory-mapped, checked against the config, upcast to f32.
//!
//! The file must hold exactly the tensors [`expected_tensors`] lists for the config (names
//! prefixed `gazing_model.`), with those shapes; tensors named `*rotary_emb.inv_freq` are
//! ignored (they are recomputed from the config). F32, F16 and BF16 are accepted and
//! upcast to f32; other dtypes are refused. Weights holding NaN or Inf are refused, naming
//! each tensor and its count of non-finite values: such a checkpoint can only produce
//! garbage gazes, and failing at load time is easier to diagnose than at generation time.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::{AutoGazeConfig, CONFIG_FILE};
use crate::error::{Error, FileRole, Result};

/// File name of the weights inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Prefix of every tensor name in the released checkpoint.
pub const PREFIX: &str = "gazing_model.";
/// Tensors whose names end with this are ignored (buffers recomputed from the config).
pub const IGNORED_SUFFIX: &str = "rotary_emb.inv_freq";
/// How many names an error message lists before summarising the rest.
const MAX_LISTED: usize = 20;

/// One weight tensor, row-major, upcast to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// All weights of a model, keyed by their full checkpoint name (`gazing_model.…`).
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Where the weights came from (for error messages).
    pub source: String,
    pub tensors: BTreeMap<String, Tensor>,
}

/// `config.json` inside a model directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join(CONFIG_FILE)
}

/// `model.safetensors` inside a model directory.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS_FILE)
}

/// Loads and validates `config.json` and `model.safetensors` of a model directory.
pub fn load_model_dir(dir: &Path) -> Result<(AutoGazeConfig, Weights)> {
    let config = AutoGazeConfig::load(&config_path(dir))?;
    let weights = Weights::load(&weights_path(dir), &config)?;
    Ok((config, weights))
}

/// Like [`load_model_dir`], but `path` may also be the `.safetensors` file itself (the
/// config is then read from the same directory).
pub fn load_model(path: &Path) -> Result<(AutoGazeConfig, Weights)> {
    if path.is_file() {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let config = AutoGazeConfig::load(&config_path(dir))?;
        let weights = Weights::load(path, &config)?;
        Ok((config, weights))
    } else {
        load_model_dir(path)
    }
}

/// Every tensor the checkpoint of `config` must hold, with its shape, in file-name order.
pub fn expected_tensors(config: &AutoGazeConfig) -> Vec<(String, Vec<usize>)> {
    let vis = &config.vision;
    let dec = &config.decoder;
    let (hd, od) = (vis.hidden_dim, vis.out_dim);
    let h = dec.hidden_size;
    let q_dim = dec.num_attention_heads.saturating_mul(dec.head_dim);
    let kv_dim = dec.num_key_value_heads.saturating_mul(dec.head_dim);
    let k = dec.num_multi_token_pred;

    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| out.push((format!("{PREFIX}{name}"), shape));

    // Vision encoder (`ShallowVideoConvNet`) and connector.
    let ks = vis.kernel_size;
    push(
        "vision_model.temporal_conv.weight".into(),
        vec![hd, 3, vis.temporal_patch_size, ks, ks],
    );
    push("vision_model.temporal_conv.bias".into(), vec![hd]);
    push("vision_model.norm.weight".into(), vec![hd]);
    push("vision_model.norm.bias".into(), vec![hd]);
    let (tk, sk) = (
        vis.trunk_temporal_kernel_size,
        vis.trunk_spatial_kernel_size,
    );
    for d in 0..vis.depth {
        push(
            format!("vision_model.blocks.{d}.conv3d.weight"),
            vec![hd, hd, tk, sk, sk],
        );
        push(format!("vision_model.blocks.{d}.conv3d.bias"), vec![hd]);
    }
    push("vision_model.out_proj.weight".into(), vec![od, hd, 1, 1, 1]);
    push("vision_model.out_proj.bias".into(), vec![od]);
    push(
        "connector.pos_embed".into(),
        vec![config.connector.num_tokens, config.connector.hidden_dim],
    );

    // Decoder (LLaMA with multi-token heads).
    push(
        "gaze_decoder.model.embed_tokens.weight".into(),
        vec![dec.vocab_size, h],
    );
    for i in 0..dec.num_hidden_layers {
        let l = format!("gaze_decoder.model.layers.{i}");
        push(format!("{l}.input_layernorm.weight"), vec![h]);
        push(format!("{l}.post_attention_layernorm.weight"), vec![h]);
        push(format!("{l}.self_attn.q_proj.weight"), vec![q_dim, h]);
        push(format!("{l}.self_attn.k_proj.weight"), vec![kv_dim, h]);
        push(format!("{l}.self_attn.v_proj.weight"), vec![kv_dim, h]);
        push(format!("{l}.self_attn.o_proj.weight"), vec![h, q_dim]);
        let inter = dec.intermediate_size;
        push(format!("{l}.mlp.gate_proj.weight"), vec![inter, h]);
        push(format!("{l}.mlp.up_proj.weight"), vec![inter, h]);
        push(format!("{l}.mlp.down_proj.weight"), vec![h, inter]);
    }
    push("gaze_decoder.model.norm.weight".into(), vec![h]);
    push(
        "gaze_decoder.lm_head.weight".into(),
        vec![k.saturating_mul(dec.vocab_size), h],
    );
    push(
        "gaze_decoder.task_loss_prediction_head.weight".into(),
        vec![k, h],
    );
    out
}

fn list_names<S: AsRef<str>>(names: &[S]) -> String {
    let mut s = names
        .iter()
        .take(MAX_LISTED)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_LISTED {
        s.push_str(&format!(", ... and {} more", names.len() - MAX_LISTED));
    }
    s
}

/// Upcasts one tensor's little-endian bytes to f32 (dtype already checked).
fn to_f32(view: &TensorView<'_>) -> Vec<f32> {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

impl Weights {
    /// Memory-maps a `.safetensors` file and loads it for `config` (see the module docs).
    pub fn load(path: &Path, config: &AutoGazeConfig) -> Result<Self> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(&shown, FileRole::Weights, e))?;
        if meta.is_dir() {
            return Err(Error::weights(
                shown,
                "is a directory, expected a .safetensors file",
            ));
        }
        if meta.len() < 8 {
            return Err(Error::weights(
                shown,
                format!(
                    "file is {} bytes, too small for a safetensors header (truncated?)",
                    meta.len()
                ),
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(&shown, FileRole::Weights, e))?;
        // SAFETY: the map is read-only and only lives for this call: every tensor is copied
        // (upcast) out of it before returning. Like every reader of memory-mapped files we
        // rely on the file not being truncated by another process meanwhile.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io(&shown, FileRole::Weights, e))?;
        Self::from_bytes(&map, config, &shown)
    }

    /// Loads weights from the bytes of a safetensors file; `source` names it in messages.
    pub fn from_bytes(bytes: &[u8], config: &AutoGazeConfig, source: &str) -> Result<Self> {
        let err = |message: String| Error::weights(source, message);
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            err(format!(
                "not a valid safetensors file: {e} (the file may be truncated or corrupted)"
            ))
        })?;

        let expected = expected_tensors(config);
        let mut views: BTreeMap<&str, TensorView<'_>> = BTreeMap::new();
        let mut unexpected: Vec<&str> = Vec::new();
        let expected_names: BTreeMap<&str, &[usize]> = expected
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        for (name, view) in st.iter() {
            if expected_names.contains_key(name) {
                views.insert(name, view);
            } else if !name.ends_with(IGNORED_SUFFIX) {
                unexpected.push(name);
            }
        }
        unexpected.sort_unstable();
        let missing: Vec<&str> = expected_names
            .keys()
            .copied()
            .filter(|n| !views.contains_key(n))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!(
                    "missing tensors ({} of {} expected): {}",
                    missing.len(),
                    expected.len(),
                    list_names(&missing)
                ));
            }
            if !unexpected.is_empty() {
                parts.push(format!(
                    "unexpected tensors ({}): {}",
                    unexpected.len(),
                    list_names(&unexpected)
                ));
            }
            return Err(err(format!(
                "tensors do not match the config: {}",
                parts.join("; ")
            )));
        }

        let mut bad_shapes = Vec::new();
        let mut bad_dtypes = Vec::new();
        for (name, view) in &views {
            let want = expected_names.get(name).copied().unwrap_or(&[]);
            if view.shape() != want {
                bad_shapes.push(format!(
                    "{name} has shape {:?}, the config expects {want:?}",
                    view.shape()
                ));
            }
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                bad_dtypes.push(format!("{name} ({:?})", view.dtype()));
            }
        }
        if !bad_shapes.is_empty() {
            return Err(err(format!(
                "wrong tensor shapes: {}",
                list_names(&bad_shapes)
            )));
        }
        if !bad_dtypes.is_empty() {
            return Err(err(format!(
                "unsupported dtype (only F32, F16 and BF16 are accepted): {}",
                list_names(&bad_dtypes)
            )));
        }

        let mut tensors = BTreeMap::new();
        let mut non_finite = Vec::new();
        for (name, view) in &views {
            let data = to_f32(view);
            let bad = data.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                non_finite.push(format!("{name} ({bad} of {} values)", data.len()));
            }
            tensors.insert(
                (*name).to_string(),
                Tensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        if !non_finite.is_empty() {
            return Err(err(format!(
                "non-finite values (NaN or Inf) in {} tensor(s), refusing to load: {}",
                non_finite.len(),
                list_names(&non_finite)
            )));
        }
        Ok(Weights {
            source: source.to_string(),
            tensors,
        })
    }

    /// The tensor with this full name (`gazing_model.…`).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::weights(&self.source, format!("no tensor named `{name}`")))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(Tensor::numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::fixture_model_dir;
    use half::{bf16, f16};

    /// (name, dtype, shape, little-endian bytes) of one tensor to write.
    type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

    fn fixture_raw() -> Vec<Raw> {
        let bytes = std::fs::read(weights_path(&fixture_model_dir())).expect("read fixture");
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let mut out: Vec<Raw> = st
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.dtype(),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn f32_values(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// A model dir with the fixture config and these tensors.
    fn write_model(tensors: &[Raw]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(config_path(&fixture_model_dir()), config_path(dir.path()))
            .expect("copy config");
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        let bytes = safetensors::serialize(views, None).expect("serialize");
        std::fs::write(weights_path(dir.path()), bytes).expect("write weights");
        dir
    }

    fn weights_err(dir: &Path, words: &[&str]) {
        match load_model_dir(dir) {
            Err(e @ Error::Weights { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(WEIGHTS_FILE), "{msg:?} lacks the file path");
                for w in words {
                    assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
                }
                assert_eq!(e.python_class(), "WeightsError");
            }
            Err(e) => panic!("expected Error::Weights, got {e:?}"),
            Ok(_) => panic!("expected Error::Weights, got Ok"),
        }
    }

    #[test]
    fn fixture_model_loads() {
        let (config, w) = load_model_dir(&fixture_model_dir()).expect("fixture loads");
        assert_eq!(w.len(), 49);
        assert_eq!(w.num_params(), 3_258_240);
        assert_eq!(expected_tensors(&config).len(), 49);
        assert_eq!(config.decoder.num_hidden_layers, 4);
        let t = w
            .get("gazing_model.vision_model.temporal_conv.weight")
            .expect("temporal conv");
        assert_eq!(t.shape, vec![192, 3, 1, 16, 16]);
        let lm = w
            .get("gazing_model.gaze_decoder.lm_head.weight")
            .expect("lm");
        assert_eq!(lm.shape, vec![2660, 192]);
        assert_eq!(lm.numel(), 2660 * 192);
        let tl = w
            .get("gazing_model.gaze_decoder.task_loss_prediction_head.weight")
            .expect("task loss head");
        assert_eq!(tl.shape, vec![10, 192]);
        assert!(matches!(w.get("nope"), Err(Error::Weights { .. })));

        // The values are the file's bytes, untouched.
        let raw = fixture_raw();
        let (_, _, _, bytes) = raw
            .iter()
            .find(|r| r.0 == "gazing_model.connector.pos_embed")
            .expect("pos_embed in file");
        let pe = w
            .get("gazing_model.connector.pos_embed")
            .expect("pos_embed");
        assert_eq!(pe.data, f32_values(bytes));

        // The weights file itself is accepted as the path too.
        let (_, w2) = load_model(&weights_path(&fixture_model_dir())).expect("by file");
        assert_eq!(w, w2);
    }

    #[test]
    fn f16_and_bf16_files_load_and_upcast() {
        let raw = fixture_raw();
        for dtype in [Dtype::F16, Dtype::BF16] {
            let converted: Vec<Raw> = raw
                .iter()
                .map(|(n, _, s, b)| {
                    let vals = f32_values(b);
                    let bytes: Vec<u8> = match dtype {
                        Dtype::F16 => vals
                            .iter()
                            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                            .collect(),
                        _ => vals
                            .iter()
                            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                            .collect(),
                    };
                    (n.clone(), dtype, s.clone(), bytes)
                })
                .collect();
            let dir = write_model(&converted);
            let (_, w) = load_model_dir(dir.path()).expect("half-precision file loads");
            assert_eq!(w.len(), 49);
            for (name, _, shape, bytes) in &raw {
                let t = w.get(name).expect("tensor present");
                assert_eq!(&t.shape, shape);
                let want: Vec<f32> = f32_values(bytes)
                    .iter()
                    .map(|&v| match dtype {
                        Dtype::F16 => f16::from_f32(v).to_f32(),
                        _ => bf16::from_f32(v).to_f32(),
                    })
                    .collect();
                assert_eq!(t.data, want, "{name} as {dtype:?}");
            }
        }
    }

    #[test]
    fn inv_freq_buffers_are_ignored() {
        let mut raw = fixture_raw();
        raw.push((
            "gazing_model.gaze_decoder.model.rotary_emb.inv_freq".into(),
            Dtype::F32,
            vec![16],
            f32_bytes(&[1.0; 16]),
        ));
        let dir = write_model(&raw);
        let (_, w) = load_model_dir(dir.path()).expect("inv_freq ignored");
        assert_eq!(w.len(), 49);
    }

    #[test]
    fn missing_weights_file_is_io_weights_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(config_path(&fixture_model_dir()), config_path(dir.path()))
            .expect("copy config");
        let err = load_model_dir(dir.path()).expect_err("no weights");
        match &err {
            Error::Io { role, path, .. } => {
                assert_eq!(*role, FileRole::Weights);
                assert!(path.ends_with(WEIGHTS_FILE));
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert_eq!(err.python_class(), "WeightsError");
    }

    #[test]
    fn truncated_and_garbage_files_are_weights_errors() {
        let bytes = std::fs::read(weights_path(&fixture_model_dir())).expect("read");
        let dir = write_model(&fixture_raw());
        let path = weights_path(dir.path());

        std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
        weights_err(dir.path(), &["not a valid safetensors file", "truncated"]);

        std::fs::write(&path, &bytes[..1000]).expect("write");
        weights_err(dir.path(), &["not a valid safetensors file"]);

        std::fs::write(&path, b"hello").expect("write");
        weights_err(dir.path(), &["too small"]);

        let mut huge_header = u64::MAX.to_le_bytes().to_vec();
        huge_header.extend_from_slice(b"{}");
        std::fs::write(&path, &huge_header).expect("write");
        weights_err(dir.path(), &["header too large"]);

        let mut bad_json = 4u64.to_le_bytes().to_vec();
        bad_json.extend_from_slice(b"{{{{");
        std::fs::write(&path, &bad_json).expect("write");
        weights_err(dir.path(), &["invalid JSON"]);
    }

    #[test]
    fn missing_tensor_is_named() {
        let mut raw = fixture_raw();
        raw.retain(|r| r.0 != "gazing_model.gaze_decoder.lm_head.weight");
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "missing tensors (1 of 49 expected)",
                "gazing_model.gaze_decoder.lm_head.weight",
            ],
        );
    }

    #[test]
    fn extra_tensor_is_named() {
        let mut raw = fixture_raw();
        raw.push((
            "gazing_model.extra.weight".into(),
            Dtype::F32,
            vec![2],
            f32_bytes(&[0.0, 1.0]),
        ));
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &["unexpected tensors (1)", "gazing_model.extra.weight"],
        );
    }

    #[test]
    fn wrong_shape_is_named() {
        let mut raw = fixture_raw();
        for r in raw.iter_mut() {
            if r.0 == "gazing_model.gaze_decoder.task_loss_prediction_head.weight" {
                r.2 = vec![9, 192];
                r.3.truncate(9 * 192 * 4);
            }
        }
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "wrong tensor shapes",
                "task_loss_prediction_head.weight has shape [9, 192]",
                "expects [10, 192]",
            ],
        );
    }

    #[test]
    fn int_dtype_is_refused() {
        let mut raw = fixture_raw();
        for r in raw.iter_mut() {
            if r.0 == "gazing_model.vision_model.norm.weight" {
                r.1 = Dtype::I32;
            }
        }
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "unsupported dtype",
                "gazing_model.vision_model.norm.weight (I32)",
            ],
        );
    }

    #[test]
    fn nan_weight_is_refused_with_count() {
        let mut raw = fixture_raw();
        for r in raw.iter_mut() {
            if r.0 == "gazing_model.connector.pos_embed" {
                let mut vals = f32_values(&r.3);
                vals[5] = f32::NAN;
                vals[7] = f32::INFINITY;
                r.3 = f32_bytes(&vals);
            }
        }
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "non-finite values",
                "gazing_model.connector.pos_embed (2 of 37632 values)",
            ],
        );
    }

    /// The fixture file as (header JSON object, data bytes), to re-pack with edits.
    fn fixture_parts() -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
        let raw = std::fs::read(weights_path(&fixture_model_dir())).expect("read fixture");
        let n = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")) as usize;
        let header = serde_json::from_slice(&raw[8..8 + n]).expect("fixture header is JSON");
        (header, raw[8 + n..].to_vec())
    }

    /// A safetensors file from a header and data (header padded to 8 bytes, as the writers do).
    fn pack(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
        let mut hb = serde_json::to_vec(header).expect("header to JSON");
        hb.resize(hb.len().div_ceil(8) * 8, b' ');
        let mut out = (hb.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&hb);
        out.extend_from_slice(data);
        out
    }

    /// `[start, end]` of a tensor in the header.
    fn offsets(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> [u64; 2] {
        let o = &header[name]["data_offsets"];
        [o[0].as_u64().expect("start"), o[1].as_u64().expect("end")]
    }

    /// Writes `bytes` as the weights of a model dir (fixture config) and checks the refusal
    /// through the file path (mmap) and through `from_bytes`.
    fn refused(bytes: &[u8], words: &[&str]) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(config_path(&fixture_model_dir()), config_path(dir.path()))
            .expect("copy config");
        std::fs::write(weights_path(dir.path()), bytes).expect("write weights");
        weights_err(dir.path(), words);
        let config = AutoGazeConfig::load(&fixture_model_dir()).expect("config");
        match Weights::from_bytes(bytes, &config, "mem.safetensors") {
            Err(e @ Error::Weights { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("mem.safetensors"), "{msg:?} lacks the source");
                for w in words {
                    assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
                }
            }
            other => panic!("expected Error::Weights from from_bytes, got {other:?}"),
        }
    }

    const NOT_SAFETENSORS: &str = "not a valid safetensors file";

    #[test]
    fn lying_header_lengths_are_refused() {
        let raw = std::fs::read(weights_path(&fixture_model_dir())).expect("read");
        let real = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let with_len = |n: u64| {
            let mut b = n.to_le_bytes().to_vec();
            b.extend_from_slice(&raw[8..]);
            b
        };
        // Claims ~4.6e18 bytes: refused from the number, before anything is read or allocated.
        let t0 = std::time::Instant::now();
        refused(&with_len(1 << 62), &[NOT_SAFETENSORS, "header too large"]);
        assert!(t0.elapsed().as_secs_f64() < 5.0, "took {:?}", t0.elapsed());
        // Just over the 100 MB limit.
        refused(&with_len(100_000_001), &["header too large"]);
        // Past the end of the file (but under the limit).
        refused(
            &with_len(raw.len() as u64),
            &[NOT_SAFETENSORS, "invalid header length"],
        );
        // Shorter than the JSON: the header is cut mid-object.
        refused(
            &with_len(real / 2),
            &[NOT_SAFETENSORS, "invalid JSON in header"],
        );
        // Longer than the JSON: tensor bytes are read as header text.
        refused(&with_len(real + 64), &[NOT_SAFETENSORS, "header"]);
        // Zero: an empty header.
        refused(&with_len(0), &[NOT_SAFETENSORS, "invalid JSON in header"]);
    }

    #[test]
    fn header_that_is_not_json_is_refused() {
        let (_, data) = fixture_parts();
        let with_header = |h: &[u8]| {
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h);
            b.extend_from_slice(&data);
            b
        };
        refused(
            &with_header(b"this is not json"),
            &[NOT_SAFETENSORS, "invalid JSON in header"],
        );
        refused(
            &with_header(b"[1, 2, 3]"),
            &[NOT_SAFETENSORS, "invalid JSON in header"],
        );
        refused(
            &with_header(b"{\"a\": {\"dtype\": \"F32\"}}"),
            &[NOT_SAFETENSORS, "invalid JSON in header"],
        );
        refused(
            &with_header(b"{\xff\xfe}"),
            &[NOT_SAFETENSORS, "invalid UTF-8 in header"],
        );
        // Valid JSON, but the data is not covered: nothing is described.
        refused(
            &with_header(b"{}"),
            &[NOT_SAFETENSORS, "incomplete metadata"],
        );
    }

    #[test]
    fn overlapping_and_out_of_range_offsets_are_refused() {
        let (header, data) = fixture_parts();
        let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
        names.sort_by_key(|n| offsets(&header, n)[0]);
        let (a, b) = (names[0].clone(), names[1].clone());
        let [a0, a1] = offsets(&header, &a);
        let set = |name: &str, o: serde_json::Value| {
            let mut h = header.clone();
            h[name]["data_offsets"] = o;
            h
        };

        // b reuses a's bytes. Which of the two is checked first depends on hash order, so the
        // reason is "invalid offset" (a second tensor at 0) or "invalid shape, data type, or
        // offset" (b's size at a's range): both name the offsets.
        refused(
            &pack(&set(&b, serde_json::json!([a0, a1])), &data),
            &[NOT_SAFETENSORS, "offset for tensor"],
        );
        // End far past the end of the file (size no longer matches shape x dtype).
        refused(
            &pack(
                &set(&a, serde_json::json!([a0, a1 + 1_000_000_000_000])),
                &data,
            ),
            &[NOT_SAFETENSORS, "invalid shape, data type, or offset"],
        );
        // End before start.
        refused(
            &pack(&set(&a, serde_json::json!([a1, a0])), &data),
            &[NOT_SAFETENSORS, "invalid offset for tensor"],
        );
        // Offsets at the top of the u64 range.
        refused(
            &pack(&set(&a, serde_json::json!([a0, u64::MAX])), &data),
            &[NOT_SAFETENSORS],
        );
        // A gap between two tensors.
        let mut h = header.clone();
        for n in &names {
            let [s, e] = offsets(&header, n);
            h[n.as_str()]["data_offsets"] = serde_json::json!([s + 4, e + 4]);
        }
        let mut shifted = vec![0u8; 4];
        shifted.extend_from_slice(&data);
        refused(
            &pack(&h, &shifted),
            &[NOT_SAFETENSORS, "invalid offset for tensor"],
        );
        // Data left over after the last tensor.
        let mut longer = data.clone();
        longer.extend_from_slice(&[0; 8]);
        refused(
            &pack(&header, &longer),
            &[
                NOT_SAFETENSORS,
                "incomplete metadata, file not fully covered",
            ],
        );
        // A shape whose byte size overflows.
        let mut h = header.clone();
        h[a.as_str()]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
        refused(&pack(&h, &data), &[NOT_SAFETENSORS, "overflow"]);
    }

    #[test]
    fn inf_weights_are_refused_with_counts() {
        let mut raw = fixture_raw();
        for r in raw.iter_mut() {
            let mut vals = f32_values(&r.3);
            if r.0 == "gazing_model.vision_model.norm.bias" {
                vals[0] = f32::INFINITY;
            } else if r.0 == "gazing_model.gaze_decoder.model.norm.weight" {
                vals[3] = f32::NEG_INFINITY;
                vals[4] = f32::NEG_INFINITY;
            }
            r.3 = f32_bytes(&vals);
        }
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "non-finite values (NaN or Inf) in 2 tensor(s)",
                "gazing_model.vision_model.norm.bias (1 of 192 values)",
                "gazing_model.gaze_decoder.model.norm.weight (2 of 192 values)",
            ],
        );

        // Half precision: Inf in F16 (0x7c00) and -Inf in BF16 (0xff80) are caught after the upcast.
        let mut raw = fixture_raw();
        for r in raw.iter_mut() {
            let vals = f32_values(&r.3);
            if r.0 == "gazing_model.vision_model.norm.weight" {
                r.1 = Dtype::F16;
                r.3 = vals
                    .iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect();
                r.3[2..4].copy_from_slice(&0x7c00u16.to_le_bytes());
            } else if r.0 == "gazing_model.connector.pos_embed" {
                r.1 = Dtype::BF16;
                r.3 = vals
                    .iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect();
                r.3[0..2].copy_from_slice(&0xff80u16.to_le_bytes());
            }
        }
        let dir = write_model(&raw);
        weights_err(
            dir.path(),
            &[
                "non-finite values",
                "gazing_model.vision_model.norm.weight (1 of 192 values)",
                "gazing_model.connector.pos_embed (1 of 37632 values)",
            ],
        );
    }

    #[test]
    fn config_errors_come_first() {
        let dir = write_model(&fixture_raw());
        std::fs::write(config_path(dir.path()), b"{}").expect("write config");
        match load_model_dir(dir.path()) {
            Err(Error::Config { message, .. }) => {
                assert!(
                    message.contains("missing required key `scales`"),
                    "{message}"
                )
            }
            other => panic!("expected Error::Config, got {other:?}"),
        }
    }
}
