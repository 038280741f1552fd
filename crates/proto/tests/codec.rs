//! Round trips, fixed byte snapshots, and malformed input that must give a
//! typed error (never a panic, never an oversized allocation).

use hearth_proto::{
    Finish, Forward, FrameDecoder, GenerateRequest, Hello, Message, MicroKey, MicroLayout,
    PeerAddr, ProtoError, Refusal, SampledToken, SeqChunk, SeqParams, TensorFrame, TokenLogprobs,
    TrainMsg, WireDType, decode_frame, encode_frame, limits,
};
use proptest::prelude::*;

fn arb_tensor() -> impl Strategy<Value = TensorFrame> {
    (
        any::<u64>(),
        any::<u64>(),
        prop_oneof![
            Just(WireDType::F32),
            Just(WireDType::F16),
            Just(WireDType::BF16)
        ],
        prop::collection::vec(1u32..5, 0..4),
    )
        .prop_flat_map(|(s, q, dt, shape)| {
            let n: usize = shape.iter().map(|&d| d as usize).product::<usize>() * dt.size();
            prop::collection::vec(any::<u8>(), n).prop_map(move |data| TensorFrame {
                stream_id: s,
                seq_id: q,
                dtype: dt,
                shape: shape.clone(),
                data,
            })
        })
}

fn arb_params() -> impl Strategy<Value = SeqParams> {
    (
        (
            0f32..2.0,
            0.01f32..1.0,
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(any::<u32>(), 0..4),
        ),
        (
            -2f32..=2.0,
            -2f32..=2.0,
            prop::collection::vec((any::<u32>(), -100f32..=100.0), 0..6),
            prop::option::of(0u8..=20),
            prop::option::of(".{0,40}"),
            prop::collection::vec(any::<u32>(), 0..4),
            prop::collection::vec(any::<u32>(), 0..6),
            prop::option::of("[0-9a-f]{64}"),
        ),
    )
        .prop_map(
            |(
                (temperature, top_p, top_k, seed, max_tokens, stop_ids),
                (
                    presence_penalty,
                    frequency_penalty,
                    logit_bias,
                    logprobs,
                    grammar,
                    history,
                    score_prompt,
                    adapter,
                ),
            )| SeqParams {
                score_prompt,
                adapter,
                temperature,
                top_p,
                top_k,
                seed,
                max_tokens,
                stop_ids,
                presence_penalty,
                frequency_penalty,
                logit_bias,
                logprobs,
                grammar,
                history,
            },
        )
}

fn arb_logprobs() -> impl Strategy<Value = Option<TokenLogprobs>> {
    prop::option::of(
        (
            -50f32..=0.0,
            prop::collection::vec((any::<u32>(), -50f32..=0.0), 0..=20),
        )
            .prop_map(|(logprob, top)| TokenLogprobs { logprob, top }),
    )
}

fn arb_forward() -> impl Strategy<Value = Forward> {
    (
        any::<u64>(),
        prop::collection::vec(
            (
                any::<u64>(),
                any::<u32>(),
                1u32..4,
                prop::option::of(arb_params()),
            ),
            1..4,
        ),
        1u32..4,
    )
        .prop_map(|(placement, chunks, hidden)| {
            let chunks: Vec<SeqChunk> = chunks
                .into_iter()
                .map(|(seq, pos, len, params)| SeqChunk {
                    seq,
                    pos,
                    len,
                    params,
                })
                .collect();
            let n: u32 = chunks.iter().map(|c| c.len).sum();
            let values: Vec<f32> = (0..n * hidden).map(|i| i as f32 * 0.5).collect();
            Forward {
                placement,
                chunks,
                hidden: TensorFrame::from_f32(0, 0, vec![n, hidden], &values, WireDType::F32)
                    .unwrap(),
            }
        })
}

fn arb_finish() -> impl Strategy<Value = Finish> {
    prop_oneof![
        Just(Finish::No),
        Just(Finish::Stop),
        Just(Finish::Length),
        Just(Finish::Failed)
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<[u8; 32]>(), ".{0,40}", any::<u16>()).prop_map(
            |(v, id, name, port)| {
                Message::Hello(Hello {
                    version: v,
                    node_id: id,
                    name,
                    quic_port: port,
                })
            }
        ),
        (any::<u16>(), ".{0,60}")
            .prop_map(|(code, reason)| Message::Refuse(Refusal { code, reason })),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthProof { mac }),
        Just(Message::AuthOk),
        any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Message::HeartbeatAck { seq }),
        any::<u16>().prop_map(|kind| Message::Open { kind }),
        prop::collection::vec((any::<[u8; 32]>(), any::<std::net::SocketAddr>()), 0..5).prop_map(
            |v| {
                // Scope ids and flow labels are host-local and not carried.
                Message::Peers(
                    v.into_iter()
                        .map(|(node_id, a)| PeerAddr {
                            node_id,
                            addr: std::net::SocketAddr::new(a.ip(), a.port()),
                        })
                        .collect(),
                )
            }
        ),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::Profile),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::ProbeData),
        any::<u64>().prop_map(|bytes| Message::ProbeAck { bytes }),
        arb_tensor().prop_map(Message::Tensor),
        arb_forward().prop_map(Message::Forward),
        (
            any::<u64>(),
            prop::collection::vec(
                (
                    any::<u64>(),
                    any::<u32>(),
                    any::<u32>(),
                    arb_finish(),
                    arb_logprobs(),
                    prop::collection::vec(arb_logprobs(), 0..4)
                ),
                0..5
            )
        )
            .prop_map(|(placement, t)| Message::Sampled {
                placement,
                tokens: t
                    .into_iter()
                    .map(|(seq, pos, token, finish, logprobs, prompt)| SampledToken {
                        seq,
                        pos,
                        token,
                        finish,
                        logprobs,
                        prompt_logprobs: prompt.into_iter().flatten().collect(),
                    })
                    .collect(),
            }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..5))
            .prop_map(|(placement, seqs)| Message::EndSeqs { placement, seqs }),
        (
            any::<u64>(),
            prop::collection::vec(any::<u32>(), 0..8),
            arb_params()
        )
            .prop_map(|(placement, prompt, params)| Message::Generate(Box::new(
                GenerateRequest {
                    placement,
                    prompt,
                    params
                }
            ))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::Control),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(offset, data)| Message::FileChunk { offset, data }),
        arb_train().prop_map(|t| Message::Train(Box::new(t))),
    ]
}

fn arb_key() -> impl Strategy<Value = MicroKey> {
    (any::<u64>(), any::<u64>(), any::<u32>(), any::<u16>()).prop_map(
        |(job, step, micro, stage)| MicroKey {
            job,
            step,
            micro,
            stage,
        },
    )
}

fn arb_layout() -> impl Strategy<Value = MicroLayout> {
    (1u32..4, 1u32..4).prop_flat_map(|(rows, len)| {
        prop::collection::vec(0u32..3, (rows * len) as usize).prop_map(move |segments| {
            MicroLayout {
                rows,
                len,
                segments,
            }
        })
    })
}

fn arb_train() -> impl Strategy<Value = TrainMsg> {
    let f = -1e6f64..1e6;
    prop_oneof![
        (arb_key(), arb_layout()).prop_map(|(key, layout)| TrainMsg::Tokens {
            key,
            tokens: layout.segments.iter().map(|s| s * 7).collect(),
            layout,
        }),
        (
            arb_key(),
            any::<u64>(),
            prop::collection::vec(any::<u32>(), 0..8)
        )
            .prop_map(|(key, step_targets, labels)| TrainMsg::Labels {
                key,
                step_targets,
                labels
            }),
        (arb_key(), arb_layout(), arb_tensor()).prop_map(|(key, layout, hidden)| {
            TrainMsg::Activations {
                key,
                layout,
                hidden,
            }
        }),
        (arb_key(), arb_tensor()).prop_map(|(key, grad)| TrainMsg::Gradient { key, grad }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            "[a-z.]{0,30}",
            arb_tensor()
        )
            .prop_map(|(job, step, stage, name, grad)| TrainMsg::Tied {
                job,
                step,
                stage,
                name,
                grad
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            f.clone(),
            f.clone(),
            any::<u64>()
        )
            .prop_map(
                |(job, step, stage, sq_norm, loss_sum, targets)| TrainMsg::Report {
                    job,
                    step,
                    stage,
                    sq_norm,
                    loss_sum,
                    targets,
                    busy_s: sq_norm.abs()
                }
            ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            any::<bool>(),
            any::<bool>(),
            f.clone(),
            f
        )
            .prop_map(
                |(job, step, stage, apply, save, lr, grad_scale)| TrainMsg::Apply {
                    job,
                    step,
                    stage,
                    apply,
                    save,
                    lr,
                    grad_scale
                }
            ),
        (any::<u64>(), any::<u64>(), any::<u16>())
            .prop_map(|(job, step, stage)| TrainMsg::Applied { job, step, stage }),
        any::<u64>().prop_map(|job| TrainMsg::End { job }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..32),
            0u64..100
        )
            .prop_map(|(job, step, stage, data, extra)| TrainMsg::State {
                job,
                step,
                stage,
                offset: extra,
                total: extra + data.len() as u64 + extra,
                data
            }),
        (
            any::<u64>(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..32),
            0u64..100
        )
            .prop_map(|(job, stage, data, extra)| TrainMsg::Restore {
                job,
                stage,
                offset: extra,
                total: extra + data.len() as u64,
                data
            }),
        (any::<u64>(), any::<u16>(), ".{0,40}").prop_map(|(job, stage, reason)| TrainMsg::Failed {
            job,
            stage,
            reason
        }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in arb_message()) {
        let bytes = encode_frame(&msg).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn every_truncation_asks_for_more_bytes(msg in arb_message()) {
        let bytes = encode_frame(&msg).unwrap();
        for cut in 0..bytes.len() {
            prop_assert_eq!(decode_frame(&bytes[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame(&bytes);
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_message() {}
    }

    #[test]
    fn bit_flips_never_panic(msg in arb_message(), pos in any::<usize>(), bit in 0u8..8) {
        let mut bytes = encode_frame(&msg).unwrap();
        let i = pos % bytes.len();
        bytes[i] ^= 1 << bit;
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn stream_of_frames_decodes_in_any_chunking(
        msgs in prop::collection::vec(arb_message(), 1..6),
        chunk in 1usize..50,
    ) {
        let all: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        for c in all.chunks(chunk) {
            d.push(c);
            while let Some(m) = d.next_message().unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }
}

#[test]
fn fixed_byte_snapshots() {
    let hb = encode_frame(&Message::Heartbeat { seq: 0x0102 }).unwrap();
    assert_eq!(hb, [9, 0, 0, 0, 0x06, 0x02, 0x01, 0, 0, 0, 0, 0, 0]);
    let hello = encode_frame(&Message::Hello(Hello {
        version: 1,
        node_id: [0xAB; 32],
        name: "pi".into(),
        quic_port: 7000,
    }))
    .unwrap();
    let mut want = vec![1 + 2 + 32 + 2 + 2 + 2, 0, 0, 0, 0x01, 1, 0];
    want.extend([0xAB; 32]);
    want.extend([2, 0, b'p', b'i', 0x58, 0x1B]);
    assert_eq!(hello, want);
    let t = TensorFrame::from_f32(7, 9, vec![2], &[1.0, -2.0], WireDType::F32).unwrap();
    let bytes = encode_frame(&Message::Tensor(t)).unwrap();
    let mut want = vec![1 + 8 + 8 + 1 + 1 + 4 + 8, 0, 0, 0, 0x10];
    want.extend(7u64.to_le_bytes());
    want.extend(9u64.to_le_bytes());
    want.extend([0, 1, 2, 0, 0, 0]);
    want.extend(1.0f32.to_le_bytes());
    want.extend((-2.0f32).to_le_bytes());
    assert_eq!(bytes, want);
    let open = encode_frame(&Message::Open { kind: 1 }).unwrap();
    assert_eq!(open, [3, 0, 0, 0, 0x08, 1, 0]);
    let peers = encode_frame(&Message::Peers(vec![PeerAddr {
        node_id: [7; 32],
        addr: "10.0.0.2:7000".parse().unwrap(),
    }]))
    .unwrap();
    let mut want = vec![1 + 2 + 32 + 1 + 4 + 2, 0, 0, 0, 0x09, 1, 0];
    want.extend([7; 32]);
    want.extend([4, 10, 0, 0, 2, 0x58, 0x1B]);
    assert_eq!(peers, want);
    let profile = encode_frame(&Message::Profile(b"{}".to_vec())).unwrap();
    assert_eq!(profile, [7, 0, 0, 0, 0x0A, 2, 0, 0, 0, b'{', b'}']);
    let probe = encode_frame(&Message::ProbeData(vec![9; 3])).unwrap();
    assert_eq!(probe, [8, 0, 0, 0, 0x0B, 3, 0, 0, 0, 9, 9, 9]);
    let ack = encode_frame(&Message::ProbeAck { bytes: 3 }).unwrap();
    assert_eq!(ack, [9, 0, 0, 0, 0x0C, 3, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn typed_errors_for_bad_frames() {
    // Unknown tag.
    assert_eq!(
        decode_frame(&[1, 0, 0, 0, 0x7F]),
        Err(ProtoError::UnknownTag(0x7F))
    );
    // Zero length.
    assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(ProtoError::EmptyFrame));
    // Oversize is refused from the prefix alone, before the body arrives.
    let huge = (limits::MAX_FRAME as u32 + 1).to_le_bytes();
    assert!(matches!(
        decode_frame(&huge),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    // A control message may not use the tensor limit.
    let big_ctl = ((limits::MAX_CONTROL_FRAME + 1) as u32).to_le_bytes();
    let mut b = big_ctl.to_vec();
    b.push(0x06);
    assert!(matches!(
        decode_frame(&b),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    // Trailing bytes in a fixed-size message.
    assert!(matches!(
        decode_frame(&[10, 0, 0, 0, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
        Err(ProtoError::TrailingBytes { .. })
    ));
    // Short body.
    assert!(matches!(
        decode_frame(&[3, 0, 0, 0, 0x06, 1, 2]),
        Err(ProtoError::Truncated { .. })
    ));
    // Bad UTF-8 in a string.
    let mut bad = vec![1 + 2 + 2, 0, 0, 0, 0x02, 0, 0, 2, 0];
    bad[0] += 2;
    bad.extend([0xFF, 0xFE]);
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::BadUtf8 { .. })
    ));
    // Tensor whose data does not match its shape; unknown dtype; too many dims.
    let t = TensorFrame {
        stream_id: 0,
        seq_id: 0,
        dtype: WireDType::F32,
        shape: vec![3],
        data: vec![0; 8],
    };
    assert!(matches!(
        encode_frame(&Message::Tensor(t)),
        Err(ProtoError::TensorSize { .. })
    ));
    let mut body = vec![0x10];
    body.extend([0u8; 16]);
    body.extend([9, 0]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(&body);
    assert_eq!(decode_frame(&f), Err(ProtoError::UnknownDType(9)));
    let mut body = vec![0x10];
    body.extend([0u8; 16]);
    body.extend([0, 200]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(&body);
    assert!(matches!(
        decode_frame(&f),
        Err(ProtoError::TooManyDims { .. })
    ));
    // Shape whose byte count overflows.
    let mut body = vec![0x10];
    body.extend([0u8; 16]);
    body.extend([0, 3]);
    for _ in 0..3 {
        body.extend(u32::MAX.to_le_bytes());
    }
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(&body);
    assert!(matches!(
        decode_frame(&f),
        Err(ProtoError::TensorSize { .. })
    ));
    // Strings over the limit are refused on send.
    let long = Message::Refuse(Refusal {
        code: 1,
        reason: "x".repeat(limits::MAX_STRING + 1),
    });
    assert!(matches!(
        encode_frame(&long),
        Err(ProtoError::StringTooLong { .. })
    ));
    // Tensors over the frame limit are refused on send.
    let n = limits::MAX_FRAME / 4 + 1;
    let t = TensorFrame {
        stream_id: 0,
        seq_id: 0,
        dtype: WireDType::F32,
        shape: vec![n as u32],
        data: vec![0; n * 4],
    };
    assert!(matches!(
        encode_frame(&Message::Tensor(t)),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn peers_are_bounded_and_checked() {
    let too_many = Message::Peers(vec![
        PeerAddr {
            node_id: [0; 32],
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        limits::MAX_PEERS + 1
    ]);
    assert!(matches!(
        encode_frame(&too_many),
        Err(ProtoError::InvalidField { .. })
    ));
    // A count over the limit is refused before reading entries.
    assert!(matches!(
        decode_frame(&[3, 0, 0, 0, 0x09, 0xFF, 0xFF]),
        Err(ProtoError::InvalidField { .. })
    ));
    // Unknown address family.
    let mut body = vec![0x09, 1, 0];
    body.extend([0u8; 32]);
    body.extend([5, 1, 2, 3, 4, 0, 0]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(&body);
    assert!(matches!(
        decode_frame(&f),
        Err(ProtoError::InvalidField { .. })
    ));
    // A profile over its limit is refused on send and, from its length
    // field, on receive; a blob claiming more bytes than the frame holds is
    // truncated, not read past the end.
    let big = Message::Profile(vec![b' '; limits::MAX_PROFILE + 1]);
    assert!(encode_frame(&big).is_err());
    let claim = ((limits::MAX_PROFILE + 1) as u32).to_le_bytes();
    let mut f = vec![5, 0, 0, 0, 0x0A];
    f.extend(claim);
    assert!(matches!(
        decode_frame(&f),
        Err(ProtoError::InvalidField { .. })
    ));
    assert!(matches!(
        decode_frame(&[7, 0, 0, 0, 0x0A, 9, 0, 0, 0, b'{', b'}']),
        Err(ProtoError::Truncated { .. })
    ));
    // Probe data may use the bulk limit, a profile may not.
    let probe = Message::ProbeData(vec![0; limits::MAX_CONTROL_FRAME * 2]);
    assert!(encode_frame(&probe).is_ok());
    let too_big = Message::ProbeData(vec![0; limits::MAX_PROBE + 1]);
    assert!(encode_frame(&too_big).is_err());
}

#[test]
fn wire_dtypes_convert() {
    let vals = [0.0f32, 1.5, -3.25, 1e-3, 65504.0];
    for dt in [WireDType::F32, WireDType::F16, WireDType::BF16] {
        let t = TensorFrame::from_f32(1, 2, vec![5], &vals, dt).unwrap();
        assert_eq!(t.data.len(), 5 * dt.size());
        let back = t.to_f32();
        for (a, b) in vals.iter().zip(&back) {
            let tol = match dt {
                WireDType::F32 => 0.0,
                WireDType::F16 => 1e-3 * a.abs().max(1.0),
                WireDType::BF16 => 1e-2 * a.abs().max(1.0),
            };
            assert!((a - b).abs() <= tol, "{dt:?}: {a} vs {b}");
        }
    }
    assert!(TensorFrame::from_f32(0, 0, vec![2, 2], &[1.0; 3], WireDType::F32).is_err());
}

fn params() -> SeqParams {
    SeqParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 1,
        max_tokens: 4,
        stop_ids: vec![2],
        ..SeqParams::default()
    }
}

#[test]
fn pipeline_snapshots() {
    let sampled = encode_frame(&Message::Sampled {
        placement: 5,
        tokens: vec![SampledToken {
            seq: 9,
            pos: 3,
            token: 42,
            finish: Finish::Length,
            logprobs: None,
            prompt_logprobs: Vec::new(),
        }],
    })
    .unwrap();
    let mut want = vec![1 + 8 + 4 + 8 + 4 + 4 + 1 + 1 + 4, 0, 0, 0, 0x12];
    want.extend(5u64.to_le_bytes());
    want.extend(1u32.to_le_bytes());
    want.extend(9u64.to_le_bytes());
    want.extend(3u32.to_le_bytes());
    want.extend(42u32.to_le_bytes());
    want.push(2);
    want.push(0);
    want.extend(0u32.to_le_bytes());
    assert_eq!(sampled, want);
    let end = encode_frame(&Message::EndSeqs {
        placement: 1,
        seqs: vec![7],
    })
    .unwrap();
    let mut want = vec![1 + 8 + 4 + 8, 0, 0, 0, 0x13];
    want.extend(1u64.to_le_bytes());
    want.extend(1u32.to_le_bytes());
    want.extend(7u64.to_le_bytes());
    assert_eq!(end, want);
    let control = encode_frame(&Message::Control(b"{}".to_vec())).unwrap();
    assert_eq!(control, [7, 0, 0, 0, 0x15, 2, 0, 0, 0, b'{', b'}']);
    let chunk = encode_frame(&Message::FileChunk {
        offset: 2,
        data: vec![9],
    })
    .unwrap();
    let mut want = vec![1 + 8 + 4 + 1, 0, 0, 0, 0x16];
    want.extend(2u64.to_le_bytes());
    want.extend(1u32.to_le_bytes());
    want.push(9);
    assert_eq!(chunk, want);
    // Messages of the large-frame class round-trip at their own limits.
    for big in [
        Message::FileChunk {
            offset: 7,
            data: vec![3; limits::MAX_FILE_CHUNK],
        },
        Message::Control(vec![b' '; limits::MAX_CONTROL_DOC]),
    ] {
        let bytes = encode_frame(&big).unwrap();
        assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, big);
    }
    // A chunk over the limit is refused on both sides.
    assert!(
        encode_frame(&Message::FileChunk {
            offset: 0,
            data: vec![0; limits::MAX_FILE_CHUNK + 1],
        })
        .is_err()
    );
    let mut big = vec![0, 0, 0, 0, 0x16];
    big.extend(0u64.to_le_bytes());
    big.extend(((limits::MAX_FILE_CHUNK + 1) as u32).to_le_bytes());
    let n = (big.len() - 4) as u32;
    big[..4].copy_from_slice(&n.to_le_bytes());
    assert!(matches!(
        decode_frame(&big),
        Err(ProtoError::InvalidField {
            what: "file-chunk",
            ..
        })
    ));
}

/// Encodes a message's body with `edit` applied to it, as a frame.
fn frame_with(msg: &Message, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = encode_frame(msg).unwrap();
    let mut body = f.split_off(4);
    edit(&mut body);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend(body);
    out
}

#[test]
fn malformed_train_messages_are_typed_errors() {
    let key = MicroKey {
        job: 1,
        step: 2,
        micro: 3,
        stage: 0,
    };
    let layout = MicroLayout {
        rows: 1,
        len: 2,
        segments: vec![1, 1],
    };
    // Tokens that do not fill the layout.
    let msg = Message::Train(Box::new(TrainMsg::Tokens {
        key,
        layout: layout.clone(),
        tokens: vec![5],
    }));
    let bytes = encode_frame(&msg).unwrap();
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtoError::InvalidField { what: "tokens", .. })
    ));
    // A layout whose segments do not fill rows × len.
    let msg = Message::Train(Box::new(TrainMsg::Activations {
        key,
        layout: MicroLayout {
            rows: 2,
            len: 2,
            segments: vec![1, 1],
        },
        hidden: TensorFrame::from_f32(0, 0, vec![1], &[1.0], WireDType::F32).unwrap(),
    }));
    let bytes = encode_frame(&msg).unwrap();
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtoError::InvalidField { what: "layout", .. })
    ));
    // A non-finite learning rate.
    let msg = Message::Train(Box::new(TrainMsg::Apply {
        job: 1,
        step: 1,
        stage: 0,
        apply: true,
        save: false,
        lr: f64::NAN,
        grad_scale: 1.0,
    }));
    let bytes = encode_frame(&msg).unwrap();
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtoError::InvalidField { what: "lr", .. })
    ));
    // A state chunk that runs past its total.
    let msg = Message::Train(Box::new(TrainMsg::State {
        job: 1,
        step: 1,
        stage: 0,
        offset: 10,
        total: 12,
        data: vec![0; 4],
    }));
    let bytes = encode_frame(&msg).unwrap();
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtoError::InvalidField { what: "state", .. })
    ));
    // A restore chunk that runs past its total, and one whose total is over the limit.
    for (offset, total) in [(10, 12), (0, u64::MAX)] {
        let msg = Message::Train(Box::new(TrainMsg::Restore {
            job: 1,
            stage: 0,
            offset,
            total,
            data: vec![0; 4],
        }));
        let bytes = encode_frame(&msg).unwrap();
        assert!(
            matches!(decode_frame(&bytes), Err(ProtoError::InvalidField { .. })),
            "{offset} {total}"
        );
    }
    // A segment count over the limit, claimed without the bytes behind it.
    let ok = Message::Train(Box::new(TrainMsg::Tokens {
        key,
        layout,
        tokens: vec![5, 6],
    }));
    let frame = frame_with(&ok, |b| {
        // tag, sub-tag, key (22: job, step, micro, stage), rows, len, then
        // the segment count.
        b[1 + 1 + 22 + 8..1 + 1 + 22 + 12].copy_from_slice(&(u32::MAX).to_le_bytes());
    });
    assert!(matches!(
        decode_frame(&frame),
        Err(ProtoError::InvalidField {
            what: "segments",
            ..
        })
    ));
    // An unknown sub-tag.
    let frame = frame_with(&ok, |b| b[1] = 200);
    assert!(matches!(
        decode_frame(&frame),
        Err(ProtoError::InvalidField {
            what: "train tag",
            ..
        })
    ));
}

#[test]
fn malformed_pipeline_messages_are_typed_errors() {
    let fwd = Message::Forward(Forward {
        placement: 1,
        chunks: vec![SeqChunk {
            seq: 1,
            pos: 0,
            len: 2,
            params: Some(params()),
        }],
        hidden: TensorFrame::from_f32(0, 0, vec![2, 1], &[1.0, 2.0], WireDType::F32).unwrap(),
    });
    let bytes = encode_frame(&fwd).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, fwd);
    // Hidden rows that do not match the chunks' token count.
    let bad_rows = Message::Forward(Forward {
        placement: 1,
        chunks: vec![SeqChunk {
            seq: 1,
            pos: 0,
            len: 3,
            params: None,
        }],
        hidden: TensorFrame::from_f32(0, 0, vec![2, 1], &[1.0, 2.0], WireDType::F32).unwrap(),
    });
    let bytes = encode_frame(&bad_rows).unwrap();
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtoError::InvalidField {
            what: "forward hidden states",
            ..
        })
    ));
    // A chunk count beyond the limit is refused before reading the chunks.
    let huge = frame_with(&fwd, |b| {
        b[9..13].copy_from_slice(&(limits::MAX_BATCH_SEQS as u32 + 1).to_le_bytes())
    });
    assert!(matches!(
        decode_frame(&huge),
        Err(ProtoError::InvalidField { what: "chunks", .. })
    ));
    // A bad params flag.
    let flag = frame_with(&fwd, |b| b[13 + 16] = 7);
    assert!(matches!(
        decode_frame(&flag),
        Err(ProtoError::InvalidField {
            what: "chunk params flag",
            ..
        })
    ));
    // A NaN temperature is refused on both sides.
    let mut p = params();
    p.temperature = f32::NAN;
    let gen_req = Message::Generate(Box::new(GenerateRequest {
        placement: 1,
        prompt: vec![1, 2],
        params: p,
    }));
    assert!(encode_frame(&gen_req).is_err());
    let ok = Message::Generate(Box::new(GenerateRequest {
        placement: 1,
        prompt: vec![1, 2],
        params: params(),
    }));
    let nan = frame_with(&ok, |b| {
        let at = 1 + 8 + 4 + 8;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes())
    });
    assert!(matches!(
        decode_frame(&nan),
        Err(ProtoError::InvalidField {
            what: "temperature",
            ..
        })
    ));
    // A prompt that claims more tokens than it carries, or more than the limit.
    let short = frame_with(&ok, |b| b[9..13].copy_from_slice(&1000u32.to_le_bytes()));
    assert!(matches!(
        decode_frame(&short),
        Err(ProtoError::Truncated { .. })
    ));
    let long = frame_with(&ok, |b| {
        b[9..13].copy_from_slice(&(limits::MAX_PROMPT_TOKENS as u32 + 1).to_le_bytes())
    });
    assert!(matches!(
        decode_frame(&long),
        Err(ProtoError::InvalidField { what: "prompt", .. })
    ));
    // An unknown finish code.
    let s = Message::Sampled {
        placement: 0,
        tokens: vec![SampledToken {
            seq: 1,
            pos: 1,
            token: 1,
            finish: Finish::No,
            logprobs: None,
            prompt_logprobs: Vec::new(),
        }],
    };
    let bad = frame_with(&s, |b| {
        let last = b.len() - 6;
        b[last] = 9
    });
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::InvalidField { what: "finish", .. })
    ));
    hostile_sampling_fields_are_refused();
    // Too many stop ids on encode.
    let mut p = params();
    p.stop_ids = vec![0; limits::MAX_STOP_IDS + 1];
    assert!(
        encode_frame(&Message::Generate(Box::new(GenerateRequest {
            placement: 1,
            prompt: vec![1],
            params: p,
        })))
        .is_err()
    );
}

/// Well-formed frames whose sampling fields are out of range, too long or
/// inconsistent: each is a typed error on decode (and refused on encode).
fn hostile_sampling_fields_are_refused() {
    let generate = |p: SeqParams| {
        Message::Generate(Box::new(GenerateRequest {
            placement: 1,
            prompt: vec![1],
            params: p,
        }))
    };
    // The tail of an encoded `Generate` with default extras: penalties (8),
    // bias count (4), logprobs flag (1), grammar flag (1), history count (4),
    // scored prompt count (4), adapter flag (1).
    let ok = encode_frame(&generate(params())).unwrap();
    let tail = ok.len() - 23;
    for (edit, what) in [
        (
            Box::new(|b: &mut Vec<u8>| b[tail..tail + 4].copy_from_slice(&2.5f32.to_le_bytes()))
                as Box<dyn Fn(&mut Vec<u8>)>,
            "presence_penalty",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 4..tail + 8].copy_from_slice(&f32::NAN.to_le_bytes())
            }),
            "frequency_penalty",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 8..tail + 12]
                    .copy_from_slice(&(limits::MAX_LOGIT_BIAS as u32 + 1).to_le_bytes())
            }),
            "logit bias",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                // A count the bytes do not back.
                b[tail + 8..tail + 12].copy_from_slice(&5u32.to_le_bytes())
            }),
            "logit bias",
        ),
        (
            Box::new(|b: &mut Vec<u8>| b[tail + 12] = 7),
            "logprobs flag",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 12] = 1;
                b.insert(tail + 13, 21);
                let len = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
            }),
            "top logprobs",
        ),
        (Box::new(|b: &mut Vec<u8>| b[tail + 13] = 2), "grammar flag"),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 13] = 1;
                let over = (limits::MAX_GRAMMAR as u32 + 1).to_le_bytes();
                b.splice(tail + 14..tail + 14, over);
                let len = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
            }),
            "grammar",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 14..tail + 18]
                    .copy_from_slice(&(limits::MAX_PROMPT_TOKENS as u32 + 1).to_le_bytes())
            }),
            "history",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                b[tail + 18..tail + 22]
                    .copy_from_slice(&(limits::MAX_SCORED_PROMPT as u32 + 1).to_le_bytes())
            }),
            "scored prompt",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                // A count the bytes do not back.
                b[tail + 18..tail + 22].copy_from_slice(&3u32.to_le_bytes())
            }),
            "scored prompt",
        ),
        (Box::new(|b: &mut Vec<u8>| b[tail + 22] = 2), "adapter flag"),
        (
            Box::new(|b: &mut Vec<u8>| {
                // An id cut short.
                b[tail + 22] = 1;
                b.extend_from_slice(b"00ff");
                let len = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
            }),
            "adapter",
        ),
        (
            Box::new(|b: &mut Vec<u8>| {
                // 64 characters, but not lower-case hex: a path, say.
                b[tail + 22] = 1;
                b.extend_from_slice(&[b'/'; 64]);
                let len = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
            }),
            "adapter",
        ),
    ] {
        let mut bad = ok.clone();
        edit(&mut bad);
        match decode_frame(&bad) {
            Err(ProtoError::InvalidField { what: w, .. }) => assert_eq!(w, what),
            Err(ProtoError::Truncated { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    // A grammar that is not UTF-8.
    let mut p = params();
    p.grammar = Some("ab".into());
    let mut bad = encode_frame(&generate(p)).unwrap();
    let last = bad.len() - 10;
    bad[last] = 0xff;
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::BadUtf8 { what: "grammar" })
    ));
    // Out of range on encode too.
    for p in [
        SeqParams {
            logit_bias: vec![(1, 101.0)],
            ..params()
        },
        SeqParams {
            logit_bias: vec![(1, 0.0); limits::MAX_LOGIT_BIAS + 1],
            ..params()
        },
        SeqParams {
            presence_penalty: -3.0,
            ..params()
        },
        SeqParams {
            logprobs: Some(21),
            ..params()
        },
        SeqParams {
            grammar: Some("x".repeat(limits::MAX_GRAMMAR + 1)),
            ..params()
        },
    ] {
        assert!(encode_frame(&generate(p)).is_err());
    }
    // A sampled token's log-probability must be one, and its alternatives
    // bounded.
    let sampled = |lp: TokenLogprobs| Message::Sampled {
        placement: 0,
        tokens: vec![SampledToken {
            seq: 1,
            pos: 1,
            token: 1,
            finish: Finish::No,
            logprobs: Some(lp),
            prompt_logprobs: Vec::new(),
        }],
    };
    for lp in [
        TokenLogprobs {
            logprob: 0.5,
            top: vec![],
        },
        TokenLogprobs {
            logprob: -1.0,
            top: vec![(1, f32::NAN)],
        },
        TokenLogprobs {
            logprob: -1.0,
            top: vec![(1, -1.0); limits::MAX_TOP_LOGPROBS + 1],
        },
    ] {
        assert!(encode_frame(&sampled(lp)).is_err());
    }
    let good = sampled(TokenLogprobs {
        logprob: f32::NEG_INFINITY,
        top: vec![(3, -0.5)],
    });
    let bytes = encode_frame(&good).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, good);
    // A positive log-probability planted in the frame.
    let mut bad = bytes.clone();
    let at = bad.len() - 8;
    bad[at..at + 4].copy_from_slice(&0.25f32.to_le_bytes());
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::InvalidField {
            what: "logprob",
            ..
        })
    ));
    let mut bad = bytes;
    let at = bad.len() - 13;
    bad[at] = limits::MAX_TOP_LOGPROBS as u8 + 1;
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::InvalidField {
            what: "top logprobs",
            ..
        })
    ));
}

#[test]
fn large_state_chunk_round_trips() {
    let msg = Message::Train(Box::new(TrainMsg::State {
        job: 2,
        step: 1,
        stage: 1,
        offset: 0,
        total: 330_312,
        data: vec![7; 330_312],
    }));
    let bytes = encode_frame(&msg).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, msg);
}

/// A sampled token's prompt log-probabilities: bounded in count, each one a
/// log-probability with bounded alternatives, and a count the bytes do not
/// back is a typed error, not an allocation.
#[test]
fn hostile_prompt_logprobs_are_refused() {
    let sampled = |prompt: Vec<TokenLogprobs>| Message::Sampled {
        placement: 0,
        tokens: vec![SampledToken {
            seq: 1,
            pos: 1,
            token: 1,
            finish: Finish::No,
            logprobs: None,
            prompt_logprobs: prompt,
        }],
    };
    let one = TokenLogprobs {
        logprob: -1.5,
        top: vec![(7, -0.25), (9, -2.0)],
    };
    let good = sampled(vec![one.clone(), one.clone()]);
    let bytes = encode_frame(&good).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, good);
    // Over the limit on encode.
    assert!(encode_frame(&sampled(vec![one.clone(); limits::MAX_SCORED_PROMPT + 1])).is_err());
    for bad in [
        TokenLogprobs {
            logprob: 0.5,
            top: vec![],
        },
        TokenLogprobs {
            logprob: -1.0,
            top: vec![(1, -1.0); limits::MAX_TOP_LOGPROBS + 1],
        },
    ] {
        assert!(encode_frame(&sampled(vec![bad])).is_err());
    }
    // The count sits after the token's logprobs flag: 8 + 4 + 8 + 4 + 4 +
    // 1 + 1 bytes into the body, after the frame's length and tag.
    let at = 4 + 1 + 8 + 4 + 8 + 4 + 4 + 1 + 1;
    for (count, what) in [
        (limits::MAX_SCORED_PROMPT as u32 + 1, "prompt logprobs"),
        (u32::MAX, "prompt logprobs"),
        (3, "logprob"),
    ] {
        let mut bad = bytes.clone();
        bad[at..at + 4].copy_from_slice(&count.to_le_bytes());
        match decode_frame(&bad) {
            Err(ProtoError::InvalidField { what: w, .. }) => assert_eq!(w, what),
            Err(ProtoError::Truncated { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{count}: {other:?}"),
        }
    }
    // A positive log-probability planted in the second entry.
    let mut bad = bytes.clone();
    let second = at + 4 + (4 + 1 + 2 * 8);
    bad[second..second + 4].copy_from_slice(&0.25f32.to_le_bytes());
    assert!(matches!(
        decode_frame(&bad),
        Err(ProtoError::InvalidField {
            what: "logprob",
            ..
        })
    ));
}
