//! Bare HTTP/1.0 on loopback, for the few requests the tests make to the processes they
//! run (the operator's `/metrics`, Prometheus's HTTP API). One request per connection,
//! the whole body read to EOF: no client library needed for that.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code (0 if the status line was unreadable).
    pub code: u16,
    /// Everything after the headers.
    pub body: String,
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").into_bytes(),
    )
    .await
}

/// `POST path` with the pairs as an `application/x-www-form-urlencoded` body (how
/// Prometheus's API takes long queries).
pub async fn post_form(
    addr: SocketAddr,
    path: &str,
    pairs: &[(&str, &str)],
) -> std::io::Result<Response> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    exchange(addr, [head.into_bytes(), body.into_bytes()].concat()).await
}

async fn exchange(addr: SocketAddr, request: Vec<u8>) -> std::io::Result<Response> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(&request).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok(Response { code, body })
}
