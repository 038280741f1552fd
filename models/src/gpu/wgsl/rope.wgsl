// Rotary embedding in place on the Q and K heads of a [n, stride] QKV
// buffer (Q heads then K heads from column 0), HF "rotate half" layout,
// over the first `rot` lanes of each head (the rest pass through), with the
// CPU's cos/sin tables ([rows, rot]; `pos` holds each token's row).

struct Params {
    n: u32,
    // Q heads + K heads.
    heads: u32,
    head_dim: u32,
    stride: u32,
    rot: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.rot / 2u;
    let idx = flat(gid, nwg, 64u);
    if (idx >= p.n * p.heads * half) {
        return;
    }
    let i = idx % half;
    let h = (idx / half) % p.heads;
    let t = idx / (half * p.heads);
    let base = t * p.stride + h * p.head_dim;
    let tb = pos[t] * p.rot;
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    x[base + i] = x1 * cos_t[tb + i] + (-x2) * sin_t[tb + i];
    x[base + i + half] = x2 * cos_t[tb + i + half] + x1 * sin_t[tb + i + half];
}
