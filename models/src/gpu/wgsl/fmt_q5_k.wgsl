// GGUF Q5_K: as Q4_K with a fifth bit per value: f16 d, f16 dmin, 12 bytes
// of scales and mins, 32 bytes of fifth bits (bit s of byte l: sub-block
// s's value l), 128 bytes of nibbles. 176 bytes.
const QK: u32 = 256u;
const BW: u32 = 44u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let chunk = i / 64u;
    let within = i % 64u;
    let sub = 2u * chunk + within / 32u;
    let l = within % 32u;
    let byte = wbyte(o + 48u + chunk * 32u + l);
    let lo = select(byte >> 4u, byte & 0x0Fu, within < 32u);
    let hi = (wbyte(o + 16u + l) >> sub) & 1u;
    let sm = scale_min(o + 4u, sub);
    return wf16(o) * sm.x * f32(lo | (hi << 4u)) - wf16(o + 2u) * sm.y;
}
