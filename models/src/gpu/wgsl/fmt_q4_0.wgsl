// GGUF Q4_0: f16 d, 16 bytes of nibbles (low: values 0..16, high:
// 16..32), value (q - 8) d; 18 bytes padded to 20.
const QK: u32 = 32u;
const BW: u32 = 5u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let byte = wbyte(o + 2u + i % 16u);
    let q = select(byte >> 4u, byte & 0x0Fu, i < 16u);
    return (f32(q) - 8.0) * wf16(o);
}
