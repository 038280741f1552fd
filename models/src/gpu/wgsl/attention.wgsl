// Causal attention of one sequence's new tokens over its cache (grouped
// KV heads). One workgroup per (head, token): scores into a scratch row,
// max and sum reduced in the workgroup, then the weighted sum of values.

struct Params {
    // New tokens of this sequence and the position of the first.
    tokens: u32,
    start: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    // QKV buffer row stride and this sequence's first row in it.
    stride: u32,
    src_row: u32,
    cache_row: u32,
    layer_off: u32,
    kv_dim: u32,
    // Scratch floats per (token, head).
    t_max: u32,
    scale: f32,
    // Sliding window: keys seen per query, its own included (0: all).
    window: u32,
    // Soft cap of the scores, c * tanh(s / c) (0: none; Gemma 2).
    cap: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let i = wid.y;
    let t = p.start + i + 1u;
    // The first key this query sees.
    var lo = 0u;
    if (p.window > 0u && t > p.window) {
        lo = t - p.window;
    }
    let g = h / (p.heads / p.kv_heads);
    let qb = (p.src_row + i) * p.stride + h * p.head_dim;
    let sb = (i * p.heads + h) * p.t_max;
    let kb = p.layer_off + g * p.head_dim;
    var m = -3.4e38;
    for (var j = lo + lid; j < t; j += 64u) {
        var s = 0.0;
        for (var d = 0u; d < p.head_dim; d++) {
            s += qkv[qb + d] * cache[j * p.cache_row + kb + d];
        }
        s *= p.scale;
        if (p.cap > 0.0) {
            s = p.cap * tanh_c(s / p.cap);
        }
        scores[sb + j] = s;
        m = max(m, s);
    }
    red[lid] = m;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] = max(red[lid], red[lid + k]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = lo + lid; j < t; j += 64u) {
        let e = exp(scores[sb + j] - mx);
        scores[sb + j] = e;
        sum += e;
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let total = red[0];
    storageBarrier();
    workgroupBarrier();
    let vb = kb + p.kv_dim;
    for (var d = lid; d < p.head_dim; d += 64u) {
        var o = 0.0;
        for (var j = lo; j < t; j++) {
            o += (scores[sb + j] / total) * cache[j * p.cache_row + vb + d];
        }
        out[(p.src_row + i) * p.heads * p.head_dim + h * p.head_dim + d] = o;
    }
}
