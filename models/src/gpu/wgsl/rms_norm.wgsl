// y[t, :] = x[t, :] * w / sqrt(mean(x[t, :]^2) + eps), one workgroup a row;
// with `add`, y[t, :] += that (Gemma's norm of a block's output, added to
// the residual).

struct Params {
    n: u32,
    cols: u32,
    eps: f32,
    add: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += 256u) {
        let v = x[base + c];
        s += v * v;
    }
    part[lid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            part[lid] += part[lid + k];
        }
        workgroupBarrier();
    }
    let m = sqrt(part[0] / f32(p.cols) + p.eps);
    for (var c = lid; c < p.cols; c += 256u) {
        let v = x[base + c] * w[c] / m;
        if (p.add != 0u) {
            y[base + c] += v;
        } else {
            y[base + c] = v;
        }
    }
}
