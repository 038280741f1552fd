// y[t, r] = W[r, :] . x[t, :] (+ bias[r]) (+ y[t, r]) for a weight format
// spliced in below (`row_dot`), for a tile of up to four tokens, so each
// weight block is read once per tile. `main`: one workgroup shares a row's
// blocks and reduces (long rows); `rowwise`: one invocation a row, no
// barriers (short rows, and software adapters, where barriers are dear).

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    // bit 0: add into y (residual); bit 1: add the bias.
    flags: u32,
    // Workgroups along x (rows beyond it continue along y).
    grid_x: u32,
    // Output row r of token t is y[t * stride + off + r] (a block of rows
    // of a wider output).
    stride: u32,
    off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<vec4<f32>, 64>;

//FORMAT

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * p.grid_x;
    let t0 = wid.z * 4u;
    if (r >= p.rows) {
        return;
    }
    let nt = min(4u, p.n - t0);
    part[lid] = row_dot(r, t0, nt, lid, 64u);
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if (lid < nt) {
        store(r, t0 + lid, part[0][lid]);
    }
}

fn store(r: u32, t: u32, dot: f32) {
    let idx = t * p.stride + p.off + r;
    var v = dot;
    if ((p.flags & 2u) != 0u) {
        v += bias[r];
    }
    if ((p.flags & 1u) != 0u) {
        v = y[idx] + v;
    }
    y[idx] = v;
}

@compute @workgroup_size(64)
fn rowwise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    let t0 = gid.z * 4u;
    if (r >= p.rows) {
        return;
    }
    let nt = min(4u, p.n - t0);
    let acc = row_dot(r, t0, nt, 0u, 1u);
    for (var k = 0u; k < nt; k++) {
        store(r, t0 + k, acc[k]);
    }
}
