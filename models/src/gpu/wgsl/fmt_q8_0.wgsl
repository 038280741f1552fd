// GGUF Q8_0 weights, repacked to 9 words a block (f16 d in the low half of
// the first word, then 32 i8) against Q8_0 activations, as candle's CPU
// Q8_0 kernel.
@group(0) @binding(2) var<storage, read> a: array<u32>;

fn row_dot(r: u32, t0: u32, nt: u32, first: u32, step: u32) -> vec4<f32> {
    let bpr = p.cols / 32u;
    var acc = vec4<f32>(0.0);
    for (var b = first; b < bpr; b += step) {
        let wb = (r * bpr + b) * 9u;
        let d = unpack2x16float(w[wb]).x;
        for (var k = 0u; k < nt; k++) {
            let ab = ((t0 + k) * bpr + b) * 10u;
            var isum = 0i;
            for (var j = 0u; j < 8u; j++) {
                isum += dot4ss(w[wb + 1u + j], a[ab + j]);
            }
            acc[k] += d * bitcast<f32>(a[ab + 8u]) * f32(isum);
        }
    }
    return acc;
}

fn deq(r: u32, c: u32) -> f32 {
    let bpr = p.cols / 32u;
    let wb = (r * bpr + c / 32u) * 9u;
    let i = c % 32u;
    let q = extractBits(bitcast<i32>(w[wb + 1u + i / 4u]), 8u * (i % 4u), 8u);
    return f32(q) * unpack2x16float(w[wb]).x;
}
