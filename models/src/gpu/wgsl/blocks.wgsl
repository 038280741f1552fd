// Shared by the block formats held as stored (Q4_0, Q5_0, Q5_1, Q4_K,
// Q5_K, Q6_K), each padded to whole words: the format's file defines QK
// (values a block), BW (words a block) and `bval(wb, i)` (value i of the
// block at word wb); these read them against f32 activations.
@group(0) @binding(2) var<storage, read> a: array<f32>;

// Byte `o` of the weights.
fn wbyte(o: u32) -> u32 {
    return (w[o / 4u] >> (8u * (o % 4u))) & 0xFFu;
}

// The f16 at byte `o` (2-byte aligned).
fn wf16(o: u32) -> f32 {
    let v = unpack2x16float(w[o / 4u]);
    return select(v.x, v.y, (o % 4u) == 2u);
}

// A byte as a signed value.
fn i8v(b: u32) -> f32 {
    return f32(bitcast<i32>(b << 24u) >> 24u);
}

// Q4_K's and Q5_K's sub-block j's 6-bit scale and min (llama.cpp's
// get_scale_min_k4), from the scales at byte s.
fn scale_min(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(wbyte(s + j) & 63u), f32(wbyte(s + j + 4u) & 63u));
    }
    let sc = (wbyte(s + j + 4u) & 0x0Fu) | ((wbyte(s + j - 4u) >> 6u) << 4u);
    let m = (wbyte(s + j + 4u) >> 4u) | ((wbyte(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

fn row_dot(r: u32, t0: u32, nt: u32, first: u32, step: u32) -> vec4<f32> {
    let bpr = p.cols / QK;
    var acc = vec4<f32>(0.0);
    for (var b = first; b < bpr; b += step) {
        let wb = (r * bpr + b) * BW;
        for (var i = 0u; i < QK; i++) {
            let v = bval(wb, i);
            for (var k = 0u; k < nt; k++) {
                acc[k] += v * a[(t0 + k) * p.cols + b * QK + i];
            }
        }
    }
    return acc;
}

fn deq(r: u32, c: u32) -> f32 {
    let bpr = p.cols / QK;
    return bval((r * bpr + c / QK) * BW, c % QK);
}
