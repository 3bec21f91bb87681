//! The node-to-node request-response protocol `/swarmllm/rpc/1`.
//!
//! Every message is one frame: `u32` big-endian length, then that many bytes:
//! a version byte ([`WIRE_VERSION`]), a kind byte, and the kind's payload. Frames over
//! [`MAX_FRAME`] are refused without reading them. A request that cannot be decoded is
//! not an I/O error: it becomes [`Request::Invalid`], which the node answers with an
//! [`Response::Error`] frame and counts against the sending peer.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/swarmllm/rpc/1");
/// Wire format version carried in every frame.
pub const WIRE_VERSION: u8 = 1;
/// Largest frame accepted, in bytes (after the length prefix).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

const KIND_ECHO: u8 = 0x01;
const KIND_GET_PEERS: u8 = 0x02;
const KIND_ACTIVATION: u8 = 0x10;
const KIND_FETCH: u8 = 0x11;
const KIND_CREDIT: u8 = 0x12;
const KIND_CREDIT_REPLY: u8 = 0x92;
const KIND_CHUNK: u8 = 0x91;
const KIND_PEERS: u8 = 0x82;
const KIND_ACTIVATION_RESULT: u8 = 0x90;
const KIND_ERROR: u8 = 0x7f;

/// A peer as shared in peer exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerHint {
    /// Hex node id.
    pub node_id: String,
    /// Multiaddrs the peer was reached at or announced.
    pub addrs: Vec<String>,
}

/// A request frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Answer with the same bytes (liveness and round-trip benchmarks).
    Echo(Vec<u8>),
    /// Answer with the peers you know.
    GetPeers,
    /// One pipeline step (`pipeline::wire::StepRequest` bytes), answered with
    /// [`Response::Activation`] or an error.
    Activation(Vec<u8>),
    /// A piece of a model file this peer holds, answered with [`Response::Chunk`].
    Fetch(FetchRequest),
    /// A credit-ledger message (`credits` JSON), answered with
    /// [`Response::Credit`] or an error.
    Credit(Vec<u8>),
    /// Bytes written to the stream exactly as given, unframed (tests of malformed
    /// input; never sent by the node itself).
    #[cfg(feature = "test-hooks")]
    Raw(Vec<u8>),
    /// A received request that could not be decoded (never sent).
    Invalid(String),
}

/// A response frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// The echoed bytes.
    Echo(Vec<u8>),
    /// Known peers.
    Peers(Vec<PeerHint>),
    /// The sealed result of a pipeline step (`pipeline::wire::StepResult` bytes).
    Activation(Vec<u8>),
    /// The bytes asked for by [`Request::Fetch`] (fewer at the end of the file).
    Chunk(Vec<u8>),
    /// The answer to [`Request::Credit`].
    Credit(Vec<u8>),
    /// The request was refused.
    Error {
        /// HTTP-like status (400 malformed, 404 unknown kind, 500 internal).
        code: u16,
        /// Why.
        message: String,
    },
}

/// Which bytes of which model file to send.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FetchRequest {
    /// Model id.
    pub model_id: String,
    /// `manifest.json`, `gguf_header.bin` or a shard file named in the manifest.
    pub file: String,
    /// First byte.
    pub offset: u64,
    /// Bytes wanted (at most [`MAX_CHUNK`]).
    pub len: u32,
}

/// Largest chunk a fetch may ask for.
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    code: u16,
    message: String,
}

/// The codec for [`PROTOCOL`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

/// Reads one frame: `Ok(Err(reason))` when it is malformed but the stream is intact
/// enough to answer.
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> std::io::Result<Result<(u8, Vec<u8>), String>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Ok(Err(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte cap"
        )));
    }
    if len < 2 {
        return Ok(Err(format!(
            "frame of {len} bytes is shorter than its header"
        )));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    if buf[0] != WIRE_VERSION {
        return Ok(Err(format!("unsupported wire version {}", buf[0])));
    }
    let kind = buf[1];
    buf.drain(..2);
    Ok(Ok((kind, buf)))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = payload.len() + 2;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte cap"),
        ));
    }
    // One write: on a multiplexed, encrypted stream every write becomes a frame
    // (and with TCP_NODELAY a packet) of its own.
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.extend_from_slice(&[WIRE_VERSION, kind]);
    frame.extend_from_slice(payload);
    io.write_all(&frame).await?;
    io.flush().await
}

/// Decodes a request frame's body.
pub fn decode_request(kind: u8, payload: Vec<u8>) -> Request {
    match kind {
        KIND_ECHO => Request::Echo(payload),
        KIND_GET_PEERS if payload.is_empty() => Request::GetPeers,
        KIND_GET_PEERS => Request::Invalid("GetPeers carries no payload".into()),
        KIND_ACTIVATION => Request::Activation(payload),
        KIND_CREDIT => Request::Credit(payload),
        KIND_FETCH => match serde_json::from_slice::<FetchRequest>(&payload) {
            Ok(f) if f.len <= MAX_CHUNK => Request::Fetch(f),
            Ok(f) => Request::Invalid(format!("a fetch of {} bytes (max {MAX_CHUNK})", f.len)),
            Err(e) => Request::Invalid(format!("malformed fetch: {e}")),
        },
        other => Request::Invalid(format!("unknown request kind 0x{other:02x}")),
    }
}

fn invalid_data(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(match read_frame(io).await? {
            Ok((kind, payload)) => decode_request(kind, payload),
            Err(reason) => Request::Invalid(reason),
        })
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let (kind, payload) = read_frame(io).await?.map_err(invalid_data)?;
        match kind {
            KIND_ECHO => Ok(Response::Echo(payload)),
            KIND_ACTIVATION_RESULT => Ok(Response::Activation(payload)),
            KIND_CHUNK => Ok(Response::Chunk(payload)),
            KIND_CREDIT_REPLY => Ok(Response::Credit(payload)),
            KIND_PEERS => serde_json::from_slice(&payload)
                .map(Response::Peers)
                .map_err(|e| invalid_data(e.to_string())),
            KIND_ERROR => serde_json::from_slice::<ErrorBody>(&payload)
                .map(|e| Response::Error {
                    code: e.code,
                    message: e.message,
                })
                .map_err(|e| invalid_data(e.to_string())),
            other => Err(invalid_data(format!("unknown response kind 0x{other:02x}"))),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Request::Echo(bytes) => write_frame(io, KIND_ECHO, &bytes).await,
            Request::GetPeers => write_frame(io, KIND_GET_PEERS, &[]).await,
            Request::Activation(bytes) => write_frame(io, KIND_ACTIVATION, &bytes).await,
            Request::Credit(bytes) => write_frame(io, KIND_CREDIT, &bytes).await,
            Request::Fetch(f) => {
                let body = serde_json::to_vec(&f).map_err(|e| invalid_data(e.to_string()))?;
                write_frame(io, KIND_FETCH, &body).await
            }
            #[cfg(feature = "test-hooks")]
            Request::Raw(bytes) => {
                io.write_all(&bytes).await?;
                io.flush().await
            }
            Request::Invalid(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an invalid request is never sent",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            Response::Echo(bytes) => write_frame(io, KIND_ECHO, &bytes).await,
            Response::Activation(bytes) => write_frame(io, KIND_ACTIVATION_RESULT, &bytes).await,
            Response::Chunk(bytes) => write_frame(io, KIND_CHUNK, &bytes).await,
            Response::Credit(bytes) => write_frame(io, KIND_CREDIT_REPLY, &bytes).await,
            Response::Peers(peers) => {
                let body = serde_json::to_vec(&peers).map_err(|e| invalid_data(e.to_string()))?;
                write_frame(io, KIND_PEERS, &body).await
            }
            Response::Error { code, message } => {
                let body = serde_json::to_vec(&ErrorBody { code, message })
                    .map_err(|e| invalid_data(e.to_string()))?;
                write_frame(io, KIND_ERROR, &body).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn requests_round_trip() {
        let mut codec = FrameCodec;
        for req in [
            Request::Echo(vec![1, 2, 3]),
            Request::GetPeers,
            Request::Activation(vec![4; 70]),
            Request::Fetch(FetchRequest {
                model_id: "m".into(),
                file: "shard-000.gguf".into(),
                offset: 5,
                len: 10,
            }),
        ] {
            let mut buf = Vec::new();
            block_on(codec.write_request(&PROTOCOL, &mut buf, req.clone())).expect("write");
            let got = block_on(codec.read_request(&PROTOCOL, &mut buf.as_slice())).expect("read");
            assert_eq!(got, req);
        }
    }

    #[test]
    fn responses_round_trip() {
        let mut codec = FrameCodec;
        for res in [
            Response::Echo(vec![9; 100]),
            Response::Activation(vec![1, 2]),
            Response::Peers(vec![PeerHint {
                node_id: "ab".into(),
                addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            }]),
            Response::Error {
                code: 400,
                message: "bad".into(),
            },
        ] {
            let mut buf = Vec::new();
            block_on(codec.write_response(&PROTOCOL, &mut buf, res.clone())).expect("write");
            let got = block_on(codec.read_response(&PROTOCOL, &mut buf.as_slice())).expect("read");
            assert_eq!(got, res);
        }
    }

    #[test]
    fn malformed_requests_decode_to_invalid_not_errors() {
        let mut codec = FrameCodec;
        let cases: Vec<Vec<u8>> = vec![
            // oversize length prefix
            ((MAX_FRAME as u32) + 1).to_be_bytes().to_vec(),
            // too short
            vec![0, 0, 0, 1, 1],
            // wrong version
            vec![0, 0, 0, 2, 9, KIND_ECHO],
            // unknown kind
            vec![0, 0, 0, 2, WIRE_VERSION, 0x55],
        ];
        for bytes in cases {
            let got = block_on(codec.read_request(&PROTOCOL, &mut bytes.as_slice()))
                .expect("no io error");
            assert!(matches!(got, Request::Invalid(_)), "{bytes:?} → {got:?}");
        }
        // A truncated frame is an I/O error (the stream ended).
        let truncated = vec![0, 0, 0, 9, WIRE_VERSION];
        assert!(block_on(codec.read_request(&PROTOCOL, &mut truncated.as_slice())).is_err());
    }
}
