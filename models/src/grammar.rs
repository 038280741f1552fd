//! Constrained decoding: an output constraint (a JSON schema, a Lark
//! grammar or a regex, in llguidance's grammar format) compiled against the
//! model's vocabulary by llguidance, whose token mask the sampler applies.
//!
//! A grammar travels as llguidance's `TopLevelGrammar` JSON, so it can be
//! built where a request arrives and compiled again on the node that
//! samples. Compiling and masking run under llguidance's limits (lexer fuel,
//! grammar size, items per step), so a hostile grammar costs bounded work.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::sampling::{Allowed, Constraint};
use crate::tokenizer::Tokenizer;

/// Largest vocabulary a grammar is compiled for (llguidance's trie holds
/// about two million tokens).
pub const MAX_GRAMMAR_VOCAB: usize = 1 << 20;

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Grammar(e.to_string())
}

/// The model's vocabulary as llguidance sees it.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.tokenizer
            .encode_continuation(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// Compiles grammars for one model's vocabulary; built once per model.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// For `tokenizer` over `vocab` logits. The first end token is the one
    /// a finished grammar asks for; the sampler allows every end token then.
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Self> {
        if vocab == 0 || vocab > MAX_GRAMMAR_VOCAB {
            return Err(err(format!(
                "a vocabulary of {vocab} tokens (at most {MAX_GRAMMAR_VOCAB})"
            )));
        }
        let eos = tokenizer
            .eos_ids()
            .first()
            .copied()
            .filter(|&e| (e as usize) < vocab)
            .ok_or_else(|| err("the model has no end token in its vocabulary"))?;
        let words = tokenizer.token_bytes(vocab);
        let info = TokRxInfo::new(vocab as u32, eos);
        // The trie checks its own invariants with assertions; the words
        // above keep to them (lengths, count), and a panic is caught so a
        // strange vocabulary costs constraints, not the process.
        let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words))
            .map_err(|_| err("the vocabulary cannot be indexed for grammars"))?;
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Compiles a grammar (llguidance's `TopLevelGrammar` JSON) into a
    /// constraint for one sequence.
    pub fn compile(&self, grammar: &str) -> Result<GrammarConstraint> {
        let g: TopLevelGrammar = serde_json::from_str(grammar).map_err(err)?;
        let parser = self.factory.create_parser(g).map_err(err)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(err(e));
        }
        Ok(GrammarConstraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct GrammarConstraint {
    matcher: Matcher,
}

impl std::fmt::Debug for GrammarConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarConstraint").finish_non_exhaustive()
    }
}

impl GrammarConstraint {
    /// Whether the text so far is a complete match.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

impl Constraint for GrammarConstraint {
    fn allowed(&mut self) -> std::result::Result<Allowed, String> {
        if self.matcher.is_stopped() {
            if let Some(e) = self.matcher.get_error() {
                return Err(e);
            }
            return Ok(Allowed {
                words: Vec::new(),
                end: true,
            });
        }
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let end = self.matcher.is_accepting().map_err(|e| e.to_string())?;
        Ok(Allowed {
            words: mask.as_slice().to_vec(),
            end,
        })
    }

    fn accept(&mut self, token: u32) -> std::result::Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

/// A grammar for any JSON object (OpenAI's `json_object` response format).
pub fn json_object() -> String {
    json_schema(&json!({"type": "object"}))
}

/// An object schema that says nothing of other properties allows none, as
/// llama.cpp's and vLLM's grammar engines read it (and as Pydantic's
/// schemas mean it): otherwise a model may add keys without end.
fn close_objects(v: &mut Value, depth: usize) {
    if depth > 128 {
        return;
    }
    match v {
        Value::Object(o) => {
            if o.contains_key("properties")
                && !o.contains_key("additionalProperties")
                && !o.contains_key("patternProperties")
                && !o.contains_key("unevaluatedProperties")
            {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, x) in o.iter_mut() {
                close_objects(x, depth + 1);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| close_objects(x, depth + 1)),
        _ => {}
    }
}

/// `schema` as the JSON grammars here write it: objects closed unless the
/// schema says otherwise, one line, `, ` and `: ` between items.
fn prepared(schema: &Value) -> Value {
    let mut schema = schema.clone();
    close_objects(&mut schema, 0);
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A Lark expression (`%json {…}`) for JSON matching `schema`, written as
/// [`json_schema`] writes it, to use inside a larger Lark grammar.
pub fn lark_json(schema: &Value) -> String {
    format!("%json {}", prepared(schema))
}

/// A Lark string literal of `text`.
pub fn lark_literal(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// A grammar for JSON matching `schema`, written in one line with `, ` and
/// `: ` between items (no free whitespace: a model cannot pad forever);
/// objects whose schema says nothing of other properties get none. A
/// schema's own `x-guidance` options win.
pub fn json_schema(schema: &Value) -> String {
    serde_json::to_string(&TopLevelGrammar::from_json_schema(prepared(schema))).unwrap_or_default()
}

/// A grammar from Lark source (llguidance's dialect).
pub fn lark(source: &str) -> String {
    serde_json::to_string(&TopLevelGrammar::from_lark(source.to_string())).unwrap_or_default()
}

/// A grammar for text matching a regular expression.
pub fn regex(rx: &str) -> String {
    serde_json::to_string(&TopLevelGrammar::from_regex(rx)).unwrap_or_default()
}
