// Copies the keys and values of one sequence's new tokens from the QKV
// buffer into its cache. Cache layout, token-major:
// [capacity][layers][K | V][kv_dim].

struct Params {
    tokens: u32,
    kv_dim: u32,
    // First row of the sequence in the QKV buffer.
    src_row: u32,
    stride: u32,
    k_col: u32,
    // Position of the first new token in the cache.
    dst_pos: u32,
    cache_row: u32,
    layer_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat(gid, nwg, 64u);
    if (idx >= p.tokens * p.kv_dim) {
        return;
    }
    let t = idx / p.kv_dim;
    let j = idx % p.kv_dim;
    let s = (p.src_row + t) * p.stride + p.k_col + j;
    let d = (p.dst_pos + t) * p.cache_row + p.layer_off + j;
    cache[d] = src[s];
    cache[d + p.kv_dim] = src[s + p.kv_dim];
}
