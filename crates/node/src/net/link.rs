//! Pipeline steps on long-lived streams: `/swarmllm/step/1`.
//!
//! ```text
//!  requester ══ link (one stream) ══▶ hop 1 ══ link ══▶ hop 2 ...
//!            ◀── answer, same stream ──      ◀── answer ──
//! ```
//!
//! A step is a request and its answer, framed exactly like the request-response
//! protocol of [`frame`](super::frame), but all the steps of one session between
//! two nodes share one stream, opened at the session's first step and closed when
//! either side drops it. Per step that saves the substream negotiation and, above
//! all, the passes through the swarm's event loop: the bytes go straight between
//! the stream and the pipeline task that waits for them. A link usually carries
//! one request at a time; a replay posts several before reading their answers,
//! which the other end gives in order.

use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::Codec;
use libp2p::{PeerId, Stream, StreamProtocol};

use super::frame::{FrameCodec, Request, Response};
use super::{NetError, node_id_of};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/swarmllm/step/1");

/// Longest wait for the answer to one step (the peer's compute included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The sending end of a link: one session's steps to one peer.
pub struct Link {
    node_id: String,
    stream: Stream,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Link {
    pub(crate) fn new(node_id: String, stream: Stream) -> Self {
        Self { node_id, stream }
    }

    /// The peer at the other end.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Sends `request` and waits for its answer. After an error the link is
    /// unusable (a frame may be half written or half read): drop it.
    pub async fn call(&mut self, request: Request) -> Result<Response, NetError> {
        self.post(request).await?;
        self.answer().await
    }

    /// Sends `request` without waiting for its answer: the answers to posted
    /// requests come from [`Link::answer`] in the order they were posted.
    /// After an error the link is unusable: drop it.
    pub async fn post(&mut self, request: Request) -> Result<(), NetError> {
        within_limit(FrameCodec.write_request(&PROTOCOL, &mut self.stream, request)).await
    }

    /// The answer to the oldest request not yet answered.
    pub async fn answer(&mut self) -> Result<Response, NetError> {
        within_limit(FrameCodec.read_response(&PROTOCOL, &mut self.stream)).await
    }
}

/// `io` within [`CALL_TIMEOUT`], its errors as the network's.
async fn within_limit<T>(
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(CALL_TIMEOUT, io).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(NetError::Request(e.to_string())),
        Err(_) => Err(NetError::Request(format!(
            "no answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The receiving end of a link.
pub struct InboundLink {
    /// The sender's node id (authenticated by the transport).
    pub from: String,
    stream: Stream,
}

impl std::fmt::Debug for InboundLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundLink")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl InboundLink {
    /// The link as two halves, one reading requests and one answering them,
    /// so that requests can be read ahead while earlier ones are still being
    /// answered (the answers must still go out in the requests' order).
    pub fn split(self) -> (InboundRequests, InboundAnswers) {
        let (read, write) = futures::AsyncReadExt::split(self.stream);
        (InboundRequests { read }, InboundAnswers { write })
    }
}

/// The reading half of an [`InboundLink`].
pub struct InboundRequests {
    read: futures::io::ReadHalf<Stream>,
}

impl InboundRequests {
    /// The next request: `None` when the peer closed the link, it broke, or no
    /// request came for `idle`. A frame that cannot be decoded arrives as
    /// [`Request::Invalid`] (answer it; the link stays usable).
    pub async fn next(&mut self, idle: Duration) -> Option<Request> {
        tokio::time::timeout(idle, FrameCodec.read_request(&PROTOCOL, &mut self.read))
            .await
            .ok()?
            .ok()
    }
}

/// The answering half of an [`InboundLink`].
pub struct InboundAnswers {
    write: futures::io::WriteHalf<Stream>,
}

impl InboundAnswers {
    /// Answers the oldest request not yet answered.
    pub async fn respond(&mut self, response: Response) -> std::io::Result<()> {
        FrameCodec
            .write_response(&PROTOCOL, &mut self.write, response)
            .await
    }
}

/// Links other nodes open to this one.
pub struct InboundLinks(libp2p_stream::IncomingStreams);

impl std::fmt::Debug for InboundLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboundLinks")
    }
}

impl InboundLinks {
    pub(crate) fn new(streams: libp2p_stream::IncomingStreams) -> Self {
        Self(streams)
    }

    /// The next link; `None` once the network has stopped. Streams from peers
    /// whose id is not an Ed25519 node id are dropped.
    pub async fn next(&mut self) -> Option<InboundLink> {
        loop {
            let (peer, stream): (PeerId, Stream) = self.0.next().await?;
            if let Some(from) = node_id_of(&peer) {
                return Some(InboundLink { from, stream });
            }
        }
    }
}
