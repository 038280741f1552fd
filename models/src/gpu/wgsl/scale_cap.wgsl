// In place: y = c * tanh(y * s / c) where c > 0, else y * s (Gemma's
// embedding scale, and its soft-cap of the logits).

struct Params {
    count: u32,
    scale: f32,
    cap: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg, 64u);
    if (i >= p.count) {
        return;
    }
    var v = y[i] * p.scale;
    if (p.cap > 0.0) {
        v = p.cap * tanh_c(v / p.cap);
    }
    y[i] = v;
}
