//! Messages over QUIC streams: the `hearth-proto` frame codec on quinn's
//! send and receive halves, with the frame limit checked before the body is
//! read (so a peer cannot make us allocate more than the limit).

use hearth_proto::{Message, ProtoError, encode_frame, limits};
use quinn::{RecvStream, SendStream};

use crate::NetError;

/// Encodes and writes one message.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), NetError> {
    let bytes = encode_frame(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` when the peer finished the stream cleanly
/// between messages. Frames longer than `max` are refused from their prefix.
pub async fn read_message(recv: &mut RecvStream, max: usize) -> Result<Option<Message>, NetError> {
    let mut prefix = [0u8; 5];
    // The first byte tells a clean end of stream from a truncated frame.
    match recv.read(&mut prefix[..1]).await {
        Ok(Some(0)) | Ok(None) => return Ok(None),
        Ok(Some(_)) => {}
        Err(e) => return Err(NetError::Read(e.to_string())),
    }
    recv.read_exact(&mut prefix[1..])
        .await
        .map_err(|e| NetError::Read(e.to_string()))?;
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(ProtoError::EmptyFrame.into());
    }
    let max = max.min(limits::MAX_FRAME);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max }.into());
    }
    let mut frame = vec![0u8; 4 + len];
    frame[..5].copy_from_slice(&prefix);
    recv.read_exact(&mut frame[5..])
        .await
        .map_err(|e| NetError::Read(e.to_string()))?;
    match hearth_proto::decode_frame(&frame)? {
        Some((msg, _)) => Ok(Some(msg)),
        None => Err(NetError::Read("frame shorter than its prefix".into())),
    }
}

/// Reads one message and fails if the stream ended instead.
pub async fn expect_message(recv: &mut RecvStream, max: usize) -> Result<Message, NetError> {
    read_message(recv, max).await?.ok_or(NetError::Unexpected {
        expected: "a message",
        got: "end of stream".into(),
    })
}

/// Reads one message and hands it to `pick`, which returns the part wanted
/// or gives the message back; anything else (another message, the end of
/// the stream) is an error naming what was `expected`.
pub async fn expect<T>(
    recv: &mut RecvStream,
    max: usize,
    expected: &'static str,
    pick: impl FnOnce(Message) -> Result<T, Message>,
) -> Result<T, NetError> {
    pick(expect_message(recv, max).await?).map_err(|other| NetError::Unexpected {
        expected,
        got: other.name().to_string(),
    })
}
