// Dense f32 weights (bits in u32 words) against f32 activations.
@group(0) @binding(2) var<storage, read> a: array<f32>;

fn row_dot(r: u32, t0: u32, nt: u32, first: u32, step: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var c = first; c < p.cols; c += step) {
        let wv = bitcast<f32>(w[r * p.cols + c]);
        for (var k = 0u; k < nt; k++) {
            acc[k] += wv * a[(t0 + k) * p.cols + c];
        }
    }
    return acc;
}

fn deq(r: u32, c: u32) -> f32 {
    return bitcast<f32>(w[r * p.cols + c]);
}
