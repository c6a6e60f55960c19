//! An `AsyncRead` that fails when no byte arrives for a while.
//!
//! The master sends something at least every `repl-ping-replica-period`
//! (10 s by default), keep-alive newlines included, so a long silence means
//! the link is dead even if TCP has not noticed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct IdleTimeout<R> {
    inner: R,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<R> IdleTimeout<R> {
    pub fn new(inner: R, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for IdleTimeout<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let deadline = Instant::now() + this.timeout;
                this.deadline.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data for {} s", this.timeout.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
