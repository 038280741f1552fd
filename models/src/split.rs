//! Split GGUFs (`NAME-00001-of-00003.gguf`, as llama.cpp's `gguf-split`
//! writes them): found from any part's name, and joined into one GGUF by
//! streaming each tensor's bytes, so the rest of Hearth (the sparse-file
//! transfer between members, the content id) sees one file.
//!
//! Every part is a whole GGUF: the first holds the model's metadata, each
//! holds some tensors, and `split.no` / `split.count` /
//! `split.tensors.count` say which part it is. The joined file keeps the
//! first part's metadata without the `split.*` keys, every tensor in part
//! order, and the first part's alignment.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{ModelError, Result};
use crate::weights::value_usize;

/// Most parts a split model may have.
pub const MAX_PARTS: usize = 1000;
/// Largest `general.alignment` a joined file keeps (llama.cpp writes 32):
/// the padding is written out, so a hostile one must not be huge.
pub const MAX_ALIGNMENT: u64 = 1 << 16;

/// The parts of the split GGUF `path` belongs to, by its name
/// (`…-00002-of-00003.gguf`), in order, and the joined file's name beside
/// them (`….gguf`). None: not a part's name.
pub fn parts_of(path: &Path) -> Option<(Vec<PathBuf>, PathBuf)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (base, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(index) || base.is_empty() {
        return None;
    }
    let n: usize = count.parse().ok()?;
    let i: usize = index.parse().ok()?;
    if n == 0 || n > MAX_PARTS || i == 0 || i > n {
        return None;
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let parts = (1..=n)
        .map(|k| dir.join(format!("{base}-{k:05}-of-{n:05}.gguf")))
        .collect();
    Some((parts, dir.join(format!("{base}.gguf"))))
}

/// One tensor of one part.
struct Source {
    name: String,
    /// Dimensions as candle orders them (the file stores them reversed).
    dims: Vec<usize>,
    dtype: GgmlDType,
    part: usize,
    /// Absolute offset in its part.
    at: u64,
    len: u64,
}

fn bad(path: &Path, reason: String) -> ModelError {
    ModelError::BadGguf {
        path: path.to_path_buf(),
        reason,
    }
}

fn meta_usize(c: &Content, key: &str) -> Option<usize> {
    c.metadata.get(key).and_then(value_usize)
}

/// Joins the split GGUF whose parts are `parts` (in order) into `dst`,
/// written durably. `progress(done, total)` follows the tensor bytes.
/// Every part is checked first: its `split.*` keys, no tensor twice, every
/// tensor inside its file.
pub fn join(parts: &[PathBuf], dst: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let n = parts.len();
    if n == 0 || n > MAX_PARTS {
        return Err(ModelError::InvalidConfig(format!(
            "a split GGUF of {n} parts (at most {MAX_PARTS})"
        )));
    }
    let mut first: Option<Content> = None;
    let mut sources = Vec::new();
    let mut seen = HashSet::new();
    for (i, path) in parts.iter().enumerate() {
        let mut f = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::NotFound {
                what: path.display().to_string(),
                hint: format!(" (part {} of {n} of a split GGUF)", i + 1),
            },
            _ => ModelError::io(path, e),
        })?;
        let file_len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let c = crate::gguf::read_content(&mut f, path)?;
        let align = meta_usize(&c, "general.alignment").unwrap_or(32) as u64;
        if !(1..=MAX_ALIGNMENT).contains(&align) {
            return Err(bad(
                path,
                format!("general.alignment {align} (at most {MAX_ALIGNMENT})"),
            ));
        }
        if meta_usize(&c, "split.count").is_some_and(|k| k != n) {
            return Err(bad(path, format!("its split.count is not {n}")));
        }
        if meta_usize(&c, "split.no").is_some_and(|k| k != i) {
            return Err(bad(path, format!("it is not part {} (split.no)", i + 1)));
        }
        let mut names: Vec<&String> = c.tensor_infos.keys().collect();
        // Part order, then each part's own tensor order (by offset).
        names.sort_by_key(|name| c.tensor_infos.get(*name).map_or(0, |t| t.offset));
        for name in names {
            let Some(t) = c.tensor_infos.get(name) else {
                continue;
            };
            if !seen.insert(name.clone()) {
                return Err(bad(path, format!("tensor {name} is in two parts")));
            }
            let elems = t
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let block = (t.ggml_dtype.block_size() as u64).max(1);
            let len = elems
                .filter(|e| e % block == 0)
                .and_then(|e| (e / block).checked_mul(t.ggml_dtype.type_size() as u64));
            let at = c.tensor_data_offset.checked_add(t.offset);
            let (Some(len), Some(at)) = (len, at) else {
                return Err(bad(path, format!("tensor {name} has an impossible size")));
            };
            if at.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(ModelError::Truncated {
                    path: path.clone(),
                    tensor: name.clone(),
                    needed: at.saturating_add(len),
                    len: file_len,
                });
            }
            sources.push(Source {
                name: name.clone(),
                dims: t.shape.dims().to_vec(),
                dtype: t.ggml_dtype,
                part: i,
                at,
                len,
            });
        }
        if i == 0 {
            first = Some(c);
        }
    }
    let first = first.ok_or_else(|| ModelError::InvalidConfig("no parts".into()))?;
    if let Some(total) = meta_usize(&first, "split.tensors.count")
        && total != sources.len()
    {
        return Err(bad(
            &parts[0],
            format!(
                "split.tensors.count says {total} tensors, the parts hold {}",
                sources.len()
            ),
        ));
    }
    let align = meta_usize(&first, "general.alignment").unwrap_or(32) as u64;
    let mut meta: Vec<(&String, &Value)> = first
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("split."))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(b.0));
    let file = crate::durable::create(dst)?;
    let mut w = BufWriter::new(file);
    let io = |e: std::io::Error| ModelError::io(dst, e);
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(sources.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_string(&mut header, k);
        put_value(&mut header, v, true).map_err(|e| bad(&parts[0], e))?;
    }
    let mut offset = 0u64;
    for s in &sources {
        put_string(&mut header, &s.name);
        header.extend_from_slice(&(s.dims.len() as u32).to_le_bytes());
        for d in s.dims.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&dtype_id(s.dtype).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = offset.saturating_add(s.len).next_multiple_of(align);
    }
    let pad = (header.len() as u64).next_multiple_of(align) - header.len() as u64;
    header.resize(header.len() + pad as usize, 0);
    w.write_all(&header).map_err(io)?;
    let total: u64 = sources.iter().map(|s| s.len).sum();
    let mut done = 0u64;
    let mut files: Vec<Option<File>> = (0..n).map(|_| None).collect();
    for s in &sources {
        let f = match &mut files[s.part] {
            Some(f) => f,
            slot => slot
                .insert(File::open(&parts[s.part]).map_err(|e| ModelError::io(&parts[s.part], e))?),
        };
        f.seek(SeekFrom::Start(s.at))
            .map_err(|e| ModelError::io(&parts[s.part], e))?;
        let copied = std::io::copy(&mut f.take(s.len), &mut w).map_err(io)?;
        if copied != s.len {
            return Err(ModelError::Truncated {
                path: parts[s.part].clone(),
                tensor: s.name.clone(),
                needed: s.at.saturating_add(s.len),
                len: s.at.saturating_add(copied),
            });
        }
        let pad = s.len.next_multiple_of(align) - s.len;
        w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        done += s.len;
        progress(done, total);
    }
    let f = w
        .into_inner()
        .map_err(|e| ModelError::io(dst, e.into_error()))?;
    f.commit().map_err(io)
}

/// llama.cpp's number for a tensor type.
fn dtype_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's number for a value's type.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A value (with its type first when `typed`), as GGUF stores it.
fn put_value(out: &mut Vec<u8>, v: &Value, typed: bool) -> std::result::Result<(), String> {
    if typed {
        out.extend_from_slice(&type_id(v).to_le_bytes());
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let t = items.first().map_or(4, type_id);
            if items.iter().any(|x| type_id(x) != t) {
                return Err("a metadata array mixes value types".into());
            }
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x, false)?;
            }
        }
    }
    Ok(())
}
