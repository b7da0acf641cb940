//! `podIP:<contract port>` forwarded to the pod's mapped port.
//!
//! With ports mapped ([`super::network`]), a pod's program listens on its own host port,
//! not on the contract port. Whoever only knows the pod's IP and the contract port, as the
//! operator does when it asks the chief for progress, reaches it through this forwarder,
//! the way a container runtime's port proxy works.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A running forwarder; dropping it closes the listener and every forwarded connection.
#[derive(Debug)]
pub struct PortForward {
    listen: SocketAddr,
    task: JoinHandle<()>,
}

impl PortForward {
    /// Listens on `listen` and forwards every connection to `target`. Must be called
    /// inside a tokio runtime.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let listen = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, target));
        Ok(Self { listen, task })
    }

    /// The address it listens on.
    pub fn listen_address(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr) {
    // Owned here, so aborting this task ends every connection with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                connections.spawn(forward(inbound, target));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    // Nothing listens yet (the program is starting): the caller sees the connection close,
    // as it would see a refusal.
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_go_both_ways_and_stop_with_the_forwarder() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = backend.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut conn, _) = backend.accept().await.unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).await.unwrap();
            conn.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
            // Wait for the far side to close, so the test sees the forwarder end it.
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).await.unwrap();
        });

        let forward = PortForward::start("127.0.0.1:0".parse().unwrap(), target)
            .await
            .unwrap();
        let mut client = TcpStream::connect(forward.listen_address()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut answer = [0u8; 5];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HELLO");

        let listen = forward.listen_address();
        drop(forward);
        // The open connection ends, so the backend's read sees EOF and its task finishes.
        echo.await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).await.unwrap(), 0);
        // The listener is gone too: a new forwarder can take the address.
        PortForward::start(listen, target).await.unwrap();
    }

    #[tokio::test]
    async fn a_target_that_is_not_up_closes_the_connection() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = unused.local_addr().unwrap();
        drop(unused);
        let forward = PortForward::start("127.0.0.1:0".parse().unwrap(), target)
            .await
            .unwrap();
        let mut client = TcpStream::connect(forward.listen_address()).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).await.unwrap(), 0);
    }
}
