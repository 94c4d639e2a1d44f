//! Accepted gRPC connections: plain TCP or TLS over it, tuned for many
//! small answers, each holding one of the listener's connection slots.
//!
//! TLS is negotiated by the connection itself, on its first read or write,
//! so the handshake runs in the connection's own task and a slow or silent
//! client never holds up the accept loop; it gets [`HANDSHAKE_TIMEOUT`] to
//! finish. tonic asks a connection for its [`PeerInfo`] before that, so the
//! client certificate's name is filled in once the handshake is done, which
//! is before the first request can arrive.
//!
//! h2 copies a DATA frame into its write buffer only below a threshold: 256
//! bytes on a socket that supports vectored writes, 1 KiB otherwise. A larger
//! frame is kept aside and nothing else is buffered until it is written, so
//! every answer above 256 bytes costs a `writev` of its own. Nearly all our
//! answers are 300–900 bytes (a BeginLogin answer carries a ~250-byte
//! authorize URL), so under load each went out alone while Health/Check
//! answers went out dozens per syscall: BeginLogin made 1.75 `writev` calls
//! per answer against Health/Check's 0.76. Presenting the socket as
//! non-vectored moves the threshold to 1 KiB and lets our answers batch; the
//! rare larger answer (a page of users) is written in two `write` calls
//! instead of one `writev`. Over TLS the same batching also means fewer
//! records.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::Sleep,
};
use tokio_rustls::{Accept, TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::ServerTls;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection that tells h2 it has no vectored writes.
pub struct Socket {
    io: Io,
    peer: PeerInfo,
    /// Returned to the listener when the connection is dropped.
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Handshaking(Box<Handshake>),
    Tls(Box<TlsStream<TcpStream>>),
    Failed,
}

struct Handshake {
    accept: Accept<TcpStream>,
    deadline: Pin<Box<Sleep>>,
}

/// What tonic puts in the extensions of every request on a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub tcp: TcpConnectInfo,
    /// Set when the TLS handshake is done: the subject CN of the client's
    /// certificate, when it presented one (mTLS).
    client_cn: Option<Arc<OnceLock<Option<Arc<str>>>>>,
}

impl PeerInfo {
    /// The subject CN of the client certificate this connection was made
    /// with; `None` without mTLS.
    pub fn client_cn(&self) -> Option<&str> {
        self.client_cn.as_ref()?.get()?.as_deref()
    }

    /// A finished mTLS connection whose certificate names `cn`.
    #[cfg(test)]
    pub(crate) fn with_client_cn(cn: &str) -> PeerInfo {
        let cell = OnceLock::new();
        let _ = cell.set(Some(Arc::from(cn)));
        PeerInfo {
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
            client_cn: Some(Arc::new(cell)),
        }
    }
}

impl Socket {
    /// A connection just accepted, holding `slot`; with `tls`, its
    /// handshake starts on the first read or write.
    pub fn accept(tcp: TcpStream, tls: Option<&ServerTls>, slot: OwnedSemaphorePermit) -> Socket {
        let peer = PeerInfo {
            tcp: tcp.connect_info(),
            client_cn: tls.map(|_| Arc::default()),
        };
        let io = match tls {
            None => Io::Plain(tcp),
            Some(tls) => Io::Handshaking(Box::new(Handshake {
                accept: TlsAcceptor::from(tls.config()).accept(tcp),
                deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            })),
        };
        Socket {
            io,
            peer,
            _slot: slot,
        }
    }

    /// Drives the TLS handshake, if one is under way; Ready(Ok) once the
    /// connection carries data.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Io::Handshaking(handshake) = &mut self.io else {
            return Poll::Ready(match self.io {
                Io::Failed => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS handshake failed",
                )),
                _ => Ok(()),
            });
        };
        let done = match Pin::new(&mut handshake.accept).poll(cx) {
            Poll::Ready(done) => done,
            Poll::Pending => {
                ready!(handshake.deadline.as_mut().poll(cx));
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake took too long",
                ))
            }
        };
        match done {
            Ok(stream) => {
                if let Some(cell) = &self.peer.client_cn {
                    let cn = (stream.get_ref().1.peer_certificates())
                        .and_then(|chain| crate::tls::common_name(chain.first()?));
                    let _ = cell.set(cn.map(Arc::from));
                }
                self.io = Io::Tls(Box::new(stream));
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                // A plaintext client, an unknown CA, no client certificate:
                // routine on an open port, so not above debug.
                tracing::debug!(peer = ?self.peer.tcp.remote_addr(), error = %e, "TLS handshake failed");
                self.io = Io::Failed;
                Poll::Ready(Err(e))
            }
        }
    }
}

impl Connected for Socket {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Err(not_connected())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Still correct if a caller ignores `is_write_vectored`.
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Err(not_connected())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            // Nothing was said over it; dropping it closes it.
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Ok(())),
        }
    }
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no TLS session")
}
