//! Connections to an http route's upstream for hyper-util's pooled client:
//! opened by [`warden_core::connect::open`] (TCP, then verified rustls),
//! wrapped so hyper learns whether ALPN chose h2.

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
pub use warden_core::connect::{
    client_config, find_connect_error, open, pq_provider, ConnectError,
};

/// An upstream I/O stream: plain TCP or rustls (the type PostgreSQL routes use).
pub use warden_core::pgwire::upstream::UpstreamStream as Stream;

/// What hyper-util's pool holds: the stream and whether ALPN chose h2.
pub struct Conn {
    io: TokioIo<Stream>,
    h2: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Opens upstream connections for hyper-util's pooled client. The target
/// host and port come from the request URI (https → TLS with `tls`).
#[derive(Clone)]
pub struct Connector {
    pub tls: Option<Arc<ClientConfig>>,
    pub connect_timeout: Duration,
    /// Where the trusted CAs come from, for error messages.
    pub ca_label: Arc<str>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri
                .host()
                .ok_or_else(|| ConnectError::Failed("request has no upstream host".into()))?
                .to_string();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tls = if https {
                Some(this.tls.as_ref().ok_or_else(|| {
                    ConnectError::Failed("https upstream without a TLS configuration".into())
                })?)
            } else {
                None
            };
            let (stream, h2) = open(&host, port, tls, this.connect_timeout, &this.ca_label).await?;
            Ok(Conn {
                io: TokioIo::new(stream),
                h2,
            })
        })
    }
}
