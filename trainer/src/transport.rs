//! Transport settings shared by every gRPC client and server of the trainer: message and
//! chunk sizes, HTTP/2 windows and frames, and the channel and server built with them.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Server};

/// Largest tensor payload per message (the limit is 4 MiB). Through tonic's codec, where
/// a whole message was encoded or decoded before the next, a 16 MiB push+pull took ~42 ms
/// with 256 KiB chunks against ~60 ms with 1 MiB and ~72 ms with 4 MiB. With the PS's calls
/// framed by hand (`parameter_transfer`), which pass on every HTTP/2 frame as it arrives, 256 KiB
/// and 1 MiB were alike (0.46x raw TCP each) and 64 KiB slower (0.40x) (trainer-bench).
pub const CHUNK_BYTES: usize = 256 << 10;
/// Accepted message size: a chunk plus headroom for the other fields.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// HTTP/2 flow-control windows. The defaults (64 KiB) stall a 16 MiB push on round trips.
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 frame size: fewer frames per chunk than the 16 KiB default.
pub const MAX_FRAME: u32 = 1 << 20;

/// A lazily connecting channel to a peer. Lazy so that a PS that is down (or restarting)
/// does not fail construction; each call connects (again) on demand.
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A server builder with the same windows and frame size.
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
}

/// Accepted connections of `listener`, with Nagle off: tensor messages are written in
/// pieces and would otherwise wait ~40 ms for delayed ACKs on every step. (The server
/// builder's own `tcp_nodelay` only applies to listeners it binds itself.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
