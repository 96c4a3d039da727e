//! Panics turned into errors where a task must not vanish silently. A panicking tokio task is
//! just dropped: the Raft loop, which runs as one, would stop without a word while Redis went on
//! serving, its status frozen at the last round and its waiting clients never answered.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a panic said (its `&str` or `String` payload), for a log line or an error.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs a future to its end, or to its first panic, which becomes `Err(what it said)`; the
/// future is not polled again after that.
pub struct CatchUnwind<'a, T> {
    inner: Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>,
}

impl<'a, T> CatchUnwind<'a, T> {
    pub fn new(future: impl Future<Output = T> + Send + 'a) -> Self {
        CatchUnwind { inner: Some(Box::pin(future)) }
    }
}

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err("polled after it ended".into()));
        };
        // Whatever the future holds is dropped unused after a panic, so a half-done update
        // inside it cannot be observed.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => {
                self.inner = None;
                Poll::Ready(Ok(value))
            }
            Err(payload) => {
                self.inner = None;
                Poll::Ready(Err(panic_message(payload.as_ref())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_polled_becomes_its_message() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut count = 0;
        let crashed = rt.block_on(CatchUnwind::new(async {
            count += 1;
            tokio::task::yield_now().await;
            let index = 67;
            if count > 0 {
                panic!("to_commit {index} is out of range");
            }
        }));
        assert_eq!(crashed, Err("to_commit 67 is out of range".to_string()));
        assert_eq!(count, 1, "the state it borrowed is usable after");
        assert_eq!(rt.block_on(CatchUnwind::new(async { 5 })), Ok(5));
        assert_eq!(panic_message(&"plain"), "plain");
    }
}
