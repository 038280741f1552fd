//! Training data: JSONL of `{"messages": [...]}` (rendered through the
//! model's chat template; loss on the assistant's tokens only) or
//! `{"text": "..."}` (loss on every token), tokenized once, shuffled per
//! epoch by seed, and cut into each step's micro-batches (padded, or packed
//! several documents to a row).
//!
//! Which examples a step sees is a pure function of (seed, step), so the
//! data cursor of a checkpoint is just its step.

use serde::Deserialize;

use super::batch::{BatchLayout, IGNORE, MicroBatch};
use super::rng::{Stream, key};
use crate::chat::Message;
use crate::error::{ModelError, Result};
use crate::generate::ModelText;

/// Most examples one file may hold.
pub const MAX_EXAMPLES: usize = 1_000_000;

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Chat(Vec<Message>),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    messages: Option<Vec<LineMessage>>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct LineMessage {
    role: String,
    content: String,
}

fn bad(line: usize, reason: impl Into<String>) -> ModelError {
    ModelError::BadData {
        line,
        reason: reason.into(),
    }
}

/// Parses a JSONL file (blank lines are skipped; line numbers from 1).
pub fn parse_jsonl(text: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if out.len() >= MAX_EXAMPLES {
            return Err(bad(line, format!("more than {MAX_EXAMPLES} examples")));
        }
        let l: Line = serde_json::from_str(raw).map_err(|e| bad(line, e.to_string()))?;
        out.push(match (l.messages, l.text) {
            (Some(m), None) => {
                if m.is_empty() {
                    return Err(bad(line, "\"messages\" is empty"));
                }
                for msg in &m {
                    if !matches!(msg.role.as_str(), "system" | "user" | "assistant") {
                        return Err(bad(line, format!("unknown role {:?}", msg.role)));
                    }
                }
                if !m.iter().any(|x| x.role == "assistant") {
                    return Err(bad(line, "no assistant message to learn from"));
                }
                Example::Chat(
                    m.into_iter()
                        .map(|x| Message::new(x.role, x.content))
                        .collect(),
                )
            }
            (None, Some(t)) => {
                if t.trim().is_empty() {
                    return Err(bad(line, "\"text\" is empty"));
                }
                Example::Text(t)
            }
            (Some(_), Some(_)) => return Err(bad(line, "both \"messages\" and \"text\"")),
            (None, None) => return Err(bad(line, "neither \"messages\" nor \"text\"")),
        });
    }
    if out.is_empty() {
        return Err(bad(0, "the file holds no examples"));
    }
    Ok(out)
}

/// An example as tokens, with which of them carry loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub tokens: Vec<u32>,
    /// `trained[t]`: token `t` is a target (predicted from tokens `..t`).
    pub trained: Vec<bool>,
}

impl Tokenized {
    /// Tokens that carry loss.
    pub fn targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Tokenizes `ex` as inference would see it, cut to `max_len` tokens.
///
/// A chat is built turn by turn: the prompt up to each assistant turn is
/// rendered with the generation prompt (exactly what a request sends), and
/// the assistant's text is what the next rendering adds; only those tokens
/// carry loss. Text gets the end-of-sequence token appended.
pub fn tokenize(text: &ModelText, ex: &Example, max_len: usize, line: usize) -> Result<Tokenized> {
    let tok = text.tokenizer();
    let (mut tokens, mut trained) = (Vec::new(), Vec::new());
    match ex {
        Example::Text(t) => {
            tokens = tok.encode(t)?;
            if let Some(&eos) = tok.eos_ids().first() {
                tokens.push(eos);
            }
            trained = vec![true; tokens.len()];
        }
        Example::Chat(msgs) => {
            let mut rendered = String::new();
            for (i, m) in msgs.iter().enumerate() {
                let (piece_end, learn) = if m.role == "assistant" {
                    let prompt = text.render(&msgs[..i], true)?;
                    push_piece(
                        text,
                        &mut rendered,
                        &prompt,
                        false,
                        &mut tokens,
                        &mut trained,
                        line,
                    )?;
                    (text.render(&msgs[..=i], false)?, true)
                } else {
                    (text.render(&msgs[..=i], false)?, false)
                };
                push_piece(
                    text,
                    &mut rendered,
                    &piece_end,
                    learn,
                    &mut tokens,
                    &mut trained,
                    line,
                )?;
            }
        }
    }
    tokens.truncate(max_len);
    trained.truncate(max_len);
    if tokens.len() < 2 || !trained.iter().skip(1).any(|&t| t) {
        return Err(bad(
            line,
            format!("nothing to learn within {max_len} tokens (raise seq_len or shorten it)"),
        ));
    }
    Ok(Tokenized { tokens, trained })
}

/// Appends what `full` adds to `rendered` (it must extend it).
fn push_piece(
    text: &ModelText,
    rendered: &mut String,
    full: &str,
    learn: bool,
    tokens: &mut Vec<u32>,
    trained: &mut Vec<bool>,
    line: usize,
) -> Result<()> {
    let Some(added) = full.strip_prefix(rendered.as_str()) else {
        return Err(bad(
            line,
            "the chat template renders a turn differently once later turns follow",
        ));
    };
    if added.is_empty() {
        return Ok(());
    }
    let ids = if rendered.is_empty() {
        text.tokenizer().encode(added)?
    } else {
        text.tokenizer().encode_continuation(added)?
    };
    trained.extend(std::iter::repeat_n(learn, ids.len()));
    tokens.extend(ids);
    *rendered = full.to_string();
    Ok(())
}

/// Parses and tokenizes a whole file.
pub fn load_jsonl(text: &ModelText, data: &str, max_len: usize) -> Result<Vec<Tokenized>> {
    let mut out = Vec::new();
    let mut line = 0;
    for (i, raw) in data.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        line = i + 1;
        let ex = parse_jsonl(raw).map_err(|e| match e {
            ModelError::BadData { reason, .. } => bad(i + 1, reason),
            other => other,
        })?;
        for ex in &ex {
            out.push(tokenize(text, ex, max_len, i + 1)?);
        }
        if out.len() > MAX_EXAMPLES {
            return Err(bad(line, format!("more than {MAX_EXAMPLES} examples")));
        }
    }
    if out.is_empty() {
        return Err(bad(line, "the file holds no examples"));
    }
    Ok(out)
}

/// How a job cuts its data into steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Micro-batches per step (`m`).
    pub micro_batches: usize,
    /// Pack several examples into rows of `seq_len` tokens.
    pub pack: bool,
    /// Longest row.
    pub seq_len: usize,
    pub seed: u64,
}

impl Batching {
    /// Steps in `epochs` passes over `n` examples (the last may be short).
    pub fn steps(&self, n: usize, epochs: u64) -> u64 {
        let total = n as u64 * epochs;
        total.div_ceil(self.batch_size.max(1) as u64)
    }

    /// The example indices of step `step` (0-based) over `n` examples and
    /// `epochs` passes: each epoch is its own seeded permutation.
    pub fn step_examples(&self, n: usize, epochs: u64, step: u64) -> Vec<usize> {
        let b = self.batch_size.max(1) as u64;
        let end = (n as u64 * epochs).min((step + 1) * b);
        let mut out = Vec::new();
        let mut perm: Option<(u64, Vec<usize>)> = None;
        for q in step * b..end {
            let epoch = q / n as u64;
            if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                perm = Some((epoch, permutation(n, self.seed, epoch)));
            }
            if let Some((_, p)) = &perm {
                out.push(p[(q % n as u64) as usize]);
            }
        }
        out
    }

    /// Exactly `micro_batches` micro-batches for the examples `idx` of
    /// `data` (contiguous, even shares; a share with no example becomes one
    /// padding token that carries no loss).
    pub fn micro_batches(&self, data: &[Tokenized], idx: &[usize]) -> Result<Vec<MicroBatch>> {
        let m = self.micro_batches.max(1);
        let mut out = Vec::with_capacity(m);
        for i in 0..m {
            let (a, b) = (idx.len() * i / m, idx.len() * (i + 1) / m);
            let docs: Vec<&Tokenized> = idx[a..b].iter().filter_map(|&j| data.get(j)).collect();
            out.push(if self.pack {
                pack(&docs, self.seq_len)?
            } else {
                pad(&docs)?
            });
        }
        Ok(out)
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates).
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s = Stream::new(key(seed ^ epoch.wrapping_mul(0x9E37_79B9), "data.shuffle"));
    for i in (1..n).rev() {
        let j = (s.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// Rows of documents (each a list of docs) as one micro-batch.
fn assemble(rows: &[Vec<&Tokenized>]) -> Result<MicroBatch> {
    let len = rows
        .iter()
        .map(|r| r.iter().map(|d| d.tokens.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let n = rows.len().max(1);
    let (mut tokens, mut labels, mut segments) = (
        vec![0u32; n * len],
        vec![IGNORE; n * len],
        vec![0u32; n * len],
    );
    for (r, docs) in rows.iter().enumerate() {
        let mut at = r * len;
        for (s, d) in docs.iter().enumerate() {
            for t in 0..d.tokens.len() {
                tokens[at + t] = d.tokens[t];
                segments[at + t] = s as u32 + 1;
                if t + 1 < d.tokens.len() && d.trained[t + 1] {
                    labels[at + t] = d.tokens[t + 1];
                }
            }
            at += d.tokens.len();
        }
    }
    Ok(MicroBatch {
        layout: BatchLayout::new(n, len, segments)?,
        tokens,
        labels,
    })
}

/// One document per row, padded to the longest.
fn pad(docs: &[&Tokenized]) -> Result<MicroBatch> {
    let rows: Vec<Vec<&Tokenized>> = docs.iter().map(|d| vec![*d]).collect();
    assemble(&rows)
}

/// Documents packed first-fit into rows of at most `seq_len` tokens.
fn pack<'a>(docs: &[&'a Tokenized], seq_len: usize) -> Result<MicroBatch> {
    let mut rows: Vec<(usize, Vec<&'a Tokenized>)> = Vec::new();
    for d in docs {
        let n = d.tokens.len();
        match rows.iter_mut().find(|(used, _)| used + n <= seq_len) {
            Some((used, r)) => {
                *used += n;
                r.push(d);
            }
            None => rows.push((n, vec![d])),
        }
    }
    let rows: Vec<Vec<&Tokenized>> = rows.into_iter().map(|(_, r)| r).collect();
    assemble(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(tokens: &[u32], trained: &[bool]) -> Tokenized {
        Tokenized {
            tokens: tokens.to_vec(),
            trained: trained.to_vec(),
        }
    }

    #[test]
    fn lines_are_checked_with_their_numbers() {
        let ok = "{\"text\":\"hi\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n";
        assert_eq!(parse_jsonl(ok).map(|v| v.len()).ok(), Some(2));
        for (bad_doc, line, what) in [
            ("{\"text\":\"a\"}\nnot json", 2, "expected"),
            ("{\"messages\":[]}", 1, "empty"),
            (
                "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]}",
                1,
                "no assistant",
            ),
            (
                "{\"messages\":[{\"role\":\"robot\",\"content\":\"q\"}]}",
                1,
                "unknown role",
            ),
            ("{\"text\":\"a\",\"extra\":1}", 1, "unknown field"),
            ("{}", 1, "neither"),
            ("", 0, "no examples"),
        ] {
            match parse_jsonl(bad_doc) {
                Err(ModelError::BadData { line: l, reason }) => {
                    assert_eq!(l, line, "{bad_doc}: {reason}");
                    assert!(reason.contains(what), "{bad_doc}: {reason}");
                }
                other => panic!("{bad_doc}: {other:?}"),
            }
        }
    }

    #[test]
    fn labels_are_next_trained_tokens_and_documents_stay_apart() {
        let a = doc(&[1, 2, 3], &[false, false, true]);
        let b = doc(&[4, 5], &[true, true]);
        let padded = pad(&[&a, &b]).unwrap();
        assert_eq!(padded.layout.len, 3);
        assert_eq!(padded.tokens, vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(padded.labels, vec![IGNORE, 3, IGNORE, 5, IGNORE, IGNORE]);
        assert_eq!(padded.layout.segments, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(padded.targets(), a.targets() + b.targets());
        let packed = pack(&[&a, &b], 8).unwrap();
        assert_eq!(packed.layout.rows, 1);
        assert_eq!(packed.tokens, vec![1, 2, 3, 4, 5]);
        assert_eq!(packed.layout.segments, vec![1, 1, 1, 2, 2]);
        assert_eq!(packed.labels, vec![IGNORE, 3, IGNORE, 5, IGNORE]);
        assert_eq!(packed.layout.positions(), vec![0, 1, 2, 0, 1]);
        let split = pack(&[&a, &b], 4).unwrap();
        assert_eq!(split.layout.rows, 2);
    }

    #[test]
    fn steps_cover_every_epoch_once_in_a_seeded_order() {
        let b = Batching {
            batch_size: 3,
            micro_batches: 2,
            pack: false,
            seq_len: 16,
            seed: 7,
        };
        let (n, epochs) = (5, 2);
        assert_eq!(b.steps(n, epochs), 4);
        let all: Vec<usize> = (0..4).flat_map(|s| b.step_examples(n, epochs, s)).collect();
        assert_eq!(all.len(), 10);
        for e in 0..2 {
            let mut ep = all[e * 5..e * 5 + 5].to_vec();
            ep.sort_unstable();
            assert_eq!(ep, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(all[..5], all[5..], "each epoch has its own order");
        assert_eq!(b.step_examples(n, epochs, 1), b.step_examples(n, epochs, 1));
        let other = Batching { seed: 8, ..b };
        assert_ne!(
            (0..2)
                .flat_map(|s| other.step_examples(n, epochs, s))
                .collect::<Vec<_>>(),
            all[..6].to_vec()
        );
        let data: Vec<Tokenized> = (0..5).map(|i| doc(&[i, i + 1], &[true, true])).collect();
        // The last step holds one example: its second micro-batch is padding.
        let last = b
            .micro_batches(&data, &b.step_examples(n, epochs, 3))
            .unwrap();
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].targets(), 0);
        assert_eq!(last[0].tokens.len(), 1);
        assert_eq!(last[1].targets(), 1);
    }
}
