//! Shader sources, the define mechanism, and the pipeline cache.
//!
//! Each kernel family is one file in `shaders/`; `common.wgsl` is prepended to every one.
//! Specialisation is plain text: a [`PipelineKey`] carries `defines` (name, value) that
//! replace `{{NAME}}` in the source and select `#if NAME` / `#if NAME == value` / `#else` /
//! `#endif` blocks (nestable). The defines are part of the key, so every variant is compiled
//! once and cached.
//!
//! Bind group layouts are derived from the preprocessed source: every
//! `@group(0) @binding(n) var<uniform>` becomes a uniform binding with a dynamic offset (the
//! per-dispatch parameter block, see [`super::buffer::ParamArena`]), every
//! `var<storage, read>` a read-only storage binding and every `var<storage, read_write>` a
//! read-write one. A kernel therefore declares its bindings once, in WGSL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

use super::context::GpuContext;

/// The WGSL sources, embedded at compile time.
pub const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Source of the kernel family `name` (a file `shaders/<name>.wgsl`).
pub fn shader_source(name: &str) -> Option<&'static str> {
    Some(match name {
        "resize" => include_str!("../../shaders/resize.wgsl"),
        "pil_resize" => include_str!("../../shaders/pil_resize.wgsl"),
        "matmul" => include_str!("../../shaders/matmul.wgsl"),
        "layernorm" => include_str!("../../shaders/layernorm.wgsl"),
        "attention" => include_str!("../../shaders/attention.wgsl"),
        "select" => include_str!("../../shaders/select.wgsl"),
        "score" => include_str!("../../shaders/score.wgsl"),
        "probe" => include_str!("../../shaders/probe.wgsl"),
        _ => return None,
    })
}

/// Identifies one compiled pipeline: kernel family, entry point and specialisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
}

impl PipelineKey {
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        Self {
            shader,
            entry,
            defines: Vec::new(),
        }
    }

    /// Adds a define (kept sorted so equal sets give equal keys).
    pub fn define(mut self, name: &str, value: impl ToString) -> Self {
        self.defines.retain(|(n, _)| n != name);
        self.defines.push((name.to_string(), value.to_string()));
        self.defines.sort();
        self
    }
}

fn truthy(defines: &HashMap<&str, &str>, cond: &str) -> Result<bool> {
    let cond = cond.trim();
    if let Some((name, value)) = cond.split_once("==") {
        let name = name.trim();
        let value = value.trim();
        return Ok(defines.get(name).map(|v| *v == value).unwrap_or(false));
    }
    if let Some(name) = cond.strip_prefix('!') {
        return Ok(!truthy(defines, name)?);
    }
    if cond.is_empty() {
        return Err(Error::Backend("empty #if condition in a shader".into()));
    }
    Ok(defines
        .get(cond)
        .map(|v| *v != "0" && !v.is_empty())
        .unwrap_or(false))
}

/// Applies `#if`/`#else`/`#endif` blocks and `{{NAME}}` substitutions.
pub fn preprocess(src: &str, defines: &[(String, String)]) -> Result<String> {
    let map: HashMap<&str, &str> = defines
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Stack of (this block active, some branch of this if already taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let t = line.trim_start();
        let parent_active = stack.iter().all(|(a, _)| *a);
        if let Some(c) = t.strip_prefix("#if ") {
            let v = parent_active && truthy(&map, c)?;
            stack.push((v, v));
            out.push('\n');
            continue;
        }
        if let Some(c) = t.strip_prefix("#elif ") {
            let (_, taken) = stack
                .pop()
                .ok_or_else(|| Error::Backend("#elif without #if in a shader".into()))?;
            let parent_active = stack.iter().all(|(a, _)| *a);
            let v = parent_active && !taken && truthy(&map, c)?;
            stack.push((v, taken || v));
            out.push('\n');
            continue;
        }
        if t.starts_with("#else") {
            let (_, taken) = stack
                .pop()
                .ok_or_else(|| Error::Backend("#else without #if in a shader".into()))?;
            let parent_active = stack.iter().all(|(a, _)| *a);
            stack.push((parent_active && !taken, true));
            out.push('\n');
            continue;
        }
        if t.starts_with("#endif") {
            stack
                .pop()
                .ok_or_else(|| Error::Backend("#endif without #if in a shader".into()))?;
            out.push('\n');
            continue;
        }
        if parent_active {
            if line.contains("{{") {
                let mut l = line.to_string();
                for (k, v) in defines {
                    l = l.replace(&format!("{{{{{k}}}}}"), v);
                }
                if let Some(pos) = l.find("{{") {
                    return Err(Error::Backend(format!(
                        "undefined shader define near `{}`",
                        &l[pos..(pos + 24).min(l.len())]
                    )));
                }
                out.push_str(&l);
            } else {
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    if !stack.is_empty() {
        return Err(Error::Backend("unterminated #if in a shader".into()));
    }
    Ok(out)
}

/// Kind of one binding, as declared in WGSL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingKind {
    /// `var<uniform>`: the per-dispatch parameter block (dynamic offset).
    Params,
    ReadOnly,
    ReadWrite,
}

/// Parses `@group(0) @binding(n) var<...>` declarations.
pub fn parse_bindings(src: &str) -> Result<Vec<(u32, BindingKind)>> {
    let mut out = Vec::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("//") {
            continue;
        }
        let Some(pos) = t.find("@binding(") else {
            continue;
        };
        let rest = &t[pos + 9..];
        let end = rest
            .find(')')
            .ok_or_else(|| Error::Backend(format!("bad binding line `{t}`")))?;
        let n: u32 = rest[..end]
            .trim()
            .parse()
            .map_err(|_| Error::Backend(format!("bad binding index in `{t}`")))?;
        let kind = if t.contains("var<uniform>") {
            BindingKind::Params
        } else if t.contains("var<storage, read_write>") {
            BindingKind::ReadWrite
        } else if t.contains("var<storage, read>") || t.contains("var<storage>") {
            BindingKind::ReadOnly
        } else {
            return Err(Error::Backend(format!("unsupported binding `{t}`")));
        };
        out.push((n, kind));
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// A compiled compute pipeline with its bind group layout and binding list.
#[derive(Debug)]
pub struct Kernel {
    pub key: PipelineKey,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub bindings: Vec<(u32, BindingKind)>,
}

/// Compiled pipelines by key.
#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<PipelineKey, Arc<Kernel>>>,
}

impl GpuContext {
    /// The pipeline for `key`, compiled on first use.
    pub fn kernel(&self, key: &PipelineKey) -> Result<Arc<Kernel>> {
        {
            let map = self.pipelines.map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = map.get(key) {
                return Ok(k.clone());
            }
        }
        let body = shader_source(key.shader)
            .ok_or_else(|| Error::Backend(format!("unknown shader family `{}`", key.shader)))?;
        let src = preprocess(&format!("{COMMON}\n{body}"), &key.defines)?;
        let bindings = parse_bindings(&src)?;
        let what = format!(
            "compiling shader {}::{} {:?}",
            key.shader, key.entry, key.defines
        );
        let kernel = self.scoped(&what, || {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(key.shader),
                source: wgpu::ShaderSource::Wgsl(src.clone().into()),
            };
            // SAFETY: buffer bounds checks stay on. Two of naga's guards are dropped:
            // * forced loop bounding (against infinite loops): every loop in `shaders/` has a
            //   bound that is a constant or a uniform value, so none can run forever. The
            //   guard's counter keeps drivers from unrolling the small constant loops of the
            //   GEMM/attention micro-kernels, which then index private arrays dynamically
            //   (local memory): on an H100 the kernels ran ~30x slower with it;
            // * integer division guards (against x / 0 and INT_MIN / -1): every divisor in
            //   `shaders/` is a non-zero constant or a launch parameter the launchers set
            //   non-zero, and no signed division can overflow. The guard turns division by a
            //   constant into a full software division.
            let module = unsafe {
                self.device.create_shader_module_trusted(
                    desc,
                    wgpu::ShaderRuntimeChecks {
                        force_loop_bounding: false,
                        int_div_checks: false,
                        ..wgpu::ShaderRuntimeChecks::checked()
                    },
                )
            };
            let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
                .iter()
                .map(|(n, kind)| wgpu::BindGroupLayoutEntry {
                    binding: *n,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: match kind {
                            BindingKind::Params => wgpu::BufferBindingType::Uniform,
                            BindingKind::ReadOnly => {
                                wgpu::BufferBindingType::Storage { read_only: true }
                            }
                            BindingKind::ReadWrite => {
                                wgpu::BufferBindingType::Storage { read_only: false }
                            }
                        },
                        has_dynamic_offset: *kind == BindingKind::Params,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(key.entry),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(key.entry),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.entry),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
            Ok(Kernel {
                key: key.clone(),
                pipeline,
                layout,
                bindings: bindings.clone(),
            })
        })?;
        let kernel = Arc::new(kernel);
        let mut map = self.pipelines.map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.entry(key.clone()).or_insert(kernel).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_selects_blocks_and_substitutes() {
        let src = "a\n#if X\nx={{V}}\n#if Y == 2\ny\n#else\nny\n#endif\n#else\nnx\n#endif\nz\n";
        let d = vec![
            ("V".to_string(), "7".to_string()),
            ("X".to_string(), "1".to_string()),
            ("Y".to_string(), "2".to_string()),
        ];
        let out = preprocess(src, &d).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines, vec!["a", "x=7", "y", "z"]);
        let out = preprocess(src, &[]).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines, vec!["a", "nx", "z"]);
        assert!(preprocess("#if X\n", &[]).is_err());
        assert!(preprocess("{{NOPE}}\n", &[]).is_err());
    }

    #[test]
    fn bindings_are_parsed() {
        let src = "@group(0) @binding(0) var<uniform> p: P;\n\
                   @group(0) @binding(2) var<storage, read_write> o: array<f32>; // [N]\n\
                   @group(0) @binding(1) var<storage, read> a: array<f32>;\n";
        let b = parse_bindings(src).unwrap();
        assert_eq!(
            b,
            vec![
                (0, BindingKind::Params),
                (1, BindingKind::ReadOnly),
                (2, BindingKind::ReadWrite)
            ]
        );
    }
}
