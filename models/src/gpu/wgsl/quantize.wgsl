// Activations to 8-bit blocks of 32 as llama.cpp's reference
// `quantize_row_q8_1` (and candle's Q8_0): d = amax / 127, q = round(x / d)
// (half away from zero), d and the scaled sum d * sum(q) rounded to f16.
// Block layout: 8 words of packed i8, d (f32 bits), s (f32 bits).

struct Params {
    blocks: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = flat(gid, nwg, 64u);
    if (b >= p.blocks) {
        return;
    }
    let base = b * 32u;
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        amax = max(amax, abs(x[base + i]));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    var sum = 0i;
    for (var w = 0u; w < 8u; w++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let v = x[base + w * 4u + j] * id;
            let t = trunc(v);
            let q = i32(t + select(0.0, sign(v), abs(v - t) >= 0.5));
            sum += q;
            word |= (bitcast<u32>(q) & 0xFFu) << (8u * j);
        }
        out[b * 10u + w] = word;
    }
    out[b * 10u + 8u] = bitcast<u32>(f16r(d));
    out[b * 10u + 9u] = bitcast<u32>(f16r(f32(sum) * d));
}
