//! A future run to its end even if its caller drops it first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// A future run to its end even if dropped first: what is left of it then goes on as a task
/// of its own (its result dropped). Until then it runs on its caller's task, with no task of
/// its own to spawn, hand to another worker thread and join (what `tokio::spawn(f).await`
/// costs an acquire at concurrency 1).
///
/// # Cancel safety
/// That is its purpose: dropping it does not stop `f`. Outside a tokio runtime, a dropped
/// `Finish` drops `f` as any future is dropped.
pub struct Finish<F: Future<Output: Send> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output: Send> + Send + 'static> Finish<F> {
    /// Wraps `f`, which runs once the `Finish` is polled.
    pub fn new(f: F) -> Finish<F> {
        Finish(Some(Box::pin(f)))
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for Finish<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(f) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let out = ready!(f.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for Finish<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = f.await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropped before its end, the rest still runs, as a task of its own.
    #[tokio::test]
    async fn a_dropped_finish_runs_to_its_end() {
        let (reached, mut at) = tokio::sync::oneshot::channel::<()>();
        let (go, resume) = tokio::sync::oneshot::channel::<()>();
        let (done, ended) = tokio::sync::oneshot::channel::<u32>();
        let f = Finish::new(async move {
            let _ = reached.send(());
            let _ = resume.await;
            let _ = done.send(7);
            7
        });
        let mut f = Box::pin(f);
        // Polled until it waits inside, then dropped.
        tokio::select! {
            _ = &mut f => panic!("it cannot end before it is resumed"),
            _ = &mut at => {}
        }
        drop(f);
        let _ = go.send(());
        assert_eq!(ended.await, Ok(7));
    }

    /// Not dropped, it answers its own output on the caller's task.
    #[tokio::test]
    async fn a_finish_awaited_answers_its_output() {
        assert_eq!(Finish::new(async { 3 }).await, 3);
    }
}
