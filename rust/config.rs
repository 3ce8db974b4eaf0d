//! `config.json` (the nested `AutoGazeConfig`) and `preprocessor_config.json`.
//!
//! The released files are Hugging Face `save_pretrained` output, full of boilerplate keys;
//! only the keys below are read and every other key is ignored. Architecture numbers are
//! required; a few keys the official classes give defaults to are optional with the same
//! default (noted per field). Everything is validated before any tensor is allocated, and
//! every message names the offending key path (e.g.
//! `gaze_model_config.gaze_decoder_config.vocab_size`).

use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, FileRole, Result};

/// File name of the model config inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the image processor config inside a model directory.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

/// Largest accepted value for any size/dimension in a config (channels, image size, ...).
pub const MAX_DIM: usize = 65_536;
/// Largest accepted `num_vision_tokens_each_frame`.
pub const MAX_VISION_TOKENS: usize = 100_000;
/// Largest accepted `max_num_frames`.
pub const MAX_FRAMES: usize = 100_000;
/// Most scales accepted in `scales`.
pub const MAX_SCALES: usize = 64;
/// Config files larger than this are refused before being read.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The validated `AutoGazeConfig`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoGazeConfig {
    /// `scales`, e.g. "32+64+112+224", parsed and sorted ascending (as the official code does).
    pub scales: Vec<usize>,
    /// `num_vision_tokens_each_frame` (V): gaze targets per frame, 265 in the release.
    pub num_vision_tokens_each_frame: usize,
    /// `max_num_frames` (16 in the release).
    pub max_num_frames: usize,
    /// `has_task_loss_requirement_during_inference` (default false, as in the official class).
    pub has_task_loss_requirement_during_inference: bool,
    /// `gazing_ratio_config.fixed.gazing_ratio` when the inference strategy is `fixed`
    /// (the official default config, used when the key is absent, is fixed 0.5).
    #[serde(serialize_with = "ser_opt_f32")]
    pub default_gazing_ratio: Option<f32>,
    /// `task_loss_requirement_config.fixed.task_loss_requirement` when
    /// `has_task_loss_requirement_during_inference` and the inference strategy is `fixed`
    /// (official default config: fixed 0.7).
    #[serde(serialize_with = "ser_opt_f32")]
    pub default_task_loss_requirement: Option<f32>,
    /// `gaze_model_config.input_img_size` (224).
    pub input_img_size: usize,
    /// `gaze_model_config.vision_model_config`.
    pub vision: VisionModelConfig,
    /// `gaze_model_config.connector_config`.
    pub connector: ConnectorConfig,
    /// `gaze_model_config.gaze_decoder_config`.
    pub decoder: GazeDecoderConfig,
}

/// `gaze_model_config.vision_model_config` (`ShallowVideoConvNet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VisionModelConfig {
    pub hidden_dim: usize,
    pub out_dim: usize,
    /// Number of trunk blocks; only 1 is supported.
    pub depth: usize,
    /// Patch size of the patchify conv (16).
    pub kernel_size: usize,
    /// Only 1 is supported.
    pub temporal_patch_size: usize,
    /// Causal temporal kernel of the trunk conv (odd; 3 in the release).
    pub trunk_temporal_kernel_size: usize,
    /// Spatial kernel of the trunk conv (odd; 3 in the release).
    pub trunk_spatial_kernel_size: usize,
}

/// `gaze_model_config.connector_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectorConfig {
    pub hidden_dim: usize,
    /// Vision tokens per frame, (input_img_size / kernel_size)^2.
    pub num_tokens: usize,
}

/// `gaze_model_config.gaze_decoder_config` (a LLaMA config with multi-token heads).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GazeDecoderConfig {
    /// V + 1 (the gaze targets plus EOS/pad).
    pub vocab_size: usize,
    /// V.
    pub eos_token_id: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Must equal `num_attention_heads` (no GQA). Optional, defaults to the head count.
    pub num_key_value_heads: usize,
    /// Optional, defaults to hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `None` for plain RoPE (`rope_scaling` null/absent or `rope_type` "default").
    pub rope_scaling: Option<RopeScaling>,
    /// Only "silu".
    pub hidden_act: String,
    /// K: tokens predicted per decoder step (10).
    pub num_multi_token_pred: usize,
    pub max_position_embeddings: usize,
}

/// `rope_scaling` of type "llama3".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeScaling {
    pub rope_type: String,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Resize target of the image processor (`size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ResizeSize {
    /// `{"shortest_edge": n}`: shortest edge to n, aspect kept.
    ShortestEdge { shortest_edge: usize },
    /// `{"height": h, "width": w}`: exact size.
    HeightWidth { height: usize, width: usize },
}

/// `crop_size` of the image processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CropSize {
    pub height: usize,
    pub width: usize,
}

/// The validated `preprocessor_config.json` (`AutoGazeImageProcessor`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreprocessorConfig {
    pub do_resize: bool,
    pub size: ResizeSize,
    /// PIL resample filter id; only 2 (bilinear) is supported.
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    /// x * rescale_factor - 1 instead of x * rescale_factor (default false).
    pub offset: bool,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Default false (false in the release).
    pub do_center_crop: bool,
    /// Required when `do_center_crop`.
    pub crop_size: Option<CropSize>,
}

/// Path of `file_name` for `path`, which is either a model directory or the file itself.
pub fn resolve_file(path: &Path, file_name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(file_name)
    } else {
        path.to_path_buf()
    }
}

/// Reads and parses a JSON config file, refusing directories and oversized files.
pub(crate) fn read_json_file(path: &Path) -> Result<Value> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(&shown, FileRole::Config, e))?;
    if meta.is_dir() {
        return Err(Error::config(shown, "is a directory, expected a JSON file"));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::config(
            shown,
            format!(
                "file is {} bytes; JSON config files over {MAX_CONFIG_BYTES} bytes are refused",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(&shown, FileRole::Config, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::config(shown, format!("not valid JSON: {e}")))
}

impl AutoGazeConfig {
    /// Loads `config.json` from a model directory or from the file path itself.
    pub fn load(path: &Path) -> Result<Self> {
        let file = resolve_file(path, CONFIG_FILE);
        let value = read_json_file(&file)?;
        Self::from_value(&value, &file.display().to_string())
    }

    /// Parses and validates config JSON text; `source` names it in error messages.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(source, format!("not valid JSON: {e}")))?;
        Self::from_value(&value, source)
    }

    /// Parses and validates an already parsed config; `source` names it in error messages.
    pub fn from_value(value: &Value, source: &str) -> Result<Self> {
        let config = parse_autogaze(&Node::root(value)).map_err(|m| Error::config(source, m))?;
        config.validate(source)?;
        Ok(config)
    }

    /// Checks the cross-field consistency rules (also run by every loader).
    pub fn validate(&self, source: &str) -> Result<()> {
        self.check().map_err(|m| Error::config(source, m))
    }

    /// Gaze tokens of each scale: int(s^2 / sum(s^2) * V), in float64 like the official
    /// code ([4, 16, 49, 196] for the release).
    pub fn num_tokens_each_scale(&self) -> Vec<usize> {
        tokens_each_scale(&self.scales, self.num_vision_tokens_each_frame)
    }

    /// Grid side of each scale: sqrt of [`Self::num_tokens_each_scale`] ([2, 4, 7, 14]).
    pub fn grid_each_scale(&self) -> Vec<usize> {
        self.num_tokens_each_scale()
            .into_iter()
            .map(|n| exact_sqrt(n).unwrap_or(0))
            .collect()
    }

    /// Patches per side of the vision encoder's grid: input_img_size / kernel_size (14).
    pub fn patches_per_side(&self) -> usize {
        self.input_img_size / self.vision.kernel_size.max(1)
    }

    /// The config as JSON, with the derived `num_tokens_each_scale`, `grid_each_scale` and
    /// `patches_per_side` added at the top level.
    pub fn to_json(&self) -> Value {
        let mut value = match serde_json::to_value(self) {
            Ok(v) => v,
            // Serializing plain structs of numbers and strings cannot fail.
            Err(e) => Value::String(format!("unserializable config: {e}")),
        };
        if let Value::Object(map) = &mut value {
            map.insert(
                "num_tokens_each_scale".into(),
                self.num_tokens_each_scale().into(),
            );
            map.insert("grid_each_scale".into(), self.grid_each_scale().into());
            map.insert("patches_per_side".into(), self.patches_per_side().into());
        }
        value
    }

    fn check(&self) -> std::result::Result<(), String> {
        const G: &str = "gaze_model_config";
        const VIS: &str = "gaze_model_config.vision_model_config";
        const CON: &str = "gaze_model_config.connector_config";
        const DEC: &str = "gaze_model_config.gaze_decoder_config";
        let v = self.num_vision_tokens_each_frame;
        let vis = &self.vision;
        let dec = &self.decoder;

        // Parsing bounds these already; repeated for configs built in code.
        for (section, key, x) in [
            (G, "input_img_size", self.input_img_size),
            (VIS, "hidden_dim", vis.hidden_dim),
            (VIS, "out_dim", vis.out_dim),
            (VIS, "kernel_size", vis.kernel_size),
            (
                VIS,
                "trunk_temporal_kernel_size",
                vis.trunk_temporal_kernel_size,
            ),
            (
                VIS,
                "trunk_spatial_kernel_size",
                vis.trunk_spatial_kernel_size,
            ),
            (CON, "hidden_dim", self.connector.hidden_dim),
            (DEC, "hidden_size", dec.hidden_size),
            (DEC, "intermediate_size", dec.intermediate_size),
            (DEC, "num_hidden_layers", dec.num_hidden_layers),
            (DEC, "num_attention_heads", dec.num_attention_heads),
            (DEC, "num_key_value_heads", dec.num_key_value_heads),
            (DEC, "head_dim", dec.head_dim),
        ] {
            if !(1..=MAX_DIM).contains(&x) {
                return Err(format!(
                    "`{section}.{key}` = {x} is out of range 1..={MAX_DIM}"
                ));
            }
        }

        // Scales: per-scale counts are perfect squares that add up to V.
        if self.scales.is_empty() || self.scales.len() > MAX_SCALES {
            return Err(format!(
                "`scales` must list 1 to {MAX_SCALES} scales, got {}",
                self.scales.len()
            ));
        }
        if let Some(&s) = self.scales.iter().find(|&&s| s == 0 || s > MAX_DIM) {
            return Err(format!("`scales`: scale {s} is out of range 1..={MAX_DIM}"));
        }
        if !(1..=MAX_VISION_TOKENS).contains(&v) {
            return Err(format!(
                "`num_vision_tokens_each_frame` = {v} is out of range 1..={MAX_VISION_TOKENS}"
            ));
        }
        let counts = self.num_tokens_each_scale();
        let total: usize = counts.iter().sum();
        if total != v {
            return Err(format!(
                "`scales` {:?} split `num_vision_tokens_each_frame` = {v} into {counts:?} \
                 tokens (int(s^2 / sum(s^2) * V)), which add up to {total}, not {v}",
                self.scales
            ));
        }
        for (&s, &n) in self.scales.iter().zip(&counts) {
            if n == 0 || exact_sqrt(n).is_none() {
                return Err(format!(
                    "`scales`: scale {s} gets {n} tokens (of {counts:?}), which is not a \
                     positive perfect square, so it has no square grid"
                ));
            }
        }
        if !(1..=MAX_FRAMES).contains(&self.max_num_frames) {
            return Err(format!(
                "`max_num_frames` = {} is out of range 1..={MAX_FRAMES}",
                self.max_num_frames
            ));
        }

        // Vision encoder.
        if vis.depth != 1 {
            return Err(format!(
                "`{VIS}.depth` = {} is not supported: only 1 trunk block (the released model)",
                vis.depth
            ));
        }
        if vis.temporal_patch_size != 1 {
            return Err(format!(
                "`{VIS}.temporal_patch_size` = {} is not supported: only 1",
                vis.temporal_patch_size
            ));
        }
        for (key, k) in [
            ("trunk_temporal_kernel_size", vis.trunk_temporal_kernel_size),
            ("trunk_spatial_kernel_size", vis.trunk_spatial_kernel_size),
        ] {
            if k.is_multiple_of(2) {
                return Err(format!(
                    "`{VIS}.{key}` = {k} is not supported: must be odd (3 in the release)"
                ));
            }
        }
        if !self.input_img_size.is_multiple_of(vis.kernel_size) {
            return Err(format!(
                "`{G}.input_img_size` = {} is not divisible by `{VIS}.kernel_size` = {}",
                self.input_img_size, vis.kernel_size
            ));
        }
        let side = self.patches_per_side();
        if self.connector.num_tokens != side.saturating_mul(side) {
            return Err(format!(
                "`{CON}.num_tokens` = {} does not match (input_img_size / kernel_size)^2 = \
                 ({} / {})^2 = {}",
                self.connector.num_tokens,
                self.input_img_size,
                vis.kernel_size,
                side.saturating_mul(side)
            ));
        }
        if vis.out_dim != self.connector.hidden_dim || self.connector.hidden_dim != dec.hidden_size
        {
            return Err(format!(
                "`{VIS}.out_dim` = {}, `{CON}.hidden_dim` = {} and `{DEC}.hidden_size` = {} \
                 must be equal",
                vis.out_dim, self.connector.hidden_dim, dec.hidden_size
            ));
        }

        // Decoder.
        if dec.vocab_size != v + 1 {
            return Err(format!(
                "`{DEC}.vocab_size` = {} must be num_vision_tokens_each_frame + 1 = {}",
                dec.vocab_size,
                v + 1
            ));
        }
        if dec.eos_token_id != v {
            return Err(format!(
                "`{DEC}.eos_token_id` = {} must be num_vision_tokens_each_frame = {v}",
                dec.eos_token_id
            ));
        }
        if dec.num_attention_heads.saturating_mul(dec.head_dim) != dec.hidden_size {
            return Err(format!(
                "`{DEC}.num_attention_heads` * `head_dim` = {} * {} = {} must equal \
                 `hidden_size` = {}",
                dec.num_attention_heads,
                dec.head_dim,
                dec.num_attention_heads.saturating_mul(dec.head_dim),
                dec.hidden_size
            ));
        }
        if !dec.head_dim.is_multiple_of(2) {
            return Err(format!(
                "`{DEC}.head_dim` = {} must be even (rotary embeddings rotate half of it)",
                dec.head_dim
            ));
        }
        if dec.num_key_value_heads != dec.num_attention_heads {
            return Err(format!(
                "`{DEC}.num_key_value_heads` = {} differs from `num_attention_heads` = {}: \
                 grouped-query attention (GQA) is not supported",
                dec.num_key_value_heads, dec.num_attention_heads
            ));
        }
        if dec.hidden_act != "silu" {
            return Err(format!(
                "`{DEC}.hidden_act` = \"{}\" is not supported: only \"silu\"",
                dec.hidden_act
            ));
        }
        if dec.num_multi_token_pred == 0 || dec.num_multi_token_pred > v {
            return Err(format!(
                "`{DEC}.num_multi_token_pred` = {} is out of range 1..={v} \
                 (num_vision_tokens_each_frame)",
                dec.num_multi_token_pred
            ));
        }
        if !(dec.rms_norm_eps.is_finite() && dec.rms_norm_eps > 0.0) {
            return Err(format!(
                "`{DEC}.rms_norm_eps` = {} must be positive and finite",
                dec.rms_norm_eps
            ));
        }
        if !(dec.rope_theta.is_finite() && dec.rope_theta > 0.0) {
            return Err(format!(
                "`{DEC}.rope_theta` = {} must be positive and finite",
                dec.rope_theta
            ));
        }
        if let Some(rs) = &dec.rope_scaling {
            let ok = |x: f64| x.is_finite() && x > 0.0;
            if !ok(rs.factor) || !ok(rs.low_freq_factor) || !ok(rs.high_freq_factor) {
                return Err(format!(
                    "`{DEC}.rope_scaling`: factor, low_freq_factor and high_freq_factor must \
                     be positive and finite, got {}, {}, {}",
                    rs.factor, rs.low_freq_factor, rs.high_freq_factor
                ));
            }
            if rs.high_freq_factor <= rs.low_freq_factor {
                return Err(format!(
                    "`{DEC}.rope_scaling.high_freq_factor` = {} must be greater than \
                     `low_freq_factor` = {}",
                    rs.high_freq_factor, rs.low_freq_factor
                ));
            }
            if rs.original_max_position_embeddings == 0 {
                return Err(format!(
                    "`{DEC}.rope_scaling.original_max_position_embeddings` must be positive"
                ));
            }
        }
        if dec.max_position_embeddings == 0 {
            return Err(format!("`{DEC}.max_position_embeddings` must be positive"));
        }
        if let Some(r) = self.default_gazing_ratio
            && !(r.is_finite() && r > 0.0 && r <= 1.0)
        {
            return Err(format!(
                "`gazing_ratio_config.fixed.gazing_ratio` = {r} must be in (0, 1]"
            ));
        }
        if let Some(r) = self.default_task_loss_requirement
            && !r.is_finite()
        {
            return Err(format!(
                "`task_loss_requirement_config.fixed.task_loss_requirement` = {r} must be finite"
            ));
        }
        Ok(())
    }
}

impl PreprocessorConfig {
    /// Loads `preprocessor_config.json` from a model directory or from the file path itself.
    pub fn load(path: &Path) -> Result<Self> {
        let file = resolve_file(path, PREPROCESSOR_CONFIG_FILE);
        let value = read_json_file(&file)?;
        Self::from_value(&value, &file.display().to_string())
    }

    /// Parses and validates JSON text; `source` names it in error messages.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(source, format!("not valid JSON: {e}")))?;
        Self::from_value(&value, source)
    }

    /// Parses and validates an already parsed config; `source` names it in error messages.
    pub fn from_value(value: &Value, source: &str) -> Result<Self> {
        parse_preprocessor(&Node::root(value)).map_err(|m| Error::config(source, m))
    }

    /// The config as JSON (`size` and `crop_size` in their Hugging Face shapes).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self)
            .unwrap_or_else(|e| Value::String(format!("unserializable config: {e}")))
    }
}

/// int(s^2 / sum(s^2) * v) per scale, computed in float64 as the official Python does.
pub fn tokens_each_scale(scales: &[usize], v: usize) -> Vec<usize> {
    let total: f64 = scales.iter().map(|&s| (s as f64) * (s as f64)).sum();
    scales
        .iter()
        .map(|&s| {
            let n = (s as f64) * (s as f64) / total * (v as f64);
            if n.is_finite() && n >= 0.0 {
                n.floor() as usize
            } else {
                0
            }
        })
        .collect()
}

/// sqrt(n) when n is a perfect square.
fn exact_sqrt(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r.checked_mul(r) == Some(n)).then_some(r)
}

/// Serializes an f32 as the shortest decimal that round-trips (0.7f32 -> 0.7, not
/// 0.699999988079071), so Python sees the number written in the file.
fn ser_opt_f32<S: Serializer>(x: &Option<f32>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match x {
        Some(v) => match format!("{v}").parse::<f64>() {
            Ok(d) => s.serialize_f64(d),
            Err(_) => s.serialize_f64(f64::from(*v)),
        },
        None => s.serialize_none(),
    }
}

// ---------------------------------------------------------------------------------------
// JSON access with key paths in every message.

type Msg<T> = std::result::Result<T, String>;

struct Node<'a> {
    path: String,
    value: &'a Value,
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b} (a boolean)"),
        Value::Number(n) => format!("{n} (a number)"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "..." } else { "" };
            format!("\"{short}{more}\" (a string)")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Self {
        Node {
            path: String::new(),
            value,
        }
    }

    fn name(&self) -> String {
        if self.path.is_empty() {
            "the top level".into()
        } else {
            format!("`{}`", self.path)
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn object(&self) -> Msg<&'a Map<String, Value>> {
        self.value.as_object().ok_or_else(|| {
            format!(
                "{} must be an object, got {}",
                self.name(),
                describe(self.value)
            )
        })
    }

    /// The child at `key`; `None` when absent or null.
    fn opt(&self, key: &str) -> Msg<Option<Node<'a>>> {
        Ok(match self.object()?.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node {
                path: self.child_path(key),
                value,
            }),
        })
    }

    fn req(&self, key: &str) -> Msg<Node<'a>> {
        match self.object()?.get(key) {
            None => Err(format!("missing required key `{}`", self.child_path(key))),
            Some(Value::Null) => Err(format!("required key `{}` is null", self.child_path(key))),
            Some(value) => Ok(Node {
                path: self.child_path(key),
                value,
            }),
        }
    }

    fn type_error(&self, expected: &str) -> String {
        format!(
            "{} must be {expected}, got {}",
            self.name(),
            describe(self.value)
        )
    }

    fn as_usize(&self) -> Msg<usize> {
        self.value
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.type_error("a non-negative integer"))
    }

    /// An integer in `lo..=hi`; checked at parse time so absurd sizes never reach an
    /// allocation.
    fn as_bounded(&self, lo: usize, hi: usize) -> Msg<usize> {
        let v = self.as_usize()?;
        if v < lo {
            Err(format!("{} = {v} must be at least {lo}", self.name()))
        } else if v > hi {
            Err(format!("{} = {v} is too large (limit {hi})", self.name()))
        } else {
            Ok(v)
        }
    }

    fn as_f64(&self) -> Msg<f64> {
        self.value
            .as_f64()
            .ok_or_else(|| self.type_error("a number"))
    }

    fn as_bool(&self) -> Msg<bool> {
        self.value
            .as_bool()
            .ok_or_else(|| self.type_error("a boolean"))
    }

    fn as_str(&self) -> Msg<&'a str> {
        self.value
            .as_str()
            .ok_or_else(|| self.type_error("a string"))
    }

    fn dim(&self, key: &str) -> Msg<usize> {
        self.req(key)?.as_bounded(1, MAX_DIM)
    }
}

// ---------------------------------------------------------------------------------------
// AutoGazeConfig parsing.

fn parse_scales(node: &Node) -> Msg<Vec<usize>> {
    let bad = || {
        format!(
            "{} must be positive integers joined by '+' (e.g. \"32+64+112+224\"), got {}",
            node.name(),
            describe(node.value)
        )
    };
    let mut scales: Vec<usize> = match node.value {
        Value::String(s) => s
            .split('+')
            .map(|p| p.trim().parse::<usize>().map_err(|_| bad()))
            .collect::<Msg<_>>()?,
        Value::Number(_) => vec![node.as_usize().map_err(|_| bad())?],
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(bad)
            })
            .collect::<Msg<_>>()?,
        _ => return Err(bad()),
    };
    if scales.is_empty() || scales.len() > MAX_SCALES {
        return Err(format!(
            "{} must list 1 to {MAX_SCALES} scales, got {}",
            node.name(),
            scales.len()
        ));
    }
    if let Some(&s) = scales.iter().find(|&&s| s == 0 || s > MAX_DIM) {
        return Err(format!(
            "{}: scale {s} is out of range 1..={MAX_DIM}",
            node.name()
        ));
    }
    // The official code sorts the scales (`sorted(int(s) for s in scales.split('+'))`).
    scales.sort_unstable();
    Ok(scales)
}

fn parse_autogaze(root: &Node) -> Msg<AutoGazeConfig> {
    root.object()?;
    let scales = parse_scales(&root.req("scales")?)?;
    let v = root
        .req("num_vision_tokens_each_frame")?
        .as_bounded(1, MAX_VISION_TOKENS)?;
    let max_num_frames = root.req("max_num_frames")?.as_bounded(1, MAX_FRAMES)?;
    let has_tlr = match root.opt("has_task_loss_requirement_during_inference")? {
        Some(n) => n.as_bool()?,
        None => false,
    };

    // gazing_ratio_config: absent -> the official default (fixed 0.5).
    let default_gazing_ratio = match root.opt("gazing_ratio_config")? {
        None => Some(0.5),
        Some(node) => {
            let strategy = node.req("sample_strategy_during_inference")?;
            if strategy.as_str()? == "fixed" {
                let r = node.req("fixed")?.req("gazing_ratio")?;
                Some(r.as_f64()? as f32)
            } else {
                None
            }
        }
    };
    // task_loss_requirement_config: absent -> the official default (fixed 0.7).
    let default_task_loss_requirement = if !has_tlr {
        None
    } else {
        match root.opt("task_loss_requirement_config")? {
            None => Some(0.7),
            Some(node) => {
                let strategy = node.req("sample_strategy_during_inference")?;
                if strategy.as_str()? == "fixed" {
                    let r = node.req("fixed")?.req("task_loss_requirement")?;
                    Some(r.as_f64()? as f32)
                } else {
                    None
                }
            }
        }
    };

    let gaze = root.req("gaze_model_config")?;
    gaze.object()?;
    let input_img_size = gaze.dim("input_img_size")?;
    if let Some(n) = gaze.opt("num_vision_tokens_each_frame")? {
        let inner = n.as_usize()?;
        if inner != v {
            return Err(format!(
                "`gaze_model_config.num_vision_tokens_each_frame` = {inner} differs from \
                 `num_vision_tokens_each_frame` = {v}"
            ));
        }
    }
    if let Some(n) = gaze.opt("temporal_position_encoding")? {
        let enc = n.as_str()?;
        if enc != "none" {
            return Err(format!(
                "{} = \"{enc}\" is not supported: only \"none\"",
                n.name()
            ));
        }
    }

    let vis = gaze.req("vision_model_config")?;
    vis.object()?;
    let vision = VisionModelConfig {
        hidden_dim: vis.dim("hidden_dim")?,
        out_dim: vis.dim("out_dim")?,
        depth: vis.dim("depth")?,
        kernel_size: vis.dim("kernel_size")?,
        temporal_patch_size: vis.dim("temporal_patch_size")?,
        trunk_temporal_kernel_size: vis.dim("trunk_temporal_kernel_size")?,
        trunk_spatial_kernel_size: vis.dim("trunk_spatial_kernel_size")?,
    };

    let con = gaze.req("connector_config")?;
    con.object()?;
    let connector = ConnectorConfig {
        hidden_dim: con.dim("hidden_dim")?,
        // (input / kernel)^2 <= MAX_DIM^2 is checked against this later.
        num_tokens: con
            .req("num_tokens")?
            .as_bounded(1, MAX_DIM.saturating_mul(MAX_DIM))?,
    };

    let decoder = parse_decoder(&gaze.req("gaze_decoder_config")?)?;

    Ok(AutoGazeConfig {
        scales,
        num_vision_tokens_each_frame: v,
        max_num_frames,
        has_task_loss_requirement_during_inference: has_tlr,
        default_gazing_ratio,
        default_task_loss_requirement,
        input_img_size,
        vision,
        connector,
        decoder,
    })
}

fn parse_decoder(dec: &Node) -> Msg<GazeDecoderConfig> {
    dec.object()?;
    let vocab_size = dec
        .req("vocab_size")?
        .as_bounded(2, MAX_VISION_TOKENS + 1)?;
    let eos_token_id = dec.req("eos_token_id")?.as_bounded(0, MAX_VISION_TOKENS)?;
    let hidden_size = dec.dim("hidden_size")?;
    let intermediate_size = dec.dim("intermediate_size")?;
    let num_hidden_layers = dec.dim("num_hidden_layers")?;
    let num_attention_heads = dec.dim("num_attention_heads")?;
    let num_key_value_heads = match dec.opt("num_key_value_heads")? {
        Some(n) => n.as_bounded(1, MAX_DIM)?,
        None => num_attention_heads,
    };
    let head_dim = match dec.opt("head_dim")? {
        Some(n) => n.as_bounded(1, MAX_DIM)?,
        None => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                return Err(format!(
                    "`{}.hidden_size` = {hidden_size} is not divisible by \
                     `num_attention_heads` = {num_attention_heads} and `head_dim` is absent",
                    dec.path
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    let rms_norm_eps = dec.req("rms_norm_eps")?.as_f64()?;
    let rope_theta = dec.req("rope_theta")?.as_f64()?;
    let hidden_act = dec.req("hidden_act")?.as_str()?.to_string();
    let num_multi_token_pred = dec
        .req("num_multi_token_pred")?
        .as_bounded(1, MAX_VISION_TOKENS)?;
    let max_position_embeddings = dec
        .req("max_position_embeddings")?
        .as_bounded(1, u32::MAX as usize)?;
    for key in ["attention_bias", "mlp_bias"] {
        if let Some(n) = dec.opt(key)?
            && n.as_bool()?
        {
            return Err(format!(
                "{} = true is not supported: the decoder has no biases",
                n.name()
            ));
        }
    }

    let rope_scaling = match dec.opt("rope_scaling")? {
        None => None,
        Some(rs) => {
            rs.object()?;
            // Hugging Face accepts the legacy key `type` for `rope_type`.
            let kind = match rs.opt("rope_type")? {
                Some(n) => n.as_str()?.to_string(),
                None => match rs.opt("type")? {
                    Some(n) => n.as_str()?.to_string(),
                    None => "default".to_string(),
                },
            };
            match kind.as_str() {
                "default" => None,
                "llama3" => Some(RopeScaling {
                    rope_type: kind.clone(),
                    factor: rs.req("factor")?.as_f64()?,
                    low_freq_factor: rs.req("low_freq_factor")?.as_f64()?,
                    high_freq_factor: rs.req("high_freq_factor")?.as_f64()?,
                    original_max_position_embeddings: rs
                        .req("original_max_position_embeddings")?
                        .as_bounded(1, u32::MAX as usize)?,
                }),
                other => {
                    return Err(format!(
                        "`{}.rope_type` = \"{other}\" is not supported: only \"llama3\" or \
                         \"default\"",
                        rs.path
                    ));
                }
            }
        }
    };

    Ok(GazeDecoderConfig {
        vocab_size,
        eos_token_id,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        hidden_act,
        num_multi_token_pred,
        max_position_embeddings,
    })
}

// ---------------------------------------------------------------------------------------
// PreprocessorConfig parsing.

fn parse_triple(node: &Node) -> Msg<[f64; 3]> {
    let items = node
        .value
        .as_array()
        .ok_or_else(|| node.type_error("a list of 3 numbers"))?;
    if items.len() != 3 {
        return Err(format!(
            "{} must have 3 values (one per RGB channel), got {}",
            node.name(),
            items.len()
        ));
    }
    let mut out = [0.0; 3];
    for (i, (slot, item)) in out.iter_mut().zip(items).enumerate() {
        *slot = item
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("{}[{i}] must be a finite number", node.name()))?;
    }
    Ok(out)
}

fn parse_preprocessor(root: &Node) -> Msg<PreprocessorConfig> {
    root.object()?;
    let size_node = root.req("size")?;
    size_node.object()?;
    let shortest = size_node.opt("shortest_edge")?;
    let height = size_node.opt("height")?;
    let width = size_node.opt("width")?;
    let size = match (shortest, height, width) {
        (Some(s), None, None) => ResizeSize::ShortestEdge {
            shortest_edge: s.as_bounded(1, MAX_DIM)?,
        },
        (None, Some(h), Some(w)) => ResizeSize::HeightWidth {
            height: h.as_bounded(1, MAX_DIM)?,
            width: w.as_bounded(1, MAX_DIM)?,
        },
        _ => {
            return Err(format!(
                "`size` must be {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}, \
                 got keys {:?}",
                size_node.object()?.keys().collect::<Vec<_>>()
            ));
        }
    };
    let resample_node = root.req("resample")?;
    let resample = resample_node.as_usize()?;
    if resample != 2 {
        let name = match resample {
            0 => "nearest",
            1 => "lanczos",
            3 => "bicubic",
            4 => "box",
            5 => "hamming",
            _ => "unknown",
        };
        return Err(format!(
            "`resample` = {resample} ({name}) is not supported: only 2 (bilinear)"
        ));
    }
    let rescale_node = root.req("rescale_factor")?;
    let rescale_factor = rescale_node.as_f64()?;
    if !(rescale_factor.is_finite() && rescale_factor != 0.0) {
        return Err(format!(
            "`rescale_factor` = {rescale_factor} must be finite and non-zero"
        ));
    }
    let image_mean = parse_triple(&root.req("image_mean")?)?;
    let image_std = parse_triple(&root.req("image_std")?)?;
    if let Some(s) = image_std.iter().find(|&&s| s <= 0.0) {
        return Err(format!("`image_std` values must be > 0, got {s}"));
    }
    let do_center_crop = match root.opt("do_center_crop")? {
        Some(n) => n.as_bool()?,
        None => false,
    };
    let crop_size = match root.opt("crop_size")? {
        Some(n) => Some(CropSize {
            height: n.dim("height")?,
            width: n.dim("width")?,
        }),
        None => None,
    };
    if do_center_crop && crop_size.is_none() {
        return Err("`do_center_crop` is true but `crop_size` is missing".into());
    }
    Ok(PreprocessorConfig {
        do_resize: root.req("do_resize")?.as_bool()?,
        size,
        resample: resample as u32,
        do_rescale: root.req("do_rescale")?.as_bool()?,
        rescale_factor,
        offset: match root.opt("offset")? {
            Some(n) => n.as_bool()?,
            None => false,
        },
        do_normalize: root.req("do_normalize")?.as_bool()?,
        image_mean,
        image_std,
        do_center_crop,
        crop_size,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The official fixtures folder: `$AUTOGAZE_FIXTURES`, else `../shared/fixtures/official`
    /// next to the crate. Tests that use it fail (never skip) when it is missing.
    pub(crate) fn fixtures_dir() -> PathBuf {
        let dir = match std::env::var_os("AUTOGAZE_FIXTURES") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/official"),
        };
        assert!(
            dir.join("model").join(CONFIG_FILE).is_file(),
            "fixtures not found at {} (set AUTOGAZE_FIXTURES)",
            dir.display()
        );
        dir
    }

    pub(crate) fn fixture_model_dir() -> PathBuf {
        fixtures_dir().join("model")
    }

    fn fixture_json() -> Value {
        let text = std::fs::read_to_string(fixture_model_dir().join(CONFIG_FILE))
            .expect("read fixture config");
        serde_json::from_str(&text).expect("parse fixture config")
    }

    fn err_of(value: &Value) -> String {
        match AutoGazeConfig::from_value(value, "test.json") {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e @ Error::Config { .. }) => e.to_string(),
            Err(e) => panic!("expected Error::Config, got {e:?}"),
        }
    }

    fn assert_contains(msg: &str, words: &[&str]) {
        for w in words {
            assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
        }
    }

    fn set(value: &mut Value, pointer: &str, new: Value) {
        *value.pointer_mut(pointer).expect("pointer exists") = new;
    }

    fn remove(value: &mut Value, pointer: &str) {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer with a parent");
        let obj = value
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .expect("parent object");
        assert!(obj.remove(key).is_some(), "{pointer} existed");
    }

    const DEC: &str = "/gaze_model_config/gaze_decoder_config";

    #[test]
    fn fixture_config_has_spec_values() {
        let c = AutoGazeConfig::load(&fixture_model_dir()).expect("fixture config loads");
        assert_eq!(c.scales, vec![32, 64, 112, 224]);
        assert_eq!(c.num_vision_tokens_each_frame, 265);
        assert_eq!(c.max_num_frames, 16);
        assert!(c.has_task_loss_requirement_during_inference);
        assert_eq!(c.default_gazing_ratio, Some(0.75));
        assert_eq!(c.default_task_loss_requirement, Some(0.7));
        assert_eq!(c.input_img_size, 224);
        assert_eq!(
            c.vision,
            VisionModelConfig {
                hidden_dim: 192,
                out_dim: 192,
                depth: 1,
                kernel_size: 16,
                temporal_patch_size: 1,
                trunk_temporal_kernel_size: 3,
                trunk_spatial_kernel_size: 3,
            }
        );
        assert_eq!(
            c.connector,
            ConnectorConfig {
                hidden_dim: 192,
                num_tokens: 196
            }
        );
        let d = &c.decoder;
        assert_eq!(d.vocab_size, 266);
        assert_eq!(d.eos_token_id, 265);
        assert_eq!(d.hidden_size, 192);
        assert_eq!(d.intermediate_size, 384);
        assert_eq!(d.num_hidden_layers, 4);
        assert_eq!(d.num_attention_heads, 6);
        assert_eq!(d.num_key_value_heads, 6);
        assert_eq!(d.head_dim, 32);
        assert_eq!(d.rms_norm_eps, 1e-5);
        assert_eq!(d.rope_theta, 500000.0);
        assert_eq!(d.hidden_act, "silu");
        assert_eq!(d.num_multi_token_pred, 10);
        assert_eq!(d.max_position_embeddings, 131072);
        assert_eq!(
            d.rope_scaling,
            Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            })
        );
        assert_eq!(c.num_tokens_each_scale(), vec![4, 16, 49, 196]);
        assert_eq!(c.grid_each_scale(), vec![2, 4, 7, 14]);
        assert_eq!(c.patches_per_side(), 14);

        // The file path works as well as the directory.
        let c2 = AutoGazeConfig::load(&fixture_model_dir().join(CONFIG_FILE)).expect("by file");
        assert_eq!(c, c2);
    }

    #[test]
    fn to_json_round_trips_and_adds_derived_fields() {
        let c = AutoGazeConfig::load(&fixture_model_dir()).expect("fixture config loads");
        let j = c.to_json();
        assert_eq!(j["default_gazing_ratio"], json!(0.75));
        assert_eq!(j["default_task_loss_requirement"], json!(0.7));
        assert_eq!(j["num_tokens_each_scale"], json!([4, 16, 49, 196]));
        assert_eq!(j["grid_each_scale"], json!([2, 4, 7, 14]));
        assert_eq!(j["patches_per_side"], json!(14));
        assert_eq!(j["decoder"]["rope_scaling"]["rope_type"], json!("llama3"));
        assert_eq!(j["vision"]["kernel_size"], json!(16));
        assert_eq!(j["connector"]["num_tokens"], json!(196));
    }

    #[test]
    fn fixture_preprocessor_config() {
        let p = PreprocessorConfig::load(&fixture_model_dir()).expect("preprocessor loads");
        assert!(p.do_resize);
        assert_eq!(p.size, ResizeSize::ShortestEdge { shortest_edge: 224 });
        assert_eq!(p.resample, 2);
        assert!(p.do_rescale && p.offset && p.do_normalize && !p.do_center_crop);
        assert_eq!(p.rescale_factor, 1.0 / 127.5);
        assert_eq!(p.image_mean, [0.485, 0.456, 0.406]);
        assert_eq!(p.image_std, [0.229, 0.224, 0.225]);
        assert_eq!(
            p.crop_size,
            Some(CropSize {
                height: 224,
                width: 224
            })
        );
        let j = p.to_json();
        assert_eq!(j["size"], json!({"shortest_edge": 224}));
        assert_eq!(j["crop_size"], json!({"height": 224, "width": 224}));
    }

    #[test]
    fn preprocessor_errors() {
        let base: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_model_dir().join(PREPROCESSOR_CONFIG_FILE))
                .expect("read"),
        )
        .expect("json");
        let check = |f: &dyn Fn(&mut Value), words: &[&str]| {
            let mut v = base.clone();
            f(&mut v);
            match PreprocessorConfig::from_value(&v, "pp.json") {
                Err(e @ Error::Config { .. }) => assert_contains(&e.to_string(), words),
                other => panic!("expected a config error, got {other:?}"),
            }
        };
        check(&|v| set(v, "/resample", json!(3)), &["resample", "bicubic"]);
        check(
            &|v| set(v, "/image_std/1", json!(0.0)),
            &["image_std", "> 0"],
        );
        check(
            &|v| set(v, "/image_mean", json!([0.5, 0.5])),
            &["image_mean", "3"],
        );
        check(&|v| set(v, "/size", json!({"longest_edge": 3})), &["size"]);
        check(&|v| remove(v, "/do_rescale"), &["missing", "do_rescale"]);
        check(&|v| set(v, "/offset", json!("yes")), &["offset", "boolean"]);

        let mut hw = base.clone();
        set(&mut hw, "/size", json!({"height": 224, "width": 320}));
        remove(&mut hw, "/offset");
        let p = PreprocessorConfig::from_value(&hw, "pp.json").expect("height/width size");
        assert_eq!(
            p.size,
            ResizeSize::HeightWidth {
                height: 224,
                width: 320
            }
        );
        assert!(!p.offset);
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = AutoGazeConfig::load(dir.path()).expect_err("no config.json");
        match &err {
            Error::Io { path, role, .. } => {
                assert!(path.ends_with(CONFIG_FILE), "{path}");
                assert_eq!(*role, FileRole::Config);
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert_eq!(err.python_class(), "ConfigError");
        assert_contains(&err.to_string(), &["config.json", "cannot read"]);
    }

    #[test]
    fn invalid_json_is_a_config_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(CONFIG_FILE);
        std::fs::write(&file, b"{\"scales\": \"32+64\",,}").expect("write");
        let err = AutoGazeConfig::load(dir.path()).expect_err("bad json");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert_contains(
            &err.to_string(),
            &["config.json", "not valid JSON", "line 1"],
        );
    }

    #[test]
    fn missing_key_names_the_key_path() {
        let mut v = fixture_json();
        remove(&mut v, &format!("{DEC}/vocab_size"));
        let msg = err_of(&v);
        assert_contains(
            &msg,
            &[
                "missing required key",
                "`gaze_model_config.gaze_decoder_config.vocab_size`",
            ],
        );

        let mut v = fixture_json();
        remove(&mut v, "/gaze_model_config/vision_model_config");
        assert_contains(&err_of(&v), &["gaze_model_config.vision_model_config"]);
    }

    #[test]
    fn wrong_type_names_the_key_and_value() {
        let mut v = fixture_json();
        set(&mut v, &format!("{DEC}/hidden_size"), json!("192"));
        assert_contains(
            &err_of(&v),
            &[
                "gaze_model_config.gaze_decoder_config.hidden_size",
                "non-negative integer",
                "\"192\"",
            ],
        );
        let mut v = fixture_json();
        set(
            &mut v,
            "/has_task_loss_requirement_during_inference",
            json!(1),
        );
        assert_contains(&err_of(&v), &["has_task_loss_requirement", "boolean"]);
        let mut v = fixture_json();
        set(&mut v, "/gaze_model_config", json!([1, 2]));
        assert_contains(&err_of(&v), &["`gaze_model_config` must be an object"]);
        let mut v = fixture_json();
        set(&mut v, "/scales", json!("32+sixty"));
        assert_contains(&err_of(&v), &["scales", "'+'"]);
    }

    #[test]
    fn inconsistent_sizes_are_refused() {
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "/gaze_model_config/gaze_decoder_config/vocab_size",
                json!(300),
                vec!["vocab_size", "300", "266"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/eos_token_id",
                json!(0),
                vec!["eos_token_id"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_key_value_heads",
                json!(2),
                vec!["GQA", "not supported"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/head_dim",
                json!(16),
                vec!["head_dim", "hidden_size"],
            ),
            (
                "/gaze_model_config/connector_config/num_tokens",
                json!(197),
                vec!["num_tokens", "196"],
            ),
            (
                "/gaze_model_config/input_img_size",
                json!(225),
                vec!["input_img_size", "divisible"],
            ),
            (
                "/gaze_model_config/vision_model_config/out_dim",
                json!(128),
                vec!["out_dim", "equal"],
            ),
            (
                "/gaze_model_config/vision_model_config/depth",
                json!(2),
                vec!["depth", "not supported"],
            ),
            (
                "/gaze_model_config/vision_model_config/temporal_patch_size",
                json!(2),
                vec!["temporal_patch_size", "not supported"],
            ),
            (
                "/gaze_model_config/vision_model_config/trunk_spatial_kernel_size",
                json!(4),
                vec!["trunk_spatial_kernel_size", "odd"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/hidden_act",
                json!("gelu"),
                vec!["hidden_act", "silu"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/rope_scaling/rope_type",
                json!("yarn"),
                vec!["rope_type", "yarn", "llama3"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/rms_norm_eps",
                json!(0.0),
                vec!["rms_norm_eps", "positive"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/rope_theta",
                json!(-1.0),
                vec!["rope_theta", "positive"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_multi_token_pred",
                json!(0),
                vec!["num_multi_token_pred"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_multi_token_pred",
                json!(266),
                vec!["num_multi_token_pred", "1..=265"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/attention_bias",
                json!(true),
                vec!["attention_bias", "not supported"],
            ),
            ("/scales", json!("32+64+112"), vec!["scales", "add up"]),
            (
                "/num_vision_tokens_each_frame",
                json!(264),
                vec!["num_vision_tokens_each_frame"],
            ),
            (
                "/gazing_ratio_config/fixed/gazing_ratio",
                json!(1.5),
                vec!["gazing_ratio", "(0, 1]"],
            ),
        ];
        for (pointer, value, words) in cases {
            let mut v = fixture_json();
            set(&mut v, pointer, value);
            assert_contains(&err_of(&v), &words);
        }
    }

    #[test]
    fn absurd_sizes_are_refused_by_key() {
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "/gaze_model_config/gaze_decoder_config/hidden_size",
                json!(1u64 << 40),
                vec!["hidden_size", "too large", "65536"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/intermediate_size",
                json!(70000),
                vec!["intermediate_size", "too large"],
            ),
            (
                "/num_vision_tokens_each_frame",
                json!(200000),
                vec!["num_vision_tokens_each_frame", "too large", "100000"],
            ),
            (
                "/max_num_frames",
                json!(1_000_000),
                vec!["max_num_frames", "too large"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_hidden_layers",
                json!(0),
                vec!["num_hidden_layers", "at least 1"],
            ),
            ("/scales", json!("32+100000"), vec!["scale 100000"]),
            (
                "/gaze_model_config/gaze_decoder_config/vocab_size",
                json!(u64::MAX),
                vec!["vocab_size", "too large"],
            ),
        ];
        for (pointer, value, words) in cases {
            let mut v = fixture_json();
            set(&mut v, pointer, value);
            assert_contains(&err_of(&v), &words);
        }
    }

    #[test]
    fn hostile_values_name_the_key() {
        // The Rust side of tests/test_robustness.py's CONFIG_CASES not covered above.
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "/gaze_model_config/gaze_decoder_config/num_hidden_layers",
                json!(4.5),
                vec!["num_hidden_layers", "non-negative integer", "4.5"],
            ),
            (
                "/has_task_loss_requirement_during_inference",
                json!([1]),
                vec![
                    "has_task_loss_requirement_during_inference",
                    "boolean",
                    "an array",
                ],
            ),
            (
                "/gaze_model_config",
                Value::Null,
                vec!["`gaze_model_config`", "null"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/hidden_size",
                Value::Null,
                vec!["gaze_decoder_config.hidden_size", "null"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_hidden_layers",
                json!(1u64 << 40),
                vec!["num_hidden_layers", "too large", "65536"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/intermediate_size",
                json!(1_000_000_000_000u64),
                vec!["intermediate_size", "too large"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/hidden_size",
                json!(-1),
                vec!["hidden_size", "non-negative integer", "-1"],
            ),
            (
                "/gaze_model_config/gaze_decoder_config/num_attention_heads",
                json!(5),
                vec!["num_attention_heads", "hidden_size"],
            ),
            (
                "/num_vision_tokens_each_frame",
                json!(1e300),
                vec!["num_vision_tokens_each_frame", "non-negative integer"],
            ),
            ("/scales", json!([32, 64, 112, 224, 0]), vec!["scales"]),
            (
                "/gaze_model_config/vision_model_config/kernel_size",
                json!(0),
                vec!["kernel_size", "at least 1"],
            ),
        ];
        for (pointer, value, words) in cases {
            let mut v = fixture_json();
            set(&mut v, pointer, value);
            assert_contains(&err_of(&v), &words);
        }
    }

    #[test]
    fn text_that_is_not_a_config_is_refused() {
        let deep = "[".repeat(100_000); // serde_json's recursion limit, not a stack overflow
        let cases: Vec<(&str, Vec<&str>)> = vec![
            ("", vec!["not valid JSON", "EOF"]),
            ("{not json", vec!["not valid JSON"]),
            (
                "[1, 2, 3]",
                vec!["the top level must be an object", "an array"],
            ),
            ("\"x\"", vec!["the top level must be an object", "a string"]),
            ("{}", vec!["missing required key `scales`"]),
            (&deep, vec!["not valid JSON", "recursion limit"]),
            ("{\"scales\": 1e400}", vec!["not valid JSON"]),
        ];
        for (text, words) in cases {
            match AutoGazeConfig::from_json_str(text, "t.json") {
                Err(e @ Error::Config { .. }) => {
                    assert_eq!(e.python_class(), "ConfigError");
                    assert_contains(&e.to_string(), &words);
                    assert_contains(&e.to_string(), &["t.json"]);
                }
                other => panic!("expected Error::Config for {:.40?}, got {other:?}", text),
            }
        }
        // The same through a file, with bytes that are not UTF-8.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), b"\xff\xfe{").expect("write");
        let err = AutoGazeConfig::load(dir.path()).expect_err("not UTF-8");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert_contains(&err.to_string(), &["config.json", "not valid JSON"]);
    }

    #[test]
    fn oversized_file_and_directory_are_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(CONFIG_FILE);
        // Sparse: 64 MiB of nothing, cheap to make; refused from its size alone.
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .expect("sparse file");
        let t0 = std::time::Instant::now();
        let err = AutoGazeConfig::load(dir.path()).expect_err("too big");
        assert!(t0.elapsed().as_secs_f64() < 1.0, "took {:?}", t0.elapsed());
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert_contains(
            &err.to_string(),
            &["config.json", "67108864 bytes", "refused"],
        );

        std::fs::remove_file(&file).expect("rm");
        std::fs::create_dir(&file).expect("mkdir");
        let err = AutoGazeConfig::load(dir.path()).expect_err("a directory");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert_contains(&err.to_string(), &["config.json", "is a directory"]);
    }

    #[test]
    fn optional_keys_take_official_defaults() {
        let mut v = fixture_json();
        remove(&mut v, &format!("{DEC}/head_dim"));
        remove(&mut v, &format!("{DEC}/num_key_value_heads"));
        remove(&mut v, "/gazing_ratio_config");
        set(&mut v, &format!("{DEC}/rope_scaling"), Value::Null);
        let c = AutoGazeConfig::from_value(&v, "t").expect("defaults");
        assert_eq!(c.decoder.head_dim, 32);
        assert_eq!(c.decoder.num_key_value_heads, 6);
        assert_eq!(c.decoder.rope_scaling, None);
        assert_eq!(c.default_gazing_ratio, Some(0.5));

        // No task-loss requirement at inference -> no default requirement.
        let mut v = fixture_json();
        set(
            &mut v,
            "/has_task_loss_requirement_during_inference",
            json!(false),
        );
        set(
            &mut v,
            "/gazing_ratio_config/sample_strategy_during_inference",
            json!("uniform"),
        );
        let c = AutoGazeConfig::from_value(&v, "t").expect("no defaults");
        assert_eq!(c.default_task_loss_requirement, None);
        assert_eq!(c.default_gazing_ratio, None);

        // "default" rope type is plain RoPE; the legacy `type` key is read too.
        let mut v = fixture_json();
        set(
            &mut v,
            &format!("{DEC}/rope_scaling"),
            json!({"type": "default"}),
        );
        let c = AutoGazeConfig::from_value(&v, "t").expect("default rope");
        assert_eq!(c.decoder.rope_scaling, None);

        // Scales are sorted like the official code; a single integer scale works.
        let mut v = fixture_json();
        set(&mut v, "/scales", json!("224 + 32+112+64"));
        let c = AutoGazeConfig::from_value(&v, "t").expect("unsorted scales");
        assert_eq!(c.scales, vec![32, 64, 112, 224]);
    }

    #[test]
    fn tokens_each_scale_matches_python() {
        assert_eq!(
            tokens_each_scale(&[32, 64, 112, 224], 265),
            vec![4, 16, 49, 196]
        );
        assert_eq!(tokens_each_scale(&[224], 196), vec![196]);
        assert_eq!(exact_sqrt(196), Some(14));
        assert_eq!(exact_sqrt(195), None);
    }
}
