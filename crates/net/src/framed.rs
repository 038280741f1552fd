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

/// Once a frame has begun, its rest must arrive within this long plus
/// [`FRAME_SECS_PER_MIB`] per MiB of its length: a peer that starts a frame
/// and stops cannot hold the stream (and what arrived) for ever. Streams
/// may stay idle between frames.
pub const FRAME_BASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// See [`FRAME_BASE_TIMEOUT`]: 4 s per MiB (a 2 Mbit/s link).
pub const FRAME_SECS_PER_MIB: u64 = 4;
/// Bytes a frame's buffer grows by as they arrive (it is never sized from
/// the peer's length prefix alone).
const READ_CHUNK: usize = 64 * 1024;

/// Reads one message; `Ok(None)` when the peer finished the stream cleanly
/// between messages. Frames longer than `max` are refused from their
/// prefix; the buffer grows as bytes arrive, and a frame must be whole
/// within its deadline (see [`FRAME_BASE_TIMEOUT`]).
pub async fn read_message(recv: &mut RecvStream, max: usize) -> Result<Option<Message>, NetError> {
    read_message_within(recv, max, FRAME_BASE_TIMEOUT).await
}

/// [`read_message`] with another base deadline for a frame's rest.
pub async fn read_message_within(
    recv: &mut RecvStream,
    max: usize,
    base: std::time::Duration,
) -> Result<Option<Message>, NetError> {
    let mut prefix = [0u8; 5];
    // The first byte tells a clean end of stream from a truncated frame.
    match recv.read(&mut prefix[..1]).await {
        Ok(Some(0)) | Ok(None) => return Ok(None),
        Ok(Some(_)) => {}
        Err(e) => return Err(NetError::Read(e.to_string())),
    }
    let rest = async {
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
        let total = 4 + len;
        let mut frame = Vec::with_capacity(total.min(READ_CHUNK));
        frame.extend_from_slice(&prefix);
        // Read straight into the frame, growing it at most a chunk ahead of
        // what has arrived.
        while frame.len() < total {
            let at = frame.len();
            let end = (at + READ_CHUNK).min(total);
            frame.resize(end, 0);
            match recv.read(&mut frame[at..end]).await {
                Ok(Some(n)) if n > 0 => frame.truncate(at + n),
                Ok(_) => return Err(NetError::Read("the stream ended mid-frame".into())),
                Err(e) => return Err(NetError::Read(e.to_string())),
            }
        }
        Ok(frame)
    };
    // Allow the time of the largest frame this read accepts (memory grows
    // only with the bytes that arrive, so the deadline need not be tight).
    let deadline = base
        + std::time::Duration::from_secs(
            FRAME_SECS_PER_MIB * (max.min(limits::MAX_FRAME) as u64).div_ceil(1 << 20),
        );
    let frame = tokio::time::timeout(deadline, rest).await.map_err(|_| {
        NetError::Read(format!(
            "a frame was not whole within {} s",
            deadline.as_secs()
        ))
    })??;
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
