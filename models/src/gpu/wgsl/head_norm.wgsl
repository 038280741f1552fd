// RMSNorm in place over each of `heads` heads of `cols` values that start
// at column `col0` of each row of `stride` values (Qwen3's per-head query
// and key norms on the QKV buffer), one workgroup a head:
// x[t, col0 + h*cols + c] *= w[c] / sqrt(mean_c(x^2) + eps).

struct Params {
    rows: u32,
    heads: u32,
    cols: u32,
    stride: u32,
    col0: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = (row / p.heads) * p.stride + p.col0 + (row % p.heads) * p.cols;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += 64u) {
        let v = x[base + c];
        s += v * v;
    }
    part[lid] = s;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) {
            part[lid] += part[lid + k];
        }
        workgroupBarrier();
    }
    let m = sqrt(part[0] / f32(p.cols) + p.eps);
    workgroupBarrier();
    for (var c = lid; c < p.cols; c += 64u) {
        x[base + c] = x[base + c] * w[c] / m;
    }
}
