//! A trainable pipeline stage: the same decoder as inference, rebuilt from
//! dense weights (f32, or f64 for gradient checks) with differentiable ops
//! only, LoRA adapters or fully trainable weights, and a backward pass that
//! recomputes the stage from its stashed input.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::batch::{BatchLayout, IGNORE};
use super::fused;
use super::rng;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layers::{RmsNorm, Rope, softcap};
use crate::stage::{StageSpec, check_shape};
use crate::weights::{LayerTensor as L, TensorId, WeightFile};

/// A projection LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[serde(alias = "q_proj")]
    Q,
    #[serde(alias = "k_proj")]
    K,
    #[serde(alias = "v_proj")]
    V,
    #[serde(alias = "o_proj")]
    O,
    #[serde(alias = "gate_proj")]
    Gate,
    #[serde(alias = "up_proj")]
    Up,
    #[serde(alias = "down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];
    pub fn tensor(self) -> L {
        match self {
            Self::Q => L::Q,
            Self::K => L::K,
            Self::V => L::V,
            Self::O => L::O,
            Self::Gate => L::Gate,
            Self::Up => L::Up,
            Self::Down => L::Down,
        }
    }
    /// The module name PEFT uses in `target_modules`.
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Standard deviation of B's initial values. PEFT starts B at zero (so
    /// the adapter starts as the identity); tests use a non-zero start so
    /// every adapter matrix gets a gradient in the first step.
    #[serde(default)]
    pub init_b_std: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V],
            init_b_std: 0.0,
        }
    }
}

/// What a job trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// Low-rank adapters on a frozen base.
    Lora(LoraConfig),
    /// Every weight of the model.
    Full,
}

/// How to build a trainable stage.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub method: Method,
    /// F32 for training, F64 for gradient checks.
    pub dtype: DType,
    /// Seeds adapter initialisation and dropout.
    pub seed: u64,
}

/// Which draws dropout makes: one micro-batch of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct DropCtx {
    pub seed: u64,
    pub step: u64,
    pub micro: u32,
    /// Dropout is off when false (evaluation).
    pub train: bool,
}

impl DropCtx {
    /// No dropout.
    pub fn eval() -> Self {
        Self {
            seed: 0,
            step: 0,
            micro: 0,
            train: false,
        }
    }
}

/// What a stage consumes in training.
#[derive(Debug, Clone)]
pub enum TrainInput {
    /// `rows * len` token ids (first stage).
    Tokens(Vec<u32>),
    /// Hidden states `[rows * len, hidden]` from the previous stage.
    Hidden(Tensor),
}

/// Where the gradient of a stage's output comes from in backward.
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'a> {
    /// The next stage's gradient with respect to this stage's output.
    Grad(&'a Tensor),
    /// The loss, on the last stage: the summed cross-entropy of the target
    /// tokens times `scale` (one over the step's target tokens).
    Loss { labels: &'a [u32], scale: f64 },
}

/// What one backward pass yields.
#[derive(Debug)]
pub struct Backward {
    /// Gradient with respect to the stage input (absent on the first stage).
    pub input_grad: Option<Tensor>,
    /// One entry per [`TrainStage::trainables`], in order.
    pub grads: Vec<Option<Tensor>>,
    /// Summed cross-entropy of this micro-batch (last stage).
    pub loss_sum: Option<f64>,
    /// Target tokens in this micro-batch (last stage).
    pub targets: usize,
}

#[derive(Debug, Clone)]
struct Lora {
    name: String,
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

#[derive(Debug, Clone)]
struct TLinear {
    w: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl TLinear {
    fn forward(&self, x: &Tensor, ctx: &DropCtx) -> Result<Tensor> {
        let mut y = match &self.lora {
            // Dropout gives the adapter's path its own input.
            Some(l) if !(ctx.train && l.dropout > 0.0) => {
                lora_product(x, &self.w, &l.a, &l.b, l.scale)?
            }
            Some(l) => {
                let xd = dropout(x, l.dropout, ctx, &l.name)?;
                composed_lora(x, &xd, &self.w, &l.a, &l.b, l.scale)?
            }
            None => matmul_t(x, &self.w)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// `W + scale · B A` (the adapter folded in).
    fn merged(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.w.detach()),
            Some(l) => Ok((self.w.detach() + (l.b.matmul(&l.a)? * l.scale)?)?),
        }
    }
}

/// The thread pool training passes run on, as many threads as rayon's
/// global pool, which inference passes use. Apart, a worker that waits
/// inside a decode pass never picks up a whole training micro-batch (rayon
/// lets a waiting worker run any queued job), so serving while a job
/// trains keeps its latency. `None` if the threads cannot be started.
/// Runs `f` on the training pool (on the caller's thread if the pool
/// could not start): the optimizer's and gradient sums' parallel loops
/// stay off the pool inference uses, as the passes do.
pub(crate) fn in_train_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match train_pool() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

fn train_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("hearth-train-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// `x · wᵀ`, with the product computed outside the graph and attached to
/// `x` by [`KnownProduct`], whose backward yields `x`'s gradient `dy · w`
/// and, for a trained weight, hands `w`'s gradient straight to the
/// backward pass's sink. candle's matmul backward would compute `w`'s
/// gradient as the transpose of `xᵀ · dy` into a zero-filled buffer of
/// `w`'s size: thrown away for a frozen weight (LoRA's base, a frozen tied
/// head), summed a second time for a trained one. `x`'s gradient is the
/// same product either way.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let trained = if !w.track_op() {
        None
    } else if w.is_variable() && x.rank() == 2 && WEIGHT_GRADS.with(|g| !g.borrow().is_empty()) {
        // Inside a backward pass: the sink is keyed by the trained tensor's
        // id (`detach` gives a new one).
        Some(w.id())
    } else {
        return Ok(x.matmul(&w.t()?)?);
    };
    if !x.track_op() || !fused::products_fit(x, w) {
        return Ok(x.matmul(&w.t()?)?);
    }
    Ok(x.apply_op1(KnownProduct {
        w: w.detach(),
        trained,
    })?)
}

/// Rows `ids` of the embedding table `e` (ids checked by the caller).
/// A trained table inside a backward pass gets its gradient as those
/// rows added in place into the pass's sink entry for it (where a tied
/// head's `dyᵀ · x` already is, or a zeroed table): candle's backward would
/// build a zeroed table, a scattered copy, a zeroed sum and their sum, four
/// table-sized buffers per micro-batch.
fn embed_rows(e: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let in_pass = e.is_variable() && WEIGHT_GRADS.with(|g| !g.borrow().is_empty());
    if !in_pass || !fused::products_fit(e, e) {
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), e.device())?;
        return Ok(e.index_select(&ids, 0)?);
    }
    Ok(e.apply_op1(EmbedRows {
        ids: ids.to_vec(),
        id: e.id(),
    })?)
}

/// `x · wᵀ + scale · (x · aᵀ) · bᵀ`: a frozen weight with its LoRA
/// adapter (`a` `[r, in]`, `b` `[out, r]`), computed in one op whose
/// backward yields `x`'s, `a`'s and `b`'s gradients from three small
/// products and one large one (`dy · w`), without the adapter's
/// intermediate sums and scalings in the graph.
fn lora_product(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if w.track_op() || !fused::products_fit(x, w) || !fused::products_fit(x, a) || a.rank() != 2 {
        return composed_lora(x, x, w, a, b, scale);
    }
    Ok(x.apply_op3(
        a,
        b,
        LoraProduct {
            w: w.detach(),
            scale,
        },
    )?)
}

/// `x · wᵀ + scale · (xa · aᵀ) · bᵀ` from candle's ops (`xa`, the adapter's
/// input, is `x` or `x` with dropout).
fn composed_lora(
    x: &Tensor,
    xa: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let z = xa.matmul(&a.t()?)?.matmul(&b.t()?)?;
    Ok((matmul_t(x, w)? + (z * scale)?)?)
}

type WeightGrads = std::collections::HashMap<candle_core::TensorId, Tensor>;

thread_local! {
    /// The weight gradients of the backward passes running on this thread,
    /// innermost last, by the weight's tensor id. A stack: while a pass
    /// waits inside a parallel matmul, rayon may run another stage's whole
    /// pass on the same thread (stages of one process share the training
    /// pool), and that pass opens and closes its own sink on top.
    static WEIGHT_GRADS: std::cell::RefCell<Vec<WeightGrads>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Opens a weight-gradient sink on this thread for one backward pass;
/// taking it (or dropping the guard, on an error) closes it.
struct WeightGradSink {
    open: bool,
}

impl WeightGradSink {
    fn open() -> Self {
        WEIGHT_GRADS.with(|g| g.borrow_mut().push(WeightGrads::new()));
        Self { open: true }
    }

    fn take(mut self) -> WeightGrads {
        self.open = false;
        WEIGHT_GRADS
            .with(|g| g.borrow_mut().pop())
            .unwrap_or_default()
    }
}

/// Replaces the innermost open sink's entry for `id` by `f` of it (`None`
/// when the entry is new). The sink is borrowed only to move the tensor out
/// and back, never across `f`'s ops (which could run another pass on this
/// thread).
fn update_sink(
    id: candle_core::TensorId,
    what: &str,
    f: impl FnOnce(Option<Tensor>) -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    let outside =
        || candle_core::Error::Msg(format!("{what}'s gradient outside its backward pass"));
    let prev = WEIGHT_GRADS.with(|g| {
        g.borrow_mut()
            .last_mut()
            .map(|sink| sink.remove(&id))
            .ok_or_else(outside)
    })?;
    let next = f(prev)?;
    WEIGHT_GRADS.with(|g| {
        g.borrow_mut()
            .last_mut()
            .map(|sink| sink.insert(id, next))
            .ok_or_else(outside)
    })?;
    Ok(())
}

impl Drop for WeightGradSink {
    fn drop(&mut self) {
        if self.open {
            WEIGHT_GRADS.with(|g| g.borrow_mut().pop());
        }
    }
}

/// `x · wᵀ`, computed by the op itself (no copy of a product made
/// outside the graph); its backward yields `dy · w` for `x` and, for a
/// trained weight, hands `dyᵀ · x` to the pass's sink.
struct KnownProduct {
    /// The weight, detached (same storage).
    w: Tensor,
    /// The trained tensor's id (the sink's key), or none for a frozen one.
    trained: Option<candle_core::TensorId>,
}

impl candle_core::CustomOp1 for KnownProduct {
    fn name(&self) -> &'static str {
        "known-product-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        fused::x_wt(s, l, &self.w)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(id) = self.trained {
            let dw = grad.t()?.matmul(&x.detach())?;
            update_sink(id, "a trained weight", |prev| match prev {
                Some(prev) => prev + dw,
                None => Ok(dw),
            })?;
        }
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// [`embed_rows`]'s op on a trained table.
struct EmbedRows {
    ids: Vec<u32>,
    /// The trained table's id (the sink's key).
    id: candle_core::TensorId,
}

impl candle_core::CustomOp1 for EmbedRows {
    fn name(&self) -> &'static str {
        "embedding-rows"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        fused::gather_rows(s, l, &self.ids)
    }

    fn bwd(&self, e: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        update_sink(self.id, "a trained embedding", |prev| {
            let dense = match prev {
                Some(d) if d.shape() != e.shape() => {
                    return Err(candle_core::Error::Msg(format!(
                        "a {:?} gradient in the sink for a {:?} embedding",
                        d.dims(),
                        e.dims()
                    )));
                }
                Some(d) if d.is_contiguous() => d,
                Some(d) => d.contiguous()?,
                None => e.zeros_like()?.detach(),
            };
            dense.inplace_op2(
                &grad.detach().contiguous()?,
                &fused::AddRows {
                    ids: self.ids.clone(),
                },
            )?;
            Ok(dense)
        })?;
        Ok(None)
    }
}

/// [`lora_product`]'s op: arguments `x`, `a`, `b`; the frozen weight
/// and the adapter's scale held.
struct LoraProduct {
    w: Tensor,
    scale: f64,
}

impl candle_core::CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sa: &candle_core::CpuStorage,
        la: &candle_core::Layout,
        sb: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        fused::x_wt_plus_lora(sx, lx, &self.w, (sa, la), (sb, lb), self.scale)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_dx = x.track_op();
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), grad.detach());
        // t = s · dy · b  [n, r]
        let t = (dy.matmul(&b)? * self.scale)?;
        let dx = if want_dx {
            Some((dy.matmul(&self.w)? + t.matmul(&a)?)?)
        } else {
            None
        };
        let da = t.t()?.matmul(&x)?;
        let db = (dy.t()?.matmul(&x.matmul(&a.t()?)?)? * self.scale)?;
        Ok((dx, Some(da), Some(db)))
    }
}

fn dropout(x: &Tensor, p: f64, ctx: &DropCtx, name: &str) -> Result<Tensor> {
    if !ctx.train || p <= 0.0 {
        return Ok(x.clone());
    }
    let key = rng::key(
        ctx.seed ^ rng::mix(ctx.step) ^ rng::mix(rng::mix(u64::from(ctx.micro))),
        name,
    );
    let mut s = rng::Stream::new(key);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if s.uniform() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[derive(Debug, Clone)]
struct TBlock {
    attn_norm: RmsNorm,
    /// Per-head query and key norms (Qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// Whether its attention slides (`Config::window`): it then takes
    /// the batch's windowed mask.
    slides: bool,
    q: TLinear,
    k: TLinear,
    v: TLinear,
    o: TLinear,
    /// Gemma's norms of the attention and MLP outputs.
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: TLinear,
    up: TLinear,
    down: TLinear,
    post_ffn_norm: Option<RmsNorm>,
    /// Whether it takes the local RoPE (`Config::local_rope`).
    local_rope: bool,
}

/// Per-batch tensors every block needs.
struct Ctx<'a> {
    rows: usize,
    len: usize,
    mask: Tensor,
    /// The mask of sliding-window layers (when the stage has any).
    window_mask: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    /// The local RoPE's tables (Gemma 3's sliding layers).
    local: Option<(Tensor, Tensor)>,
    drop: &'a DropCtx,
}

impl TBlock {
    fn forward(&self, cfg: &Config, x: &Tensor, c: &Ctx<'_>) -> Result<Tensor> {
        let (rows, len, hd) = (c.rows, c.len, cfg.head_dim);
        let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let h = fused::rms_norm(&self.attn_norm, x)?;
        // [n, h*d] -> [rows, heads, len, d]
        let split = |t: Tensor, nh: usize| -> Result<Tensor> {
            Ok(t.reshape((rows, len, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(&h, c.drop)?, heads)?;
        let k = split(self.k.forward(&h, c.drop)?, kvh)?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (fused::rms_norm(qn, &q)?, fused::rms_norm(kn, &k)?),
            None => (q, k),
        };
        let (cos, sin) = match (&c.local, self.local_rope) {
            (Some((cos, sin)), true) => (cos, sin),
            _ => (&c.cos, &c.sin),
        };
        let q = fused::rope(&q, cos, sin)?;
        let k = fused::rope(&k, cos, sin)?;
        let v = split(self.v.forward(&h, c.drop)?, kvh)?;
        let groups = heads / kvh;
        let repeat = |t: Tensor| -> Result<Tensor> {
            if groups == 1 {
                return Ok(t);
            }
            Ok(t.unsqueeze(2)?
                .broadcast_as((rows, kvh, groups, len, hd))?
                .reshape((rows, heads, len, hd))?)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let mask = match (&c.window_mask, self.slides) {
            (Some(w), true) => w,
            _ => &c.mask,
        };
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let probs = match cfg.attn_logit_softcap {
            None => fused::masked_softmax(&scores, mask, cfg.attn_scale())?,
            cap => crate::layers::softmax(
                &softcap(&(scores * cfg.attn_scale())?, cap)?.broadcast_add(mask)?,
            )?,
        };
        let o = probs.matmul(&v)?; // [rows, heads, len, d]
        let o = o
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows * len, heads * hd))?;
        let post = |n: &Option<RmsNorm>, h: Tensor| match n {
            Some(n) => fused::rms_norm(n, &h),
            None => Ok(h),
        };
        let x = (x + post(&self.post_attn_norm, self.o.forward(&o, c.drop)?)?)?;
        let h = fused::rms_norm(&self.ffn_norm, &x)?;
        let g = self.gate.forward(&h, c.drop)?;
        let u = self.up.forward(&h, c.drop)?;
        let h = self
            .down
            .forward(&fused::gated(cfg.hidden_act, &g, &u)?, c.drop)?;
        Ok((&x + post(&self.post_ffn_norm, h)?)?)
    }

    fn linears(&self) -> [(L, &TLinear); 7] {
        [
            (L::Q, &self.q),
            (L::K, &self.k),
            (L::V, &self.v),
            (L::O, &self.o),
            (L::Gate, &self.gate),
            (L::Up, &self.up),
            (L::Down, &self.down),
        ]
    }
}

/// A stage that can be trained.
#[derive(Debug, Clone)]
pub struct TrainStage {
    cfg: Config,
    spec: StageSpec,
    dtype: DType,
    embed: Option<Tensor>,
    blocks: Vec<TBlock>,
    norm: Option<RmsNorm>,
    head: Option<Tensor>,
    rope: Rope,
    /// Gemma 3's RoPE of sliding layers.
    rope_local: Option<Rope>,
    trainables: Vec<(String, Var)>,
}

/// The PEFT name of a LoRA matrix of `id` (`which` is `A` or `B`).
pub fn lora_name(id: TensorId, which: char) -> String {
    let base = id.hf_name();
    let base = base.strip_suffix(".weight").unwrap_or(&base);
    format!("base_model.model.{base}.lora_{which}.weight")
}

impl TrainStage {
    /// Loads the tensors of `spec` as dense weights and attaches what `opts` trains.
    pub fn load(weights: &WeightFile, spec: StageSpec, opts: &TrainOptions) -> Result<Self> {
        let cfg = weights.config().clone();
        spec.check(cfg.num_hidden_layers)?;
        if !matches!(opts.dtype, DType::F32 | DType::F64) {
            return Err(ModelError::InvalidConfig(format!(
                "training runs in f32 or f64, not {:?}",
                opts.dtype
            )));
        }
        let dev = Device::Cpu;
        let full = matches!(opts.method, Method::Full);
        let mut trainables: Vec<(String, Var)> = Vec::new();
        let load = |id: TensorId, trainables: &mut Vec<(String, Var)>| -> Result<Tensor> {
            let t = weights.load_f32(id, &dev)?.to_dtype(opts.dtype)?;
            if full {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                trainables.push((id.hf_name(), v));
                Ok(t)
            } else {
                Ok(t)
            }
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let qdim = cfg.num_attention_heads * hd;
        let kvdim = cfg.num_key_value_heads * hd;
        let inter = cfg.intermediate_size;
        let embed = if spec.embed {
            let t = load(TensorId::Embed, &mut trainables)?;
            check_shape(TensorId::Embed, t.dims(), &[cfg.vocab_size, h])?;
            Some(t)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(spec.layers());
        for i in spec.start..spec.end {
            let id = |t| TensorId::Layer(i, t);
            let norm = |t: L, tr: &mut Vec<(String, Var)>| -> Result<RmsNorm> {
                let w = load(id(t), tr)?;
                check_shape(id(t), w.dims(), &[h])?;
                Ok(RmsNorm {
                    weight: w,
                    eps: cfg.rms_norm_eps,
                    fused: false,
                    shift: cfg.norm_shift(),
                })
            };
            let attn_norm = norm(L::AttnNorm, &mut trainables)?;
            let qk_norm = if cfg.qk_norm() {
                let mut head_norm = |t: L| -> Result<RmsNorm> {
                    let w = load(id(t), &mut trainables)?;
                    check_shape(id(t), w.dims(), &[hd])?;
                    Ok(RmsNorm {
                        weight: w,
                        eps: cfg.rms_norm_eps,
                        fused: false,
                        shift: cfg.norm_shift(),
                    })
                };
                Some((head_norm(L::QNorm)?, head_norm(L::KNorm)?))
            } else {
                None
            };
            let (post_attn_norm, post_ffn_norm) = if cfg.is_gemma() {
                (
                    Some(norm(L::PostAttnNorm, &mut trainables)?),
                    Some(norm(L::PostFfnNorm, &mut trainables)?),
                )
            } else {
                (None, None)
            };
            let ffn_norm = norm(L::ffn_norm(&cfg), &mut trainables)?;
            // Phi-3 stores q/k/v and gate/up stacked: one parameter each,
            // its row blocks the projections (LoRA adapts each block).
            let stacked = if cfg.fused_projections() {
                let qkv = load(id(L::Qkv), &mut trainables)?;
                check_shape(id(L::Qkv), qkv.dims(), &[qdim + 2 * kvdim, h])?;
                let gu = load(id(L::GateUp), &mut trainables)?;
                check_shape(id(L::GateUp), gu.dims(), &[2 * inter, h])?;
                Some((qkv, gu))
            } else {
                None
            };
            let lin = |t: L,
                       bias: Option<L>,
                       rows: usize,
                       cols: usize,
                       tr: &mut Vec<(String, Var)>|
             -> Result<TLinear> {
                let w = match (&stacked, t) {
                    (Some((qkv, _)), L::Q) => qkv.narrow(0, 0, qdim)?,
                    (Some((qkv, _)), L::K) => qkv.narrow(0, qdim, kvdim)?,
                    (Some((qkv, _)), L::V) => qkv.narrow(0, qdim + kvdim, kvdim)?,
                    (Some((_, gu)), L::Gate) => gu.narrow(0, 0, inter)?,
                    (Some((_, gu)), L::Up) => gu.narrow(0, inter, inter)?,
                    _ => load(id(t), tr)?,
                };
                check_shape(id(t), w.dims(), &[rows, cols])?;
                let bias = match bias {
                    Some(b) if cfg.attention_bias => Some(load(id(b), tr)?),
                    _ => None,
                };
                let lora = match &opts.method {
                    Method::Lora(c) if c.targets.iter().any(|x| x.tensor() == t) => {
                        Some(new_lora(id(t), c, rows, cols, opts, tr)?)
                    }
                    _ => None,
                };
                Ok(TLinear { w, bias, lora })
            };
            let q = lin(L::Q, Some(L::QBias), qdim, h, &mut trainables)?;
            let k = lin(L::K, Some(L::KBias), kvdim, h, &mut trainables)?;
            let v = lin(L::V, Some(L::VBias), kvdim, h, &mut trainables)?;
            let o = lin(L::O, None, h, qdim, &mut trainables)?;
            let gate = lin(L::Gate, None, inter, h, &mut trainables)?;
            let up = lin(L::Up, None, inter, h, &mut trainables)?;
            let down = lin(L::Down, None, h, inter, &mut trainables)?;
            blocks.push(TBlock {
                attn_norm,
                qk_norm,
                slides: cfg.window(i).is_some(),
                q,
                k,
                v,
                o,
                post_attn_norm,
                ffn_norm,
                gate,
                up,
                down,
                post_ffn_norm,
                local_rope: cfg.local_rope(i),
            });
        }
        let (norm, head) = if spec.head {
            let w = load(TensorId::FinalNorm, &mut trainables)?;
            check_shape(TensorId::FinalNorm, w.dims(), &[h])?;
            let norm = RmsNorm {
                weight: w,
                eps: cfg.rms_norm_eps,
                fused: false,
                shift: cfg.norm_shift(),
            };
            let head = if weights.contains(TensorId::Head) {
                load(TensorId::Head, &mut trainables)?
            } else if let Some(e) = &embed {
                // Tied, and this stage also holds the embedding: one parameter.
                e.clone()
            } else {
                // Tied across stages: this copy's gradient is summed with the
                // first stage's by the engine (same name on both stages).
                load(TensorId::Embed, &mut trainables)?
            };
            check_shape(TensorId::Head, head.dims(), &[cfg.vocab_size, h])?;
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, opts.dtype, &dev)?;
        let rope_local = Rope::local(&cfg, cfg.max_position_embeddings, opts.dtype, &dev)?;
        Ok(Self {
            cfg,
            spec,
            dtype: opts.dtype,
            embed,
            blocks,
            norm,
            head,
            rope,
            rope_local,
            trainables,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn spec(&self) -> StageSpec {
        self.spec
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The trainable parameters, by name (HF names for full fine-tuning,
    /// PEFT names for adapters), in a fixed order.
    pub fn trainables(&self) -> &[(String, Var)] {
        &self.trainables
    }

    /// Replaces a trainable parameter's value (checkpoint restore).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let (_, var) = self
            .trainables
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if var.dims() != value.dims() {
            return Err(ModelError::ShapeMismatch {
                name: name.into(),
                expected: var.dims().to_vec(),
                actual: value.dims().to_vec(),
            });
        }
        var.set(&value.to_dtype(self.dtype)?)?;
        Ok(())
    }

    /// Runs the stage (building the autograd graph). Returns hidden states
    /// `[rows * len, hidden]`, or logits `[rows * len, vocab]` on the last stage.
    pub fn forward(&self, input: &TrainInput, b: &BatchLayout, drop: &DropCtx) -> Result<Tensor> {
        if rayon::current_thread_index().is_some() {
            return self.forward_here(input, b, drop);
        }
        match train_pool() {
            Some(pool) => pool.install(|| self.forward_here(input, b, drop)),
            None => rayon::scope(|_| self.forward_here(input, b, drop)),
        }
    }

    fn forward_here(&self, input: &TrainInput, b: &BatchLayout, drop: &DropCtx) -> Result<Tensor> {
        let n = b.tokens();
        let dev = Device::Cpu;
        let mut x = match (input, &self.embed) {
            (TrainInput::Tokens(ids), Some(e)) => {
                if ids.len() != n {
                    return Err(ModelError::BadStageInput(format!(
                        "{} tokens for a {}×{} batch",
                        ids.len(),
                        b.rows,
                        b.len
                    )));
                }
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ModelError::TokenOutOfRange {
                        id,
                        vocab: self.cfg.vocab_size,
                    });
                }
                let x = embed_rows(e, ids)?;
                match self.cfg.embed_scale() {
                    // Not folded into the table: a tied head uses it unscaled.
                    Some(s) => (x * s)?,
                    None => x,
                }
            }
            (TrainInput::Hidden(h), None) => {
                if h.dims() != [n, self.cfg.hidden_size] {
                    return Err(ModelError::BadStageInput(format!(
                        "hidden states {:?}, expected [{n}, {}]",
                        h.dims(),
                        self.cfg.hidden_size
                    )));
                }
                h.to_dtype(self.dtype)?
            }
            (TrainInput::Tokens(_), None) => {
                return Err(ModelError::BadStageInput(
                    "tokens sent to a stage without the embedding".into(),
                ));
            }
            (TrainInput::Hidden(_), Some(_)) => {
                return Err(ModelError::BadStageInput(
                    "hidden states sent to the first stage".into(),
                ));
            }
        };
        if b.len > self.rope.max_positions() {
            return Err(ModelError::PromptTooLong {
                tokens: b.len,
                context: self.rope.max_positions(),
            });
        }
        let positions = b.positions();
        // LongRoPE: the long table for the whole pass once any position
        // runs past the original context (transformers' rule).
        let end = positions.iter().max().map_or(0, |p| *p as usize + 1);
        let off = self.rope.table_offset(end) as u32;
        let rows: Vec<u32> = positions.iter().map(|p| p + off).collect();
        let pos = Tensor::from_vec(rows, n, &dev)?;
        let rot = self.cfg.rotary_dim();
        let at = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(&pos, 0)?.reshape((b.rows, 1, b.len, rot))?)
        };

        let ctx = Ctx {
            rows: b.rows,
            len: b.len,
            mask: b.mask(self.dtype, &dev)?,
            window_mask: match self.cfg.sliding_window {
                // Only where the window cuts (else it is `mask`).
                Some(w) if b.len > w && self.blocks.iter().any(|k| k.slides) => {
                    Some(b.windowed_mask(Some(w), self.dtype, &dev)?)
                }
                _ => None,
            },
            cos: at(&self.rope.cos)?,
            sin: at(&self.rope.sin)?,
            // The local tables (never LongRoPE) by plain position.
            local: match &self.rope_local {
                Some(r) => {
                    let pos = Tensor::from_vec(positions, n, &dev)?;
                    let at = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.index_select(&pos, 0)?.reshape((b.rows, 1, b.len, rot))?)
                    };
                    Some((at(&r.cos)?, at(&r.sin)?))
                }
                None => None,
            },
            drop,
        };
        for block in &self.blocks {
            x = block.forward(&self.cfg, &x, &ctx)?;
        }
        match (&self.norm, &self.head) {
            (Some(norm), Some(head)) => softcap(
                &matmul_t(&fused::rms_norm(norm, &x)?, head)?,
                self.cfg.final_logit_softcap,
            ),
            _ => Ok(x),
        }
    }

    /// Recomputes the stage from its input and back-propagates `upstream`:
    /// the gradients of this micro-batch for the trainable parameters and
    /// for the input (what goes to the previous stage).
    ///
    /// The pass runs on a worker of the training pool ([`train_pool`]):
    /// the matrix products split among its workers from inside the pool
    /// instead of the calling thread handing each over and sleeping.
    pub fn backward(
        &self,
        input: &TrainInput,
        b: &BatchLayout,
        drop: &DropCtx,
        upstream: Upstream<'_>,
    ) -> Result<Backward> {
        if rayon::current_thread_index().is_some() {
            return self.backward_here(input, b, drop, upstream);
        }
        match train_pool() {
            Some(pool) => pool.install(|| self.backward_here(input, b, drop, upstream)),
            None => rayon::scope(|_| self.backward_here(input, b, drop, upstream)),
        }
    }

    fn backward_here(
        &self,
        input: &TrainInput,
        b: &BatchLayout,
        drop: &DropCtx,
        upstream: Upstream<'_>,
    ) -> Result<Backward> {
        let (input, input_var) = match input {
            TrainInput::Hidden(h) => {
                let v = Var::from_tensor(&h.detach().to_dtype(self.dtype)?)?;
                (TrainInput::Hidden(v.as_tensor().clone()), Some(v))
            }
            TrainInput::Tokens(t) => (TrainInput::Tokens(t.clone()), None),
        };
        let sink = WeightGradSink::open();
        let out = self.forward(&input, b, drop)?;
        let (objective, loss_sum, targets) = match upstream {
            Upstream::Grad(g) => {
                if g.dims() != out.dims() {
                    return Err(ModelError::BadStageInput(format!(
                        "gradient {:?} for an output {:?}",
                        g.dims(),
                        out.dims()
                    )));
                }
                let g = g.detach().to_dtype(self.dtype)?;
                ((out * g)?.sum_all()?, None, 0)
            }
            Upstream::Loss { labels, scale } => {
                if self.head.is_none() {
                    return Err(ModelError::BadStageInput(
                        "labels sent to a stage without the head".into(),
                    ));
                }
                let (sum, targets) = loss_sum(&out, labels)?;
                let value = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                ((sum * scale)?, Some(value), targets)
            }
        };
        let mut store = objective.backward()?;
        let mut weight_grads = sink.take();
        // A weight's gradient from the sink, plus candle's where the same
        // tensor also took part otherwise (a tied embedding and head).
        let grads = self
            .trainables
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor();
                Ok(match (store.remove(t), weight_grads.remove(&t.id())) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let input_grad = match input_var {
            Some(v) => Some(match store.remove(v.as_tensor()) {
                Some(g) => g,
                None => v.as_tensor().zeros_like()?,
            }),
            None => None,
        };
        Ok(Backward {
            input_grad,
            grads,
            loss_sum,
            targets,
        })
    }

    /// The stage with every adapter folded into its base weight (`W + s·BA`)
    /// and nothing trainable: what a merged fine-tune serves.
    pub fn merged(&self) -> Result<Self> {
        let fold = |l: &TLinear| -> Result<TLinear> {
            Ok(TLinear {
                w: l.merged()?,
                bias: l.bias.as_ref().map(|b| b.detach()),
                lora: None,
            })
        };
        let norm = |n: &RmsNorm| RmsNorm {
            weight: n.weight.detach(),
            eps: n.eps,
            fused: false,
            shift: n.shift,
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(TBlock {
                    attn_norm: norm(&b.attn_norm),
                    qk_norm: b.qk_norm.as_ref().map(|(q, k)| (norm(q), norm(k))),
                    slides: b.slides,
                    q: fold(&b.q)?,
                    k: fold(&b.k)?,
                    v: fold(&b.v)?,
                    o: fold(&b.o)?,
                    post_attn_norm: b.post_attn_norm.as_ref().map(norm),
                    ffn_norm: norm(&b.ffn_norm),
                    gate: fold(&b.gate)?,
                    up: fold(&b.up)?,
                    down: fold(&b.down)?,
                    post_ffn_norm: b.post_ffn_norm.as_ref().map(norm),
                    local_rope: b.local_rope,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            spec: self.spec,
            dtype: self.dtype,
            embed: self.embed.as_ref().map(|t| t.detach()),
            blocks,
            norm: self.norm.as_ref().map(norm),
            head: self.head.as_ref().map(|t| t.detach()),
            rope: self.rope.clone(),
            rope_local: self.rope_local.clone(),
            trainables: Vec::new(),
        })
    }

    /// This stage's weights with adapters folded in, under their HF names
    /// (what a merged fine-tune writes as safetensors).
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        if let Some(e) = &self.embed {
            out.push((TensorId::Embed.hf_name(), e.detach()));
        }
        for (i, b) in (self.spec.start..self.spec.end).zip(&self.blocks) {
            let id = |t| TensorId::Layer(i, t).hf_name();
            out.push((id(L::AttnNorm), b.attn_norm.weight.detach()));
            out.push((id(L::ffn_norm(&self.cfg)), b.ffn_norm.weight.detach()));
            for (t, n) in [
                (L::PostAttnNorm, &b.post_attn_norm),
                (L::PostFfnNorm, &b.post_ffn_norm),
            ] {
                if let Some(n) = n {
                    out.push((id(t), n.weight.detach()));
                }
            }
            if let Some((q, k)) = &b.qk_norm {
                out.push((id(L::QNorm), q.weight.detach()));
                out.push((id(L::KNorm), k.weight.detach()));
            }
            if self.cfg.fused_projections() {
                let stack = |ls: &[&TLinear]| -> Result<Tensor> {
                    let ws = ls.iter().map(|l| l.merged()).collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&ws, 0)?)
                };
                out.push((id(L::Qkv), stack(&[&b.q, &b.k, &b.v])?));
                out.push((id(L::GateUp), stack(&[&b.gate, &b.up])?));
                out.push((id(L::O), b.o.merged()?));
                out.push((id(L::Down), b.down.merged()?));
            } else {
                for (t, l) in b.linears() {
                    out.push((id(t), l.merged()?));
                }
            }
            for (t, l) in [(L::QBias, &b.q), (L::KBias, &b.k), (L::VBias, &b.v)] {
                if let Some(bias) = &l.bias {
                    out.push((id(t), bias.detach()));
                }
            }
        }
        if let Some(n) = &self.norm {
            out.push((TensorId::FinalNorm.hf_name(), n.weight.detach()));
            if !self.cfg.tie_word_embeddings
                && let Some(h) = &self.head
            {
                out.push((TensorId::Head.hf_name(), h.detach()));
            }
        }
        Ok(out)
    }
}

fn new_lora(
    id: TensorId,
    c: &LoraConfig,
    rows: usize,
    cols: usize,
    opts: &TrainOptions,
    trainables: &mut Vec<(String, Var)>,
) -> Result<Lora> {
    if c.rank == 0 {
        return Err(ModelError::InvalidConfig(
            "LoRA rank must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&c.dropout) {
        return Err(ModelError::InvalidConfig(format!(
            "LoRA dropout {} is not in [0, 1)",
            c.dropout
        )));
    }
    let (a_name, b_name) = (lora_name(id, 'A'), lora_name(id, 'B'));
    // PEFT's default: A ~ kaiming-uniform(a = √5) = U(±1/√in), B = 0.
    let bound = 1.0 / (cols as f64).sqrt();
    let mut s = rng::Stream::new(rng::key(opts.seed, &a_name));
    let a: Vec<f64> = (0..c.rank * cols)
        .map(|_| (s.uniform() * 2.0 - 1.0) * bound)
        .collect();
    let mut s = rng::Stream::new(rng::key(opts.seed, &b_name));
    let b: Vec<f64> = (0..rows * c.rank)
        .map(|_| {
            if c.init_b_std > 0.0 {
                s.normal() * c.init_b_std
            } else {
                0.0
            }
        })
        .collect();
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::from_vec(a, (c.rank, cols), &dev)?.to_dtype(opts.dtype)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(b, (rows, c.rank), &dev)?.to_dtype(opts.dtype)?)?;
    let lora = Lora {
        name: id.hf_name(),
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale: c.alpha / c.rank as f64,
        dropout: c.dropout,
    };
    trainables.push((a_name, a));
    trainables.push((b_name, b));
    Ok(lora)
}

/// Summed cross-entropy of the target tokens (`labels[i] != IGNORE`) and
/// their count. `logits`: `[n, vocab]`; `labels`: `n` ids.
pub fn loss_sum(logits: &Tensor, labels: &[u32]) -> Result<(Tensor, usize)> {
    let (n, vocab) = logits.dims2()?;
    if labels.len() != n {
        return Err(ModelError::BadStageInput(format!(
            "{} labels for {n} tokens",
            labels.len()
        )));
    }
    let rows: Vec<u32> = (0..n as u32)
        .filter(|&i| labels[i as usize] != IGNORE)
        .collect();
    if rows.is_empty() {
        // Nothing to learn from here; a zero that still back-propagates.
        return Ok(((logits.sum_all()? * 0.0)?, 0));
    }
    let targets: Vec<u32> = rows.iter().map(|&i| labels[i as usize]).collect();
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange { id: t, vocab });
    }
    let k = rows.len();
    let op = CrossEntropySum {
        rows: rows.into_iter().map(|r| r as usize).collect(),
        targets: targets.into_iter().map(|t| t as usize).collect(),
        vocab,
    };
    Ok((logits.contiguous()?.apply_op1(op)?, k))
}

/// The summed cross-entropy of chosen rows of `[n, vocab]` logits, as one
/// op: forward `Σ (logsumexp(x_r) − x_r[t_r])` (summed in f64), backward
/// `g · (softmax(x_r) − onehot(t_r))` on the chosen rows and zero elsewhere.
/// Written with candle's ops it took about twenty passes over the logits
/// (49152 wide for SmolLM2) and as many buffers, forward and back.
struct CrossEntropySum {
    rows: Vec<usize>,
    targets: Vec<usize>,
    vocab: usize,
}

/// A logit type: `exp` in its own precision (f32's is several times
/// cheaper than f64's), sums carried in f64.
trait Logit: Copy + Into<f64> + Sync + Send + Default {
    fn exp_minus(self, shift: f64) -> f64;
}

impl Logit for f32 {
    fn exp_minus(self, shift: f64) -> f64 {
        f64::from((self - shift as f32).exp())
    }
}

impl Logit for f64 {
    fn exp_minus(self, shift: f64) -> f64 {
        (self - shift).exp()
    }
}

/// `logsumexp(row)`, summed in f64.
fn logsumexp<T: Logit>(row: &[T]) -> f64 {
    let max = row
        .iter()
        .map(|&v| v.into())
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + row.iter().map(|&v| v.exp_minus(max)).sum::<f64>().ln()
}

impl CrossEntropySum {
    fn sum<T: Logit>(&self, x: &[T]) -> f64 {
        use rayon::prelude::*;
        self.rows
            .par_iter()
            .zip(self.targets.par_iter())
            .map(|(&r, &t)| {
                let row = &x[r * self.vocab..(r + 1) * self.vocab];
                logsumexp(row) - row[t].into()
            })
            .sum()
    }

    /// `g · (softmax − onehot)` on the chosen rows of an `[n, vocab]` zero.
    fn grad<T: Logit>(&self, x: &[T], g: f64, from: impl Fn(f64) -> T + Sync) -> Vec<T> {
        use rayon::prelude::*;
        let mut out = vec![T::default(); x.len()];
        let mut chosen: Vec<(usize, usize, &mut [T])> = Vec::with_capacity(self.rows.len());
        let mut rest: &mut [T] = &mut out;
        let mut at = 0;
        let mut order: Vec<(usize, usize)> = self
            .rows
            .iter()
            .copied()
            .zip(self.targets.iter().copied())
            .collect();
        order.sort_unstable();
        for (r, t) in order {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((r - at) * self.vocab);
            let (row, tail) = tail.split_at_mut(self.vocab);
            chosen.push((r, t, row));
            rest = tail;
            at = r + 1;
        }
        chosen.into_par_iter().for_each(|(r, t, out)| {
            let row = &x[r * self.vocab..(r + 1) * self.vocab];
            let lse = logsumexp(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = from(g * v.exp_minus(lse));
            }
            out[t] = from(g * (row[t].exp_minus(lse) - 1.0));
        });
        out
    }
}

impl candle_core::CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let Some((a, b)) = l.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "cross-entropy: the logits are not contiguous".into(),
            ));
        };
        let out = match s {
            S::F32(v) => S::F32(vec![self.sum(&v[a..b]) as f32]),
            S::F64(v) => S::F64(vec![self.sum(&v[a..b])]),
            _ => {
                return Err(candle_core::Error::Msg(
                    "cross-entropy: logits must be f32 or f64".into(),
                ));
            }
        };
        Ok((out, candle_core::Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let x = x.contiguous()?;
        let shape = x.shape().clone();
        let out = match x.dtype() {
            DType::F32 => {
                let v = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(self.grad(&v, g, |d| d as f32), shape, x.device())?
            }
            DType::F64 => {
                let v = x.flatten_all()?.to_vec1::<f64>()?;
                Tensor::from_vec(self.grad(&v, g, |d| d), shape, x.device())?
            }
            dt => {
                return Err(candle_core::Error::Msg(format!(
                    "cross-entropy: logits of {dt:?}"
                )));
            }
        };
        Ok(Some(out))
    }
}

/// Gradients of one optimizer step computed in one process: the reference
/// the pipeline must reproduce.
#[derive(Debug)]
pub struct StepGrads {
    /// Per [`TrainStage::trainables`], summed over the micro-batches.
    pub grads: Vec<Option<Tensor>>,
    /// Summed cross-entropy over the step.
    pub loss_sum: f64,
    /// Target tokens in the step (the loss is divided by this once).
    pub targets: usize,
}

/// Runs forward and backward of every micro-batch of a step on a stage
/// that holds the whole model, in micro-batch order, with dropout keyed by
/// (`seed`, `step`, micro-batch) as the pipeline keys it.
pub fn step_grads(
    stage: &TrainStage,
    batches: &[super::batch::MicroBatch],
    seed: u64,
    step: u64,
) -> Result<StepGrads> {
    let targets: usize = batches.iter().map(|b| b.targets()).sum();
    let scale = 1.0 / targets.max(1) as f64;
    let mut acc: Vec<Option<Tensor>> = vec![None; stage.trainables().len()];
    let mut loss = 0.0;
    for (i, b) in batches.iter().enumerate() {
        let drop = DropCtx {
            seed,
            step,
            micro: i as u32,
            train: true,
        };
        let back = stage.backward(
            &TrainInput::Tokens(b.tokens.clone()),
            &b.layout,
            &drop,
            Upstream::Loss {
                labels: &b.labels,
                scale,
            },
        )?;
        accumulate(&mut acc, back.grads)?;
        loss += back.loss_sum.unwrap_or(0.0);
    }
    Ok(StepGrads {
        grads: acc,
        loss_sum: loss,
        targets,
    })
}

/// Adds one micro-batch's gradients into running sums (in order, so sums
/// are reproducible), in place where they lie contiguous: a pass's
/// gradients are fresh tensors nothing else holds (candle's backward sums
/// into new buffers; the weight-gradient sink's are new products), so the
/// first micro-batch's becomes the sum.
pub fn accumulate(acc: &mut [Option<Tensor>], grads: Vec<Option<Tensor>>) -> Result<()> {
    in_train_pool(|| accumulate_here(acc, grads))
}

fn accumulate_here(acc: &mut [Option<Tensor>], grads: Vec<Option<Tensor>>) -> Result<()> {
    for (a, g) in acc.iter_mut().zip(grads) {
        if let Some(g) = g {
            *a = Some(match a.take() {
                Some(prev)
                    if prev.dims() == g.dims()
                        && prev.dtype() == g.dtype()
                        && prev.is_contiguous()
                        && g.is_contiguous() =>
                {
                    prev.inplace_op2(&g, &AddAssign)?;
                    prev
                }
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// `a += b`, elementwise, for contiguous tensors of one float type.
struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(
        &self,
        a: &mut candle_core::CpuStorage,
        la: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use super::optim::UPDATE_CHUNK as CHUNK;
        use candle_core::CpuStorage as S;
        use rayon::prelude::*;
        let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg("add-assign: not contiguous".into()));
        };
        if a1 - a0 != b1 - b0 {
            return Err(candle_core::Error::Msg("add-assign: sizes differ".into()));
        }
        match (a, b) {
            (S::F32(a), S::F32(b)) => a[a0..a1]
                .par_chunks_mut(CHUNK)
                .zip(b[b0..b1].par_chunks(CHUNK))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b)),
            (S::F64(a), S::F64(b)) => a[a0..a1]
                .par_chunks_mut(CHUNK)
                .zip(b[b0..b1].par_chunks(CHUNK))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b)),
            _ => {
                return Err(candle_core::Error::Msg(
                    "add-assign: not two f32 or two f64 tensors".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained weight's gradient reaches the sink of the pass that used
    /// it, also when another pass opens and closes its own sink on the same
    /// thread in between (rayon running another stage's pass while this
    /// one waits), and equals candle's own gradient.
    #[test]
    fn weight_gradients_reach_their_own_pass_when_passes_nest() {
        let dev = Device::Cpu;
        let var = |v: &[f64], r: usize, c: usize| {
            Var::from_tensor(&Tensor::from_slice(v, (r, c), &dev).unwrap()).unwrap()
        };
        let w = var(
            &[
                0.1, -0.2, 0.3, 0.4, 0.5, -0.6, 0.7, 0.8, -0.9, 1.0, 1.1, 1.2,
            ],
            3,
            4,
        );
        let x = var(&[1.0, 2.0, -1.0, 0.5, 0.25, -3.0, 2.0, 1.5], 2, 4);
        let w2 = var(&[1.0, 2.0, 3.0, 4.0], 1, 4);
        // The reference: candle's matmul backward, no sink open.
        let want = {
            let y = matmul_t(x.as_tensor(), w.as_tensor()).unwrap();
            let mut g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
            (
                g.remove(w.as_tensor()).unwrap(),
                g.remove(x.as_tensor()).unwrap(),
            )
        };
        let outer = WeightGradSink::open();
        let y = matmul_t(x.as_tensor(), w.as_tensor()).unwrap();
        // Another pass, start to end, on this thread.
        let inner = WeightGradSink::open();
        let z = matmul_t(x.as_tensor(), w2.as_tensor()).unwrap();
        let _ = z.sum_all().unwrap().backward().unwrap();
        let inner = inner.take();
        assert!(inner.contains_key(&w2.as_tensor().id()));
        assert!(!inner.contains_key(&w.as_tensor().id()));
        let mut g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
        let mut got = outer.take();
        assert!(WEIGHT_GRADS.with(|s| s.borrow().is_empty()));
        let gw = got.remove(&w.as_tensor().id()).unwrap();
        assert!(got.is_empty(), "only this pass's weight");
        assert!(g.get(w.as_tensor()).is_none(), "not through candle as well");
        let gx = g.remove(x.as_tensor()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f64 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&gw, &want.0) < 1e-12);
        assert!(diff(&gx, &want.1) < 1e-12);
        // A pass that fails closes its sink when its guard drops.
        drop(WeightGradSink::open());
        assert!(WEIGHT_GRADS.with(|s| s.borrow().is_empty()));
    }

    /// The LoRA product's value and its gradients for `x`, `a` and `b`
    /// equal candle's ops on the same tensors (`x` trained or not), and a
    /// frozen weight gets none.
    #[test]
    fn the_lora_product_matches_candles_ops_with_its_gradients() {
        let dev = Device::Cpu;
        // The second size takes the parallel sum of the adapter's part.
        for ((dtype, tol), (n, k, m, r)) in [(DType::F64, 1e-12), (DType::F32, 1e-5)]
            .into_iter()
            .flat_map(|d| [(d, (37, 64, 48, 4)), (d, (130, 64, 600, 4))])
        {
            let mut s = rng::Stream::new(7);
            let mut t = |r: usize, c: usize| {
                let v: Vec<f64> = (0..r * c).map(|_| s.uniform() * 2.0 - 1.0).collect();
                Tensor::from_vec(v, (r, c), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let w = t(m, k);
            let a = Var::from_tensor(&t(r, k)).unwrap();
            let b = Var::from_tensor(&t(m, r)).unwrap();
            let weights = t(n, m);
            for x_trained in [true, false] {
                let x0 = t(n, k);
                let x = if x_trained {
                    Var::from_tensor(&x0).unwrap().as_tensor().clone()
                } else {
                    x0
                };
                let run = |fused: bool| {
                    let y = if fused {
                        lora_product(&x, &w, a.as_tensor(), b.as_tensor(), 0.5).unwrap()
                    } else {
                        let z = x
                            .matmul(&a.as_tensor().t().unwrap())
                            .unwrap()
                            .matmul(&b.as_tensor().t().unwrap())
                            .unwrap();
                        (x.matmul(&w.t().unwrap()).unwrap() + (z * 0.5).unwrap()).unwrap()
                    };
                    let g = (&y * &weights)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    assert!(g.get(&w).is_none());
                    let grads = [x.clone(), a.as_tensor().clone(), b.as_tensor().clone()]
                        .map(|v| g.get(&v).cloned());
                    (y, grads)
                };
                let (y1, g1) = run(true);
                let (y2, g2) = run(false);
                let gap = |p: &Tensor, q: &Tensor| -> f64 {
                    (p - q)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar()
                        .unwrap()
                };
                assert!(gap(&y1, &y2) < tol);
                // (candle also builds a gradient for an input that is not
                // trained; the op does not.)
                for (p, q) in g1.iter().zip(&g2) {
                    if let (Some(p), Some(q)) = (p, q) {
                        assert!(gap(p, q) < tol * 10.0);
                    }
                }
                assert!(g1[1].is_some() && g1[2].is_some());
                assert_eq!(g1[0].is_some(), x_trained);
            }
        }
    }
}
