//! Route listeners every front end shares: binding with an error that names
//! the route and the fix, and the accept loop.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::Error;

/// The start-up error for a route whose address cannot be bound.
pub fn bind_error(route: &str, addr: SocketAddr, e: &std::io::Error) -> Error {
    Error::usage(format!(
        "route {route:?}: cannot listen on {addr}: {e}; fix: choose a free address in route.listen"
    ))
}

/// Binds route `route`'s TCP listener (so a busy port fails the start).
pub async fn bind_route(
    route: &str,
    addr: SocketAddr,
) -> crate::error::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(route, addr, &e))
}

/// Accepts connections on `tcp` until the task is dropped, handing each
/// (with `TCP_NODELAY` set) to `serve` with its local and peer address. A
/// failed accept (e.g. out of descriptors) is logged and retried shortly.
pub async fn accept_loop(
    route: &str,
    listen: SocketAddr,
    tcp: &tokio::net::TcpListener,
    mut serve: impl FnMut(tokio::net::TcpStream, SocketAddr, SocketAddr),
) {
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let local = local_addr_of(&stream, listen);
                serve(stream, local, peer);
            }
            Err(e) => {
                tracing::warn!(route = %route, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The local address of an accepted connection: the listener's own when it
/// is bound to one address and port (no `getsockname` per connection),
/// otherwise asked of the socket (a wildcard or port 0 listener).
pub fn local_addr_of(stream: &tokio::net::TcpStream, listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() || listen.port() == 0 {
        stream.local_addr().unwrap_or(listen)
    } else {
        listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_port_names_the_route_and_the_fix() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_route("orders", addr).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("route \"orders\": cannot listen on"), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(
            msg.contains("fix: choose a free address in route.listen"),
            "{msg}"
        );
        assert!(bind_route("orders", "127.0.0.1:0".parse().unwrap())
            .await
            .is_ok());
    }
}
