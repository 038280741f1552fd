//! Single-node text generation over a full-model [`Stage`]: prefill, then
//! decode token by token with stop conditions and streamed text.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::chat::{CHATML, ChatInputs, ChatTemplate, DEFAULT_TEMPLATE, Message};
use crate::error::{ModelError, Result};
use crate::grammar::Grammars;
use crate::sampling::{Sampler, SamplingParams};
use crate::stage::{Logits, Precision, Stage, StageInput, StageSpec};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFile;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// A finished generation with its timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tok_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    /// Generated tokens per second after the first one.
    pub fn decode_tok_per_s(&self) -> f64 {
        rate(self.token_ids.len().saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// A model's text side: tokenizer and chat template (what a node that
/// takes requests needs, whether or not it holds any layers).
#[derive(Debug)]
pub struct ModelText {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    source: TemplateSource,
    context: usize,
    /// The logit width (the config's vocabulary).
    vocab: usize,
    /// Grammar compilation for this vocabulary, built when first needed.
    grammars: std::sync::OnceLock<std::result::Result<Grammars, String>>,
}

/// Where a model's chat template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model's own (GGUF metadata, `chat_template.jinja`,
    /// `tokenizer_config.json`).
    Model,
    /// Given in place of the model's (`--chat-template FILE`).
    Given,
    /// The model ships none: ChatML.
    ChatmlFallback,
}

impl ModelText {
    /// Reads the tokenizer and template of an opened weight file.
    pub fn load(weights: &WeightFile) -> Result<Self> {
        Self::load_with(weights, None)
    }

    /// [`Self::load`], with `template` (Jinja source, e.g. from
    /// `--chat-template FILE`) in place of the model's own templates. A
    /// model that ships none gets ChatML, with a warning that says so.
    pub fn load_with(weights: &WeightFile, template: Option<&str>) -> Result<Self> {
        let tokenizer = match weights.gguf_metadata() {
            Some(m) => Tokenizer::from_gguf(m)?,
            None => Tokenizer::from_dir(weights.path())?,
        };
        let tok_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = tok_text(tokenizer.bos_id());
        let eos = tok_text(tokenizer.eos_ids().first().copied());
        let (templates, source) = match template {
            Some(t) => (
                vec![(DEFAULT_TEMPLATE.to_string(), t.to_string())],
                TemplateSource::Given,
            ),
            None if tokenizer.chat_templates().is_empty() => {
                tracing::warn!(
                    model = %weights.path().display(),
                    "the model ships no chat template; chats are rendered as ChatML (give one with --chat-template FILE)"
                );
                (
                    vec![(DEFAULT_TEMPLATE.to_string(), CHATML.to_string())],
                    TemplateSource::ChatmlFallback,
                )
            }
            None => (tokenizer.chat_templates().to_vec(), TemplateSource::Model),
        };
        let template = ChatTemplate::named(&templates, &bos, &eos)?;
        Ok(Self {
            tokenizer,
            template,
            source,
            context: weights.config().max_position_embeddings,
            vocab: weights.config().vocab_size,
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// How this model writes tool calls (from its chat template).
    pub fn tool_format(&self) -> crate::tools::ToolFormat {
        crate::tools::ToolFormat::detect(&self.template.tool_source())
    }

    /// The chat template's source (the one used with tools).
    pub fn template_source_text(&self) -> String {
        self.template.tool_source()
    }

    /// Whether the chat template shows the model its tools (reads `tools`).
    pub fn renders_tools(&self) -> bool {
        self.template.tool_source().contains("tools")
    }

    /// The logit width.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Compiles output constraints for this model's vocabulary (built on
    /// first use: the vocabulary's token trie).
    pub fn grammars(&self) -> Result<&Grammars> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer, self.vocab).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ModelError::Grammar(e.clone()))
    }

    /// Where the chat template came from.
    pub fn template_source(&self) -> TemplateSource {
        self.source
    }

    /// Renders `inputs` (tools, documents, keyword arguments) through the
    /// chat template.
    pub fn render_inputs(&self, inputs: &ChatInputs) -> Result<String> {
        self.template.render_inputs(inputs)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Longest sequence (prompt + output) the model accepts.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Renders messages through the model's chat template.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// Renders messages, with or without the assistant's opening.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }

    /// Tokenizes a prompt, checking it is non-empty and fits the context.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let ids = self.tokenizer.encode(text)?;
        if ids.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if ids.len() >= self.context {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                context: self.context,
            });
        }
        Ok(ids)
    }
}

/// A model held whole on this node: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct LocalModel {
    pub name: String,
    stage: Stage,
    text: ModelText,
}

/// Decodes generated ids to text incrementally, holding back text that may
/// still become a stop string or is an incomplete UTF-8 sequence.
#[derive(Debug)]
pub struct TextStream {
    stop: Vec<String>,
    emitted: usize,
    text: String,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            emitted: 0,
            text: String::new(),
        }
    }

    /// Updates with the full decoded text so far; returns the newly safe text
    /// and whether a stop string was hit (the text is then cut before it).
    pub fn update(&mut self, full: String) -> (String, bool) {
        self.text = full;
        if let Some(cut) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            return (self.flush(), true);
        }
        let hold = self
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut safe = self.text.len().saturating_sub(hold);
        if self.text.ends_with('\u{FFFD}') {
            safe = safe.min(self.text.len() - '\u{FFFD}'.len_utf8());
        }
        while safe > self.emitted && !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.emitted {
            return (String::new(), false);
        }
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Everything not yet emitted.
    pub fn flush(&mut self) -> String {
        let out = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        out
    }

    /// The text so far (cut at a stop string if one was hit).
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl LocalModel {
    /// Loads a `.gguf` file or a safetensors directory as one full stage.
    pub fn load(path: &Path, precision: Precision) -> Result<Self> {
        Self::load_with(path, precision, None)
    }

    /// [`Self::load`] with a chat template in place of the model's own.
    pub fn load_with(path: &Path, precision: Precision, template: Option<&str>) -> Result<Self> {
        let weights = WeightFile::open(path)?;
        let text = ModelText::load_with(&weights, template)?;
        let spec = StageSpec::full(weights.config().num_hidden_layers);
        let stage = Stage::load(&weights, spec, precision)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self { name, stage, text })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.text.tokenizer()
    }

    /// The tokenizer and chat template.
    pub fn text(&self) -> &ModelText {
        &self.text
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Longest sequence (prompt + output) the model accepts.
    pub fn context_length(&self) -> usize {
        self.stage.config().max_position_embeddings
    }

    /// Renders messages through the model's chat template.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.text.render_chat(messages)
    }

    /// Tokenizes a prompt, checking it is non-empty and fits the context.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.text.encode_prompt(text)
    }

    /// Logits of the last prompt position, for checks against a reference.
    pub fn prompt_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.stage.new_cache();
        let logits = self.stage.forward(
            StageInput::Tokens(ids.to_vec()),
            &[ids.len()],
            &mut [&mut cache],
            Logits::Last,
        )?;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }

    /// Generates, calling `on_text` with each piece of text as it becomes final.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if req.prompt_ids.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let ctx = self.context_length();
        if req.prompt_ids.len() >= ctx {
            return Err(ModelError::PromptTooLong {
                tokens: req.prompt_ids.len(),
                context: ctx,
            });
        }
        let mut sampler = Sampler::new(req.sampling)?;
        let max_new = req.max_tokens.min(ctx - req.prompt_ids.len());
        let mut cache = self.stage.new_cache();
        let mut stream = TextStream::new(req.stop.clone());
        let mut out: Vec<u32> = Vec::new();
        let t0 = Instant::now();
        let mut logits = self.stage.forward(
            StageInput::Tokens(req.prompt_ids.clone()),
            &[req.prompt_ids.len()],
            &mut [&mut cache],
            Logits::Last,
        )?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut finish = FinishReason::Length;
        while out.len() < max_new {
            let row = logits_row(&logits)?;
            let next = sampler.sample(&row);
            if self.text.tokenizer.eos_ids().contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            out.push(next);
            let (piece, stopped) = stream.update(self.text.tokenizer.decode(&out)?);
            if !piece.is_empty() {
                on_text(&piece);
            }
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            if out.len() >= max_new {
                break;
            }
            logits = self.stage.forward(
                StageInput::Tokens(vec![next]),
                &[1],
                &mut [&mut cache],
                Logits::Last,
            )?;
        }
        let rest = stream.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(Generation {
            text: stream.text().to_string(),
            token_ids: out,
            finish_reason: finish,
            prompt_tokens: req.prompt_ids.len(),
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}

fn logits_row(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_holds_back_possible_stop_strings() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.update("Hello".into()), ("Hel".into(), false));
        assert_eq!(s.update("Hello E".into()), ("lo".into(), false));
        assert_eq!(s.update("Hello EN".into()), (" ".into(), false));
        assert_eq!(s.update("Hello ENDx".into()), ("".into(), true));
        assert_eq!(s.text(), "Hello ");
    }

    #[test]
    fn text_stream_waits_for_complete_utf8() {
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.update("a\u{FFFD}".into()), ("a".into(), false));
        assert_eq!(s.update("a\u{e9}".into()), ("\u{e9}".into(), false));
    }
}
