// Dense f16 weights (two a word) against f32 activations.
@group(0) @binding(2) var<storage, read> a: array<f32>;

fn row_dot(r: u32, t0: u32, nt: u32, first: u32, step: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    let half_cols = p.cols / 2u;
    for (var c = first; c < half_cols; c += step) {
        let wv = unpack2x16float(w[r * half_cols + c]);
        for (var k = 0u; k < nt; k++) {
            let x = (t0 + k) * p.cols + 2u * c;
            acc[k] += wv.x * a[x] + wv.y * a[x + 1u];
        }
    }
    return acc;
}

fn deq(r: u32, c: u32) -> f32 {
    let v = unpack2x16float(w[(r * p.cols + c) / 2u]);
    return select(v.y, v.x, c % 2u == 0u);
}
