// Small element-wise kernels.

struct Params {
    // Elements to write.
    count: u32,
    // silu_mul, gelu_mul: intermediate size; gather: row width.
    width: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> rows: array<u32>;

// Output `idx`'s gate and up values, x[t, i] and x[t, width + i], of a
// fused [n, 2 * width] gate/up.
fn gate_up(idx: u32) -> vec2<f32> {
    let t = idx / p.width;
    let i = idx % p.width;
    return vec2<f32>(x[t * 2u * p.width + i], x[t * 2u * p.width + p.width + i]);
}

// y[t, i] = silu(gate) * up (SwiGLU).
@compute @workgroup_size(64)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat(gid, nwg, 64u);
    if (idx >= p.count) {
        return;
    }
    let gu = gate_up(idx);
    y[idx] = gu.x / (1.0 + exp(-gu.x)) * gu.y;
}

// y[t, i] = gelu_tanh(gate) * up (GeGLU, Gemma).
@compute @workgroup_size(64)
fn gelu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat(gid, nwg, 64u);
    if (idx >= p.count) {
        return;
    }
    let gu = gate_up(idx);
    let g = gu.x;
    let c = 0.7978845608028654 * (g + 0.044715 * g * g * g);
    y[idx] = 0.5 * g * (1.0 + tanh_c(c)) * gu.y;
}

// y[k, :] = x[rows[k], :].
@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat(gid, nwg, 64u);
    if (idx >= p.count) {
        return;
    }
    y[idx] = x[rows[idx / p.width] * p.width + idx % p.width];
}
