//! Tokenizers built from GGUF metadata (gpt2-style byte-level BPE, or
//! SentencePiece `llama` vocabularies) or from a Hugging Face
//! `tokenizer.json`, giving the same ids as llama.cpp.
//!
//! A SentencePiece vocabulary (Llama 2, Mistral, Gemma, Phi-3) becomes a
//! byte-fallback BPE of the `tokenizers` crate as Hugging Face converts one:
//! merges from the pieces' scores, `▁` for spaces (and a leading one unless
//! `tokenizer.ggml.add_space_prefix` is false), `<0xNN>` byte pieces for
//! text the vocabulary lacks.
//!
//! llama.cpp pre-tokenizes byte-level BPE with a list of regexes chosen by
//! `tokenizer.ggml.pre`; we rebuild that as a `Split` sequence followed by a
//! byte-level mapping without prefix space (candle's `TokenizerFromGguf`
//! adds a leading space, which changes every id after a prompt's start).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::weights::{GgufMetadata, value_usize};

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The first split of llama.cpp's `default` pre-tokenizer: runs of
/// punctuation and of the ASCII symbols `$+<=>^~|`.
const DEFAULT_PUNCT_RE: &str = r"[\p{P}\$\+<=>\^~\|]+";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The chat format Mistral's library writes for tekken files of version 3
/// (Nemo): each user turn in `[INST]…[/INST]`, the system prompt opening
/// the last one, each answer ended by `</s>`; for folders that ship
/// `tekken.json` and no template.
const TEKKEN_V3_TEMPLATE: &str = "{{- bos_token }}\
{%- set ns = namespace(system='', last=-1) %}\
{%- for m in messages %}\
{%- if m.role == 'system' %}{%- set ns.system = m.content %}\
{%- elif m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}\
{%- endfor %}\
{%- for m in messages %}\
{%- if m.role == 'user' %}{{- '[INST]' }}\
{%- if ns.system and loop.index0 == ns.last %}{{- ns.system + '\\n\\n' }}{%- endif %}\
{{- m.content + '[/INST]' }}\
{%- elif m.role == 'assistant' %}{{- m.content + eos_token }}\
{%- elif m.role != 'system' %}{{- raise_exception('Only system, user and assistant roles are supported') }}\
{%- endif %}\
{%- endfor %}";

/// The chat format of tekken files of version 7 and later (Mistral Small
/// 3): the system prompt in its own `[SYSTEM_PROMPT]` block.
const TEKKEN_TEMPLATE: &str = "{{- bos_token }}\
{%- for m in messages %}\
{%- if m.role == 'system' %}{{- '[SYSTEM_PROMPT]' + m.content + '[/SYSTEM_PROMPT]' }}\
{%- elif m.role == 'user' %}{{- '[INST]' + m.content + '[/INST]' }}\
{%- elif m.role == 'assistant' %}{{- m.content + eos_token }}\
{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}\
{%- endif %}\
{%- endfor %}";

/// Mistral's tekken (Nemo, Small 3, Pixtral): case runs, digits one by one,
/// symbols keep trailing newlines and slashes.
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (o200k) split, which Phi-4-mini's and Llama 4's GGUFs name
/// (`gpt-4o`, `llama4`): case-aware letter runs with an optional
/// contraction, numbers in threes.
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's pre-tokenizer regexes for a `tokenizer.ggml.pre` value.
fn pre_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        // llama.cpp's fallback for a file that names no known split:
        // punctuation runs, then GPT-2's split, then digit runs cut in threes.
        "default" => &[DEFAULT_PUNCT_RE, GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"],
        "gpt2" | "gpt-2" => &[GPT2_RE],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            &[r"\p{N}", GPT2_RE]
        }
        // DBRX's tokenizer (Phi-4's GGUFs) splits as Llama 3's.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => &[LLAMA3_RE],
        "gpt-4o" | "llama4" => &[GPT4O_RE],
        "qwen2" | "deepseek-r1-qwen" => &[QWEN2_RE],
        "tekken" => &[TEKKEN_RE],
        _ => return None,
    })
}

/// A GGUF's chat templates: `tokenizer.chat_template` (the default) and the
/// named ones llama.cpp's converter writes as `tokenizer.chat_template.NAME`.
fn gguf_templates(m: &GgufMetadata) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(t) = str_meta(m, "tokenizer.chat_template") {
        out.push((crate::chat::DEFAULT_TEMPLATE.into(), t.to_string()));
    }
    let mut named: Vec<(String, String)> = m
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("tokenizer.chat_template.")?;
            match v {
                Value::String(t) if !name.is_empty() => Some((name.to_string(), t.clone())),
                _ => None,
            }
        })
        .collect();
    named.sort();
    for (name, t) in named {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, t));
        }
    }
    out
}

/// A model folder's chat templates, where transformers keeps them:
/// `chat_template.jinja` (the default, over the others),
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// `{name, template}`), or `chat_template.json`.
fn dir_templates(dir: &Path, cfg: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let default = crate::chat::DEFAULT_TEMPLATE;
    let mut out: Vec<(String, String)> = Vec::new();
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?;
        out.push((default.into(), t));
    }
    let from_json = |v: Option<&serde_json::Value>, out: &mut Vec<(String, String)>| match v {
        Some(serde_json::Value::String(t)) => out.push((default.into(), t.clone())),
        Some(serde_json::Value::Array(list)) => {
            for item in list {
                if let (Some(n), Some(t)) = (
                    item.get("name").and_then(|v| v.as_str()),
                    item.get("template").and_then(|v| v.as_str()),
                ) {
                    out.push((n.to_string(), t.to_string()));
                }
            }
        }
        _ => {}
    };
    from_json(cfg.get("chat_template"), &mut out);
    let side = dir.join("chat_template.json");
    if side.is_file() {
        let text = std::fs::read_to_string(&side).map_err(|e| ModelError::io(&side, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Template(format!("{}: {e}", side.display())))?;
        from_json(v.get("chat_template"), &mut out);
    }
    // The first of each name wins; the default leads.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(n, _)| seen.insert(n.clone()));
    if let Some(i) = out.iter().position(|(n, _)| n == default) {
        let d = out.remove(i);
        out.insert(0, d);
    }
    Ok(out)
}

/// Mistral's `tekken.json` (a tiktoken vocabulary: each token's bytes by
/// rank, the pre-tokenizer pattern, and special tokens before it).
#[derive(serde::Deserialize)]
struct TekkenFile {
    config: TekkenConfig,
    vocab: Vec<TekkenToken>,
    #[serde(default)]
    special_tokens: Option<Vec<TekkenSpecial>>,
}

#[derive(serde::Deserialize)]
struct TekkenConfig {
    pattern: String,
    default_vocab_size: usize,
    default_num_special_tokens: usize,
    /// `v3`, `v7`, …: which chat format goes with it.
    #[serde(default)]
    version: Option<String>,
}

#[derive(serde::Deserialize)]
struct TekkenToken {
    rank: usize,
    token_bytes: String,
}

#[derive(serde::Deserialize)]
struct TekkenSpecial {
    rank: usize,
    token_str: String,
}

/// The special tokens of tekken files that list none (versions up to 7),
/// ids 0 to 19; the rest up to the special count are `<SPECIAL_i>`.
const TEKKEN_SPECIALS: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
];

/// Largest `tekken.json` read (real ones are 15-20 MB).
const MAX_TEKKEN_FILE: u64 = 256 << 20;

/// A tokenizer from Mistral's `tekken.json`, as its own library encodes:
/// special tokens take ids `0..n`, vocabulary rank `r` id `n + r` (the
/// vocabulary cut to the model's size); byte-level BPE whose merges are
/// the tiktoken ranks (each token made from the two tokens it splits
/// into, by its rank), a pre-split piece that is a whole token taken as
/// it is, and the file's pattern. Returns the tokenizer, the special
/// tokens by id, and the chat template that goes with its version.
fn tekken(path: &Path) -> Result<(tokenizers::Tokenizer, Vec<String>, &'static str)> {
    use base64::Engine;
    use std::collections::HashMap;
    let bad = |what: String| ModelError::Tokenizer(format!("{}: {what}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| ModelError::io(path, e))?
        .len();
    if len > MAX_TEKKEN_FILE {
        return Err(bad(format!("{len} bytes, over {MAX_TEKKEN_FILE}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let file: TekkenFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let n_special = file.config.default_num_special_tokens;
    let inner = file
        .config
        .default_vocab_size
        .checked_sub(n_special)
        .filter(|&n| n <= file.vocab.len())
        .ok_or_else(|| bad("vocabulary smaller than its declared size".into()))?;
    // Special tokens by id.
    let mut specials: Vec<String> = match &file.special_tokens {
        None => TEKKEN_SPECIALS.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let mut v = vec![String::new(); list.len()];
            for t in list {
                let slot = v
                    .get_mut(t.rank)
                    .filter(|s| s.is_empty())
                    .ok_or_else(|| bad(format!("special token rank {}", t.rank)))?;
                *slot = t.token_str.clone();
            }
            v
        }
    };
    if specials.len() > n_special {
        return Err(bad(format!(
            "{} special tokens, {n_special} declared",
            specials.len()
        )));
    }
    for i in specials.len()..n_special {
        specials.push(format!("<SPECIAL_{i}>"));
    }
    // The vocabulary's bytes by rank.
    let mut by_rank: Vec<Option<Vec<u8>>> = vec![None; inner];
    for t in &file.vocab {
        if t.rank >= inner {
            continue;
        }
        let b = base64::engine::general_purpose::STANDARD
            .decode(&t.token_bytes)
            .map_err(|e| bad(format!("token {}: {e}", t.rank)))?;
        if b.is_empty() || b.len() > MAX_MERGED_PIECE || by_rank[t.rank].replace(b).is_some() {
            return Err(bad(format!(
                "token rank {} empty, over {MAX_MERGED_PIECE} bytes, or repeated",
                t.rank
            )));
        }
    }
    let bytes: Vec<Vec<u8>> = by_rank
        .into_iter()
        .enumerate()
        .map(|(r, b)| b.ok_or_else(|| bad(format!("no token of rank {r}"))))
        .collect::<Result<_>>()?;
    let rank_of: HashMap<&[u8], usize> = bytes
        .iter()
        .enumerate()
        .map(|(r, b)| (b.as_slice(), r))
        .collect();
    let chars: HashMap<u8, char> = byte_chars().into_iter().collect();
    let show = |b: &[u8]| -> String { b.iter().map(|x| chars[x]).collect() };
    // Merges: each token from each split into two tokens, ordered by the
    // token's rank (then by its parts' ranks).
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (r, b) in bytes.iter().enumerate() {
        for cut in 1..b.len() {
            if let (Some(&x), Some(&y)) = (rank_of.get(&b[..cut]), rank_of.get(&b[cut..]))
                && x < r
                && y < r
            {
                merges.push((r, x, y));
            }
        }
    }
    merges.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = specials
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .chain(
            bytes
                .iter()
                .enumerate()
                .map(|(r, b)| (show(b), (n_special + r) as u32)),
        )
        .collect();
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, x, y)| (show(&bytes[x]), show(&bytes[y])))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(tok_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(file.config.pattern.clone()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tok_err)?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(added).map_err(tok_err)?;
    let version: u32 = file
        .config
        .version
        .as_deref()
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let template = if version < 7 {
        TEKKEN_V3_TEMPLATE
    } else {
        TEKKEN_TEMPLATE
    };
    Ok((tok, specials, template))
}

/// A gpt2-style byte-level BPE with llama.cpp's pre-tokenizer `regexes`
/// (`ignore_merges`: a piece in the vocabulary is taken whole).
fn byte_level_bpe(
    tokens: &[String],
    merges: Vec<String>,
    regexes: &[&str],
    ignore_merges: bool,
) -> Result<tokenizers::Tokenizer> {
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|s| {
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("bad merge {s:?}")))
        })
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tok_err)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        pres.push(split.into());
    }
    pres.push(ByteLevel::new(false, false, false).into());
    inner.with_pre_tokenizer(Some(Sequence::new(pres)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// Longest piece (bytes) that becomes a merge; real SentencePiece
/// vocabularies stay far below (pieces of 16 characters by default).
const MAX_MERGED_PIECE: usize = 256;

/// SentencePiece's word-boundary mark.
const SPM_SPACE: &str = "\u{2581}";

/// The merges of a SentencePiece vocabulary: each normal piece that splits
/// into two normal pieces, ranked by the piece's score (ties by the halves'
/// ids). `scores` has one entry per token.
fn spm_merges(tokens: &[String], scores: &[f64], types: &[usize]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let normal = |i: usize| matches!(types.get(i).copied().unwrap_or(1), 1 | 4);
    let mut ranked: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        // Every split of a piece is looked up: a piece longer than any real
        // vocabulary's (a hostile header) would cost its length squared.
        if !normal(i) || piece.len() > MAX_MERGED_PIECE {
            continue;
        }
        for (k, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(k);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r))
                && normal(a)
                && normal(b)
            {
                ranked.push((scores.get(i).copied().unwrap_or(f64::MIN), a, b, i));
            }
        }
    }
    // Highest score first; equal scores by the halves' ids.
    ranked.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    ranked
        .into_iter()
        .map(|(_, a, b, _)| (tokens[a].clone(), tokens[b].clone()))
        .collect()
}

/// A SentencePiece vocabulary (pieces, scores, llama.cpp token types) as a
/// byte-fallback BPE, the way Hugging Face converts one: each normal piece
/// that splits into two pieces of the vocabulary is a merge, ranked by the
/// piece's score (ties by the halves' ids).
fn sentencepiece_bpe(
    tokens: &[String],
    scores: &[f64],
    types: &[usize],
    unk: Option<usize>,
    space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as Decoders;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as Normalizers};

    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = spm_merges(tokens, scores, types);
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk.and_then(|u| tokens.get(u)) {
        bpe = bpe.unk_token(u.clone());
    }
    let mut inner = tokenizers::Tokenizer::new(bpe.build().map_err(tok_err)?);
    let space = SPM_SPACE.to_string();
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        norms.push(Prepend::new(space.clone()).into());
    }
    norms.push(Replace::new(" ", space.as_str()).map_err(tok_err)?.into());
    inner
        .with_normalizer(Some(Normalizers::new(norms)))
        .map_err(tok_err)?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(space.as_str(), " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Decoders::new(decoders)));
    Ok(inner)
}

/// Longest token (in bytes) a grammar may use; longer ones are never
/// allowed under a constraint (llguidance's trie holds up to 1024).
pub const MAX_TOKEN_BYTES: usize = 1000;

/// GPT-2's byte-level alphabet: each byte and the character standing for it.
fn byte_chars() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, char::from(b))
            } else {
                let c = char::from_u32(next).unwrap_or('\u{fffd}');
                next += 1;
                (b, c)
            }
        })
        .collect()
}

/// A vocabulary entry's bytes: byte-level characters mapped back (when
/// `chars` is given), else SentencePiece's `<0xNN>` and `▁`.
fn piece_bytes(text: &str, chars: Option<&std::collections::HashMap<char, u8>>) -> Option<Vec<u8>> {
    if let Some(chars) = chars {
        return text.chars().map(|c| chars.get(&c).copied()).collect();
    }
    if let Some(b) = text
        .strip_prefix("<0x")
        .and_then(|h| h.strip_suffix('>'))
        .filter(|h| h.len() == 2)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        return Some(vec![b]);
    }
    Some(text.replace('\u{2581}', " ").into_bytes())
}

/// A text tokenizer plus what generation needs to know about its special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The byte-level alphabet, when the vocabulary is byte-level.
    byte_chars: std::sync::OnceLock<Option<std::collections::HashMap<char, u8>>>,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    /// The model's chat templates by name, the default first.
    chat_templates: Vec<(String, String)>,
}

fn str_meta<'a>(m: &'a GgufMetadata, key: &str) -> Option<&'a str> {
    match m.get(key) {
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(m: &GgufMetadata) -> Result<Self> {
        let model = str_meta(m, "tokenizer.ggml.model").unwrap_or("");
        let pre = str_meta(m, "tokenizer.ggml.pre").unwrap_or("default");
        let unsupported = || ModelError::UnsupportedTokenizer {
            model: model.to_string(),
            pre: pre.to_string(),
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            match m.get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(ModelError::Tokenizer(format!("{key} holds a non-string"))),
                    })
                    .collect(),
                _ => Err(ModelError::MissingMetadata { key: key.into() }),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<usize> = match m.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| value_usize(v).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let mut inner = match model {
            "gpt2" => {
                let regexes = pre_regexes(pre).ok_or_else(unsupported)?;
                // As llama.cpp: whole-word vocabulary entries win over
                // merges for Llama 3's tokenizer only (not DBRX's or
                // Smaug's, which share its split).
                let ignore = matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "falcon3");
                byte_level_bpe(&tokens, strings("tokenizer.ggml.merges")?, regexes, ignore)?
            }
            "llama" => {
                let scores: Vec<f64> = match m.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| match v {
                            Value::F32(f) => Ok(f64::from(*f)),
                            Value::F64(f) => Ok(*f),
                            _ => Err(ModelError::Tokenizer(
                                "tokenizer.ggml.scores holds a non-number".into(),
                            )),
                        })
                        .collect::<Result<_>>()?,
                    _ => {
                        return Err(ModelError::MissingMetadata {
                            key: "tokenizer.ggml.scores".into(),
                        });
                    }
                };
                let space_prefix = !matches!(
                    m.get("tokenizer.ggml.add_space_prefix"),
                    Some(Value::Bool(false))
                );
                let unk = m
                    .get("tokenizer.ggml.unknown_token_id")
                    .and_then(value_usize);
                sentencepiece_bpe(&tokens, &scores, &types, unk, space_prefix)?
            }
            _ => return Err(unsupported()),
        };
        // Control (3) and user-defined (4) tokens are matched in text as whole tokens.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, 3 | 4))
            .map(|(s, t)| AddedToken::from(s.clone(), *t == 3).normalized(false))
            .collect();
        inner.add_special_tokens(added).map_err(tok_err)?;
        let id = |key: &str| m.get(key).and_then(value_usize).map(|v| v as u32);
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        eos.dedup();
        Ok(Self {
            inner,
            byte_chars: Default::default(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            // llama.cpp's default: SentencePiece vocabularies start with BOS.
            add_bos: match m.get("tokenizer.ggml.add_bos_token") {
                Some(Value::Bool(b)) => *b,
                _ => model == "llama",
            },
            chat_templates: gguf_templates(m),
        })
    }

    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for specials and
    /// the chat template), or Mistral's `tekken.json` in a folder without
    /// `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tekken_path = dir.join("tekken.json");
        if !path.exists() && tekken_path.is_file() {
            return Self::from_tekken(dir, &tekken_path);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(text) => serde_json::from_str(&text).map_err(tok_err)?,
                Err(_) => serde_json::Value::Null,
            };
        let special = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(s)
        };
        let eos = special("eos_token").into_iter().collect();
        Ok(Self {
            bos: special("bos_token"),
            eos,
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_templates: dir_templates(dir, &cfg)?,
            byte_chars: Default::default(),
            inner,
        })
    }

    /// A folder's `tekken.json`: `<s>` starts every prompt and `</s>` ends
    /// a turn, as Mistral's library encodes; the chat template is the
    /// folder's own, else Mistral's for tekken models.
    fn from_tekken(dir: &Path, path: &Path) -> Result<Self> {
        let (inner, specials, template) = tekken(path)?;
        let cfg: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(text) => serde_json::from_str(&text).map_err(tok_err)?,
                Err(_) => serde_json::Value::Null,
            };
        let id = |s: &str| specials.iter().position(|t| t == s).map(|i| i as u32);
        let mut chat_templates = dir_templates(dir, &cfg)?;
        if chat_templates.is_empty() {
            chat_templates.push((crate::chat::DEFAULT_TEMPLATE.into(), template.to_string()));
        }
        Ok(Self {
            bos: id("<s>"),
            eos: id("</s>").into_iter().collect(),
            add_bos: false,
            chat_templates,
            byte_chars: Default::default(),
            inner,
        })
    }

    /// Ids for `text`; special-token text (e.g. `<|im_start|>`) maps to its id,
    /// as llama.cpp does when tokenizing a rendered chat prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Ids for text that continues earlier text: never a BOS.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text for `ids`; special tokens are left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Text for `ids`, special tokens included.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Each token's bytes, for `vocab` ids (the model's logit width):
    /// byte-level vocabularies map their characters back to bytes,
    /// SentencePiece ones turn `▁` into a space and `<0xNN>` into its byte,
    /// and special tokens are their text after a 0xFF marker (as
    /// llguidance's token trie expects). Ids with no token, and tokens over
    /// [`MAX_TOKEN_BYTES`], are empty (never allowed by a grammar).
    pub fn token_bytes(&self, vocab: usize) -> Vec<Vec<u8>> {
        let chars = self.byte_chars().clone();
        let mut out = vec![Vec::new(); vocab];
        for (text, id) in self.inner.get_vocab(false) {
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = piece_bytes(&text, chars.as_ref()).unwrap_or_default();
            }
        }
        for (id, t) in self.inner.get_added_tokens_decoder() {
            if let Some(slot) = out.get_mut(id as usize) {
                let mut b = Vec::with_capacity(t.content.len() + 1);
                if t.special {
                    b.push(0xff);
                }
                b.extend_from_slice(t.content.as_bytes());
                *slot = b;
            }
        }
        for b in &mut out {
            if b.len() > MAX_TOKEN_BYTES {
                b.clear();
            }
        }
        out
    }

    /// Whether `text` is one special token of this vocabulary (a grammar
    /// then names it as a token, not as the bytes of its text).
    pub fn is_special(&self, text: &str) -> bool {
        self.special_id(text).is_some()
    }

    /// The id of `text` when it is one special token of this vocabulary.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        if !self.inner.get_added_vocabulary().is_special_token(text) {
            return None;
        }
        self.inner.token_to_id(text)
    }

    /// One token's bytes (a special token's text, no marker); empty for an
    /// unknown id.
    pub fn id_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(t) = self.inner.get_added_vocabulary().simple_id_to_token(id) {
            return t.into_bytes();
        }
        self.inner
            .id_to_token(id)
            .and_then(|text| piece_bytes(&text, self.byte_chars().as_ref()))
            .unwrap_or_default()
    }

    /// The byte-level alphabet (character to byte) when the vocabulary is
    /// byte-level; worked out once.
    fn byte_chars(&self) -> &Option<std::collections::HashMap<char, u8>> {
        self.byte_chars.get_or_init(|| {
            let decoder = serde_json::to_string(&self.inner.get_decoder()).unwrap_or_default();
            decoder
                .contains("\"ByteLevel\"")
                .then(|| byte_chars().into_iter().map(|(b, c)| (c, b)).collect())
        })
    }

    /// Tokens that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Beginning-of-sequence token, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The text of one token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's own (default) Jinja chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_templates.first().map(|(_, t)| t.as_str())
    }

    /// Every chat template the model ships, by name, the default first
    /// (e.g. `default` and `tool_use`).
    pub fn chat_templates(&self) -> &[(String, String)] {
        &self.chat_templates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces `regexes` split `text` into (as byte-level BPE does,
    /// before bytes are mapped).
    fn pieces(regexes: &[&str], text: &str) -> Vec<String> {
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap_or_else(|e| panic!("{re}: {e}"));
            split.pre_tokenize(&mut s).unwrap_or_else(|e| panic!("{e}"));
        }
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn phi4_and_llama4_pre_tokenizers_split_as_their_tokenizers_do() {
        let gpt4o = pre_regexes("gpt-4o").unwrap_or_default();
        assert_eq!(pre_regexes("llama4"), Some(gpt4o));
        // Case-aware letter runs (Llama 3's split never breaks camelCase),
        // contractions kept on their word, numbers in threes.
        assert_eq!(
            pieces(gpt4o, "camelCaseWord HTMLParser abcDEF I'm 12345"),
            [
                "camel",
                "Case",
                "Word",
                " HTMLParser",
                " abc",
                "DEF",
                " I'm",
                " ",
                "123",
                "45"
            ]
        );
        assert_eq!(
            pieces(
                pre_regexes("llama-bpe").unwrap_or_default(),
                "camelCaseWord I'm 12345"
            ),
            ["camelCaseWord", " I", "'m", " ", "123", "45"]
        );
        // DBRX's tokenizer (Phi-4's) splits as Llama 3's.
        assert_eq!(pre_regexes("dbrx"), pre_regexes("llama-bpe"));
    }

    #[test]
    fn merges_rank_by_score_and_skip_pieces_longer_than_any_real_one() {
        let long = "x".repeat(MAX_MERGED_PIECE / 2 + 1);
        let tokens: Vec<String> = ["a", "b", "ab", "ba", "aba"]
            .into_iter()
            .map(String::from)
            .chain([long.clone(), long.repeat(2)])
            .collect();
        let scores = [0.0, 0.0, -1.0, -2.0, -3.0, 0.0, -4.0];
        let m = spm_merges(&tokens, &scores, &[1; 7]);
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        // "ab" (score -1) before "ba" (-2) before both splits of "aba" (-3);
        // the piece of twice the long half is never looked at.
        assert_eq!(
            m,
            [
                pair("a", "b"),
                pair("b", "a"),
                pair("a", "ba"),
                pair("ab", "a")
            ]
        );
        // A control or byte piece is never a merge's result or half.
        let m = spm_merges(&tokens[..3], &scores[..3], &[1, 3, 1]);
        assert!(m.is_empty(), "{m:?}");
    }
}
