// Shared helpers, prepended to every kernel.

// The flat index of this invocation over a 2-D grid of 1-D workgroups
// (grids wider than 65535 workgroups spill into y).
fn flat(gid: vec3<u32>, nwg: vec3<u32>, wg: u32) -> u32 {
    return gid.x + gid.y * nwg.x * wg;
}

// A value rounded to f16 and back (llama.cpp stores block scales as f16).
fn f16r(v: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x;
}

// Dot product of four unsigned bytes (`u`) with four signed bytes (`s`).
fn dot4us(u: u32, s: u32) -> i32 {
    let si = bitcast<i32>(s);
    return i32(u & 0xFFu) * extractBits(si, 0u, 8u)
        + i32((u >> 8u) & 0xFFu) * extractBits(si, 8u, 8u)
        + i32((u >> 16u) & 0xFFu) * extractBits(si, 16u, 8u)
        + i32(u >> 24u) * extractBits(si, 24u, 8u);
}

// Dot product of four signed bytes with four signed bytes.
fn dot4ss(a: u32, b: u32) -> i32 {
    let ai = bitcast<i32>(a);
    let bi = bitcast<i32>(b);
    return extractBits(ai, 0u, 8u) * extractBits(bi, 0u, 8u)
        + extractBits(ai, 8u, 8u) * extractBits(bi, 8u, 8u)
        + extractBits(ai, 16u, 8u) * extractBits(bi, 16u, 8u)
        + extractBits(ai, 24u, 8u) * extractBits(bi, 24u, 8u);
}

// tanh, clamped where it is 1 in f32 anyway (some drivers overflow exp).
fn tanh_c(z: f32) -> f32 {
    return tanh(clamp(z, -15.0, 15.0));
}
