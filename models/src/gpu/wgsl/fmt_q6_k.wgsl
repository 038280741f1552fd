// GGUF Q6_K: 256 values in two halves of 128; 128 bytes of low nibbles,
// 64 bytes of high 2-bit pairs, 16 signed 8-bit scales (one per 16
// values), f16 d at byte 208; value d sc (q - 32). 210 bytes padded to
// 212.
const QK: u32 = 256u;
const BW: u32 = 53u;

fn bval(wb: u32, i: u32) -> f32 {
    let o = wb * 4u;
    let half = i / 128u;
    let pos = i % 128u;
    let quarter = pos / 32u;
    let l = pos % 32u;
    let qlb = wbyte(o + half * 64u + l + 32u * (quarter & 1u));
    let lo = select(qlb >> 4u, qlb & 0x0Fu, quarter < 2u);
    let hi = (wbyte(o + 128u + half * 32u + l) >> (2u * quarter)) & 3u;
    let sc = i8v(wbyte(o + 192u + half * 8u + l / 16u + 2u * quarter));
    return wf16(o + 208u) * sc * (f32(lo | (hi << 4u)) - 32.0);
}
