// GGUF Q5_1: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles,
// value q d + m; 24 bytes.
const QK: u32 = 32u;
const BW: u32 = 6u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let byte = wbyte(o + 8u + i % 16u);
    let lo = select(byte >> 4u, byte & 0x0Fu, i < 16u);
    let hi = (wbyte(o + 4u + i / 8u) >> (i % 8u)) & 1u;
    return f32(lo | (hi << 4u)) * wf16(o) + wf16(o + 2u);
}
