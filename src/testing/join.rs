//! [`join_all`]: many futures driven concurrently without a runtime.

use std::future::Future;

/// Drive `futures` concurrently to completion; outputs in order. Needs no
/// runtime (the kit depends on none). Beyond a few tens of futures, each
/// has its own waker and a wake-up polls only the futures that were woken,
/// so thousands can be in flight at once, as a runtime's spawned tasks
/// would be (`futures-util`'s `join_all`).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use custodian::testing::join_all;
///
/// let doubled = join_all((1..=3).map(|n| async move { n * 2 }).collect()).await;
/// assert_eq!(doubled, [2, 4, 6]);
/// # });
/// ```
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    futures_util::future::join_all(futures).await
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Pending until its flag is set, then ready with `value`; counts polls.
    struct Gate {
        open: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
        polls: Arc<AtomicUsize>,
        value: usize,
    }

    impl Future for Gate {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.open.load(Ordering::Acquire) {
                Poll::Ready(self.value)
            } else {
                *self.waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn polls_only_the_woken_and_keeps_the_order() {
        let n = 100;
        let gates: Vec<_> = (0..n)
            .map(|value| Gate {
                open: Arc::default(),
                waker: Arc::default(),
                polls: Arc::default(),
                value,
            })
            .collect();
        let handles: Vec<_> = gates
            .iter()
            .map(|g| (g.open.clone(), g.waker.clone(), g.polls.clone()))
            .collect();
        let opener = std::thread::spawn(move || {
            // Open them from another thread, last first, each once the
            // one before has finished.
            for (open, waker, polls) in handles.iter().rev() {
                let waker = loop {
                    if let Some(w) = waker.lock().unwrap().take() {
                        break w;
                    }
                    std::thread::yield_now();
                };
                open.store(true, Ordering::Release);
                // Woken twice: the second must not poll it again.
                waker.wake_by_ref();
                waker.wake();
                // Bounded, so that a future never polled again fails the
                // test below instead of hanging it.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while polls.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
            handles
        });
        let outputs = join_all(gates).await;
        let handles = opener.join().unwrap();
        assert_eq!(outputs, (0..n).collect::<Vec<_>>());
        for (_, _, polls) in handles {
            // Once pending, once ready: never polled for another's wake-up.
            assert_eq!(polls.load(Ordering::Relaxed), 2);
        }
    }

    #[tokio::test]
    async fn empty_and_ready_at_once() {
        assert!(
            join_all(Vec::<std::future::Ready<u8>>::new())
                .await
                .is_empty()
        );
        let ready = join_all(vec![std::future::ready(1), std::future::ready(2)]).await;
        assert_eq!(ready, [1, 2]);
    }
}
