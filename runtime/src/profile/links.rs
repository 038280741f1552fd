//! Link measurement over the real transport: round-trip time from QUIC's
//! own estimate, bandwidth by timing a bulk transfer on a probe stream.

use std::time::{Duration, Instant};

use hearth_net::framed::{expect, read_message, write_message};
use hearth_net::{IncomingStream, NetError, PeerConn, stream_code};
use hearth_proto::{Message, limits, stream_kind};
use tokio::sync::mpsc;
use tracing::debug;

/// Bytes of one bandwidth probe: long enough to leave slow start on a LAN
/// (a 1 Gbit/s link carries it in about 17 ms), short enough to be
/// invisible when repeated every [`PROBE_PERIOD`].
pub const PROBE_BYTES: usize = 2 * 1024 * 1024;
/// How often each link is measured again.
pub const PROBE_PERIOD: Duration = Duration::from_secs(30);
/// Longest a probe may take (a very slow link reads as slow, not as hung).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes sent first to open the congestion window and measure the
/// per-message latency that the bulk time is corrected by.
const WARMUP_BYTES: usize = 64 * 1024;

/// Answers probe streams: every `ProbeData` is acknowledged with its size.
pub(crate) async fn serve(mut streams: mpsc::Receiver<IncomingStream>) {
    while let Some(mut s) = streams.recv().await {
        tokio::spawn(async move {
            let answer = async {
                // A probe frame: tag, u32 length, at most MAX_PROBE bytes.
                let max = limits::MAX_PROBE + 5;
                while let Some(msg) = read_message(&mut s.recv, max).await? {
                    let Message::ProbeData(data) = msg else {
                        return Err(NetError::Unexpected {
                            expected: "probe-data",
                            got: msg.name().into(),
                        });
                    };
                    let bytes = data.len() as u64;
                    write_message(&mut s.send, &Message::ProbeAck { bytes }).await?;
                }
                let _ = s.send.finish();
                Ok::<_, NetError>(())
            };
            match tokio::time::timeout(PROBE_TIMEOUT, answer).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(peer = %s.peer.node_id.short(), "bad probe stream: {e}");
                    let _ = s.recv.stop(stream_code::PROTOCOL_ERROR.into());
                }
                Err(_) => debug!(peer = %s.peer.node_id.short(), "probe stream timed out"),
            }
        });
    }
}

/// Sends one probe message and waits for its acknowledgement.
async fn round(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    bytes: usize,
) -> Result<Duration, NetError> {
    let start = Instant::now();
    write_message(send, &Message::ProbeData(vec![0x5A; bytes])).await?;
    let acked = expect(recv, limits::MAX_CONTROL_FRAME, "probe-ack", |m| match m {
        Message::ProbeAck { bytes } => Ok(bytes),
        m => Err(m),
    })
    .await?;
    if acked != bytes as u64 {
        return Err(NetError::Unexpected {
            expected: "an ack of the whole probe",
            got: format!("{acked} of {bytes} bytes"),
        });
    }
    Ok(start.elapsed())
}

/// Measures the link to `conn`: (round-trip time, bytes per second).
pub async fn measure_link(conn: &PeerConn, bytes: usize) -> Result<(Duration, f64), NetError> {
    // QUIC's estimate before the bulk data: afterwards it includes the
    // queueing delay the probe itself caused.
    let rtt = conn.rtt();
    let run = async {
        let (mut send, mut recv) = conn.open(stream_kind::PROBE).await?;
        let small = round(&mut send, &mut recv, WARMUP_BYTES.min(bytes)).await?;
        let bulk = round(&mut send, &mut recv, bytes).await?;
        let _ = send.finish();
        // The bulk round also pays one round trip and the per-message cost
        // the small one measured (less its own bytes at the bulk rate).
        let raw = bytes as f64 / bulk.as_secs_f64().max(1e-9);
        let fixed = small.as_secs_f64() - WARMUP_BYTES.min(bytes) as f64 / raw;
        let transfer = (bulk.as_secs_f64() - fixed.max(0.0)).max(bulk.as_secs_f64() / 4.0);
        Ok::<_, NetError>((rtt.min(conn.rtt()), bytes as f64 / transfer))
    };
    tokio::time::timeout(PROBE_TIMEOUT, run)
        .await
        .map_err(|_| NetError::Unexpected {
            expected: "a probe answer",
            got: format!("nothing within {PROBE_TIMEOUT:?}"),
        })?
}
