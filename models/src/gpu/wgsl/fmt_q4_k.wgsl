// GGUF Q4_K: 256 values in 8 sub-blocks of 32; f16 d, f16 dmin, 12 bytes
// of 6-bit sub-block scales and mins, 128 bytes of nibbles (each 32 bytes:
// low nibbles one sub-block, high the next); value d sc q - dmin m.
// 144 bytes.
const QK: u32 = 256u;
const BW: u32 = 36u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let chunk = i / 64u;
    let within = i % 64u;
    let sub = 2u * chunk + within / 32u;
    let byte = wbyte(o + 16u + chunk * 32u + within % 32u);
    let q = select(byte >> 4u, byte & 0x0Fu, within < 32u);
    let sm = scale_min(o + 4u, sub);
    return wf16(o) * sm.x * f32(q) - wf16(o + 2u) * sm.y;
}
