// GGUF Q5_0: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles, value
// (q - 16) d; 22 bytes padded to 24.
const QK: u32 = 32u;
const BW: u32 = 6u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let byte = wbyte(o + 6u + i % 16u);
    let lo = select(byte >> 4u, byte & 0x0Fu, i < 16u);
    let hi = (wbyte(o + 2u + i / 8u) >> (i % 8u)) & 1u;
    return (f32(lo | (hi << 4u)) - 16.0) * wf16(o);
}
