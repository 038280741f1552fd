// GGUF Q4_1 weights (5 words a block: f16 d | f16 m << 16, 16 bytes of
// nibbles: low nibbles values 0..16, high nibbles 16..32) against Q8_1
// activations (see quantize.wgsl), as the CPU kernel in quant.rs.
@group(0) @binding(2) var<storage, read> a: array<u32>;

fn row_dot(r: u32, t0: u32, nt: u32, first: u32, step: u32) -> vec4<f32> {
    let bpr = p.cols / 32u;
    var acc = vec4<f32>(0.0);
    for (var b = first; b < bpr; b += step) {
        let wb = (r * bpr + b) * 5u;
        let dm = unpack2x16float(w[wb]);
        for (var k = 0u; k < nt; k++) {
            let ab = ((t0 + k) * bpr + b) * 10u;
            var isum = 0i;
            for (var j = 0u; j < 4u; j++) {
                let q = w[wb + 1u + j];
                isum += dot4us(q & 0x0F0F0F0Fu, a[ab + j]) + dot4us((q >> 4u) & 0x0F0F0F0Fu, a[ab + 4u + j]);
            }
            acc[k] += dm.x * bitcast<f32>(a[ab + 8u]) * f32(isum) + dm.y * bitcast<f32>(a[ab + 9u]);
        }
    }
    return acc;
}

fn deq(r: u32, c: u32) -> f32 {
    let bpr = p.cols / 32u;
    let wb = (r * bpr + c / 32u) * 5u;
    let i = c % 32u;
    let byte = (w[wb + 1u + (i % 16u) / 4u] >> (8u * (i % 4u))) & 0xFFu;
    let q = select(byte >> 4u, byte & 0x0Fu, i < 16u);
    let dm = unpack2x16float(w[wb]);
    return f32(q) * dm.x + dm.y;
}
