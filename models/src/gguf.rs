//! Reading a GGUF header safely. candle's reader checks lengths against the
//! file, but divides by the header's `general.alignment` unchecked: a file
//! (or a header a peer sent) declaring alignment 0 would panic it. So the
//! metadata is walked first, skipping every value by its declared size and
//! stopping at the first one past the end of the file, and an alignment
//! that is 0 or not a power of two is a typed error before candle reads.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;

use crate::ModelError;

/// The key whose value candle divides by.
const ALIGNMENT_KEY: &[u8] = b"general.alignment";
/// Deepest nesting of arrays a header may use (GGUF has no nested arrays
/// in practice; this only bounds the walk).
const MAX_DEPTH: u32 = 2;

/// What went wrong walking a header (becomes [`ModelError::BadGguf`]).
struct Bad(String);

impl From<std::io::Error> for Bad {
    fn from(e: std::io::Error) -> Self {
        Bad(format!("header ends early: {e}"))
    }
}

struct Walker<'a, R> {
    r: &'a mut R,
    /// Header of format version 1 (32-bit lengths and counts).
    v1: bool,
    len: u64,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn u32(&mut self) -> Result<u32, Bad> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Bad> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length or count: 32 bits in version 1, 64 after.
    fn count(&mut self) -> Result<u64, Bad> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    /// Moves `n` bytes on, refusing to pass the end of the file.
    fn skip(&mut self, n: u64) -> Result<(), Bad> {
        let at = self.r.stream_position()?;
        match at.checked_add(n) {
            Some(end) if end <= self.len => {
                self.r.seek(SeekFrom::Start(end))?;
                Ok(())
            }
            _ => Err(Bad(format!(
                "a value of {n} bytes at byte {at} passes the end of the file ({} bytes)",
                self.len
            ))),
        }
    }

    /// Reads a string if it is `want` (returns whether), else skips it.
    fn string_is(&mut self, want: &[u8]) -> Result<bool, Bad> {
        let n = self.count()?;
        if n == want.len() as u64 {
            let mut b = vec![0u8; want.len()];
            self.r.read_exact(&mut b)?;
            return Ok(b == want);
        }
        self.skip(n)?;
        Ok(false)
    }

    /// Skips a value of GGUF type `t`; returns it when it is an integer.
    fn value(&mut self, t: u32, depth: u32) -> Result<Option<i128>, Bad> {
        let fixed = |s: &mut Self, n: usize| -> Result<i128, Bad> {
            let mut b = [0u8; 8];
            s.r.read_exact(&mut b[..n])?;
            Ok(match (t, n) {
                (1, 1) => i128::from(b[0] as i8),
                (3, 2) => i128::from(i16::from_le_bytes([b[0], b[1]])),
                (5, 4) => i128::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                (11, 8) => i128::from(i64::from_le_bytes(b)),
                _ => i128::from(u64::from_le_bytes(b)),
            })
        };
        Ok(match t {
            0 | 1 | 7 => Some(fixed(self, 1)?),
            2 | 3 => Some(fixed(self, 2)?),
            4 | 5 => Some(fixed(self, 4)?),
            10 | 11 => Some(fixed(self, 8)?),
            6 => {
                self.skip(4)?;
                None
            }
            12 => {
                self.skip(8)?;
                None
            }
            8 => {
                let n = self.count()?;
                self.skip(n)?;
                None
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(Bad("arrays nested too deep".into()));
                }
                let elem = self.u32()?;
                let n = self.count()?;
                let size = match elem {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    8 | 9 => None,
                    t => return Err(Bad(format!("unknown value type {t}"))),
                };
                match size {
                    Some(s) => self.skip(n.checked_mul(s).ok_or_else(|| {
                        Bad(format!("an array of {n} values is larger than any file"))
                    })?)?,
                    None => {
                        // Each element takes at least 8 bytes: a count past
                        // what the file can hold stops here.
                        if n > self.len / 8 {
                            return Err(Bad(format!(
                                "an array of {n} values does not fit in the file"
                            )));
                        }
                        for _ in 0..n {
                            self.value(elem, depth + 1)?;
                        }
                    }
                }
                None
            }
            t => return Err(Bad(format!("unknown value type {t}"))),
        })
    }
}

/// The `general.alignment` a header declares, if any.
fn declared_alignment<R: Read + Seek>(r: &mut R, len: u64) -> Result<Option<i128>, Bad> {
    let mut w = Walker { r, v1: false, len };
    let magic = w.u32()?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        // Not GGUF at all: candle says so in its own words.
        return Ok(None);
    }
    let version = w.u32()?;
    w.v1 = version == 1;
    let _tensors = w.count()?;
    let kvs = w.count()?;
    // Each entry takes at least 12 bytes.
    if kvs > len / 12 {
        return Err(Bad(format!(
            "{kvs} metadata entries do not fit in the file"
        )));
    }
    let mut alignment = None;
    for _ in 0..kvs {
        let is_alignment = w.string_is(ALIGNMENT_KEY)?;
        let t = w.u32()?;
        let v = w.value(t, 0)?;
        if is_alignment {
            alignment = Some(v.ok_or_else(|| {
                Bad(format!(
                    "general.alignment is of value type {t}, not an integer"
                ))
            })?);
        }
    }
    Ok(alignment)
}

/// ggml's name of tensor type `t`, for types candle cannot read.
fn ggml_type_name(t: u32) -> String {
    match t {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        t => return format!("ggml type {t}"),
    }
    .to_string()
}

/// Tensor types candle reads (F32, F16, Q4_0 .. Q8_K, BF16).
fn candle_reads(t: u32) -> bool {
    matches!(t, 0..=3 | 6..=15 | 30)
}

/// The first tensor of a header whose type candle cannot read: its name
/// and ggml's name for the type.
fn first_unreadable_tensor<R: Read + Seek>(
    r: &mut R,
    len: u64,
) -> Result<Option<(String, String)>, Bad> {
    let mut w = Walker { r, v1: false, len };
    let magic = w.u32()?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Ok(None);
    }
    w.v1 = w.u32()? == 1;
    let tensors = w.count()?;
    let kvs = w.count()?;
    if kvs > len / 12 || tensors > len / 24 {
        return Err(Bad("the header's counts do not fit in the file".into()));
    }
    for _ in 0..kvs {
        w.string_is(b"")?;
        let t = w.u32()?;
        w.value(t, 0)?;
    }
    for _ in 0..tensors {
        let n = w.count()?;
        if n > 4096 {
            return Err(Bad(format!("a tensor name of {n} bytes")));
        }
        let mut name = vec![0u8; n as usize];
        w.r.read_exact(&mut name)?;
        let dims = w.u32()?;
        if dims > 8 {
            return Err(Bad(format!("a tensor of {dims} dimensions")));
        }
        for _ in 0..dims {
            w.count()?;
        }
        let t = w.u32()?;
        w.u64()?;
        if !candle_reads(t) {
            return Ok(Some((
                String::from_utf8_lossy(&name).into_owned(),
                ggml_type_name(t),
            )));
        }
    }
    Ok(None)
}

/// Reads the GGUF header of `file` (at `path`, for messages) with candle,
/// after checking what candle does not: the declared alignment.
pub fn read_content<R: Read + Seek>(file: &mut R, path: &Path) -> Result<Content, ModelError> {
    let bad = |reason: String| ModelError::BadGguf {
        path: path.to_path_buf(),
        reason,
    };
    let start = file
        .stream_position()
        .map_err(|e| ModelError::io(path, e))?;
    let end = file
        .seek(SeekFrom::End(0))
        .map_err(|e| ModelError::io(path, e))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| ModelError::io(path, e))?;
    match declared_alignment(file, end) {
        Ok(Some(a)) if a <= 0 || a > i128::from(u32::MAX) || (a as u64).count_ones() != 1 => {
            return Err(bad(format!(
                "general.alignment is {a}; it must be a power of two"
            )));
        }
        Ok(_) => {}
        Err(Bad(reason)) => return Err(bad(reason)),
    }
    file.seek(SeekFrom::Start(start))
        .map_err(|e| ModelError::io(path, e))?;
    let read = Content::read(file);
    read.or_else(|e| {
        // candle appends a backtrace after a newline when RUST_BACKTRACE is set.
        let reason = e.to_string().lines().next().unwrap_or("").to_string();
        if !reason.contains("unknown dtype") {
            return Err(bad(reason));
        }
        // Name the tensor and its type (IQ-quants and the like).
        file.seek(SeekFrom::Start(start))
            .map_err(|e| ModelError::io(path, e))?;
        Err(match first_unreadable_tensor(file, end) {
            Ok(Some((tensor, dtype))) => ModelError::UnsupportedQuant { tensor, dtype },
            _ => ModelError::UnsupportedQuant {
                tensor: "(header)".into(),
                dtype: reason,
            },
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-3 header with the given metadata entries (already encoded
    /// as type + value) and no tensors.
    fn header(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x4655_4747u32.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(v);
        }
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    fn read(bytes: Vec<u8>) -> Result<Content, ModelError> {
        read_content(&mut std::io::Cursor::new(bytes), Path::new("x.gguf"))
    }

    #[test]
    fn an_alignment_of_zero_or_not_a_power_of_two_is_a_typed_error() {
        for a in [0u32, 3, 48] {
            let h = header(&[
                ("general.name", 8, string("m")),
                ("general.alignment", 4, a.to_le_bytes().to_vec()),
            ]);
            match read(h) {
                Err(ModelError::BadGguf { reason, .. }) => {
                    assert!(reason.contains("alignment"), "{reason}")
                }
                other => panic!("alignment {a}: {other:?}"),
            }
        }
        // Signed zero too.
        let h = header(&[("general.alignment", 5, 0i32.to_le_bytes().to_vec())]);
        assert!(matches!(read(h), Err(ModelError::BadGguf { .. })));
    }

    #[test]
    fn a_good_alignment_and_arrays_are_read_by_candle() {
        // An array of two strings, one of which looks like the key.
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend_from_slice(&2u64.to_le_bytes());
        tokens.extend(string("a"));
        tokens.extend(string("general.alignment"));
        let h = header(&[
            ("tokenizer.ggml.tokens", 9, tokens),
            ("general.alignment", 4, 64u32.to_le_bytes().to_vec()),
            ("x", 6, 1.5f32.to_le_bytes().to_vec()),
        ]);
        let c = read(h).unwrap();
        assert_eq!(c.tensor_data_offset % 64, 0);
        assert!(c.metadata.contains_key("tokenizer.ggml.tokens"));
    }

    #[test]
    fn an_iq_quant_tensor_is_named_with_its_type() {
        let mut h = header(&[("general.name", 8, string("m"))]);
        // One tensor: name, 1 dim of 256, type 17 (IQ2_XS), offset 0.
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        h.extend(string("blk.0.ffn_down.weight"));
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&256u64.to_le_bytes());
        h.extend_from_slice(&17u32.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        h.extend(vec![0u8; 512]);
        match read(h) {
            Err(ModelError::UnsupportedQuant { tensor, dtype }) => {
                assert_eq!(tensor, "blk.0.ffn_down.weight");
                assert_eq!(dtype, "IQ2_XS");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_counts_and_lengths_stop_at_the_end_of_the_file() {
        // A string claiming more bytes than the file has.
        let mut h = header(&[("k", 8, string("v"))]);
        let at = h.len() - 9;
        h[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read(h), Err(ModelError::BadGguf { .. })));
        // An array of u64::MAX strings.
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read(header(&[("k", 9, arr)])),
            Err(ModelError::BadGguf { .. })
        ));
        // Arrays of arrays of arrays.
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend_from_slice(&1u64.to_le_bytes());
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            read(header(&[("k", 9, nested)])),
            Err(ModelError::BadGguf { .. })
        ));
        // An unknown value type.
        assert!(matches!(
            read(header(&[("k", 99, vec![0; 8])])),
            Err(ModelError::BadGguf { .. })
        ));
    }
}
