//! Frame encoding and (incremental) decoding.

use crate::message::Message;
use crate::{ProtoError, limits};

/// Bytes of the length prefix.
const PREFIX: usize = 4;

/// The limit that applies to a frame with this tag.
fn limit_for(tag: u8) -> usize {
    use crate::message::{
        TAG_CONTROL, TAG_FILE_CHUNK, TAG_FORWARD, TAG_GENERATE, TAG_PROBE_DATA, TAG_SAMPLED,
        TAG_TENSOR, TAG_TRAIN,
    };
    if matches!(
        tag,
        TAG_TENSOR
            | TAG_PROBE_DATA
            | TAG_FORWARD
            | TAG_GENERATE
            | TAG_SAMPLED
            | TAG_CONTROL
            | TAG_FILE_CHUNK
            | TAG_TRAIN
    ) {
        limits::MAX_FRAME
    } else {
        limits::MAX_CONTROL_FRAME
    }
}

/// Encodes `msg` as one frame, checking the limits first.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut body = Vec::new();
    let tag = msg.encode_body(&mut body)?;
    let len = 1 + body.len();
    let max = limit_for(tag);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    let mut out = Vec::with_capacity(PREFIX + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(tag);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one frame from the front of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((msg, used)))`: a message and
/// how many bytes it took. An oversize length is rejected as soon as the
/// prefix and tag are seen, before waiting for (or allocating) the body.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len > limits::MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: limits::MAX_FRAME,
        });
    }
    let Some(&tag) = buf.get(PREFIX) else {
        return Ok(None);
    };
    let max = limit_for(tag);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    if buf.len() < PREFIX + len {
        return Ok(None);
    }
    let msg = Message::decode_body(tag, &buf[PREFIX + 1..PREFIX + len])?;
    Ok(Some((msg, PREFIX + len)))
}

/// Accumulates bytes from a stream and yields whole messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived. After an error the
    /// stream is unusable: the caller closes the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtoError> {
        match decode_frame(&self.buf)? {
            None => Ok(None),
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
