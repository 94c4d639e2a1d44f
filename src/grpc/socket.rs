//! Accepted gRPC connections, tuned for many small answers.
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
//! instead of one `writev`.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that tells h2 it has no vectored writes.
pub struct Socket(TcpStream);

impl From<TcpStream> for Socket {
    fn from(stream: TcpStream) -> Self {
        Socket(stream)
    }
}

impl Connected for Socket {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Still correct if a caller ignores `is_write_vectored`.
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
