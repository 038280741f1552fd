// y[t, :] = W[ids[t], :], dequantized (the format's `deq` is spliced in).

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    flags: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> ids: array<u32>;

//FORMAT

@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg, 64u);
    if (i >= p.n * p.cols) {
        return;
    }
    y[i] = deq(ids[i / p.cols], i % p.cols);
}
