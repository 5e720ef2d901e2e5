//! Events for the service (`POST /v1/events`, SPEC §5): queued without ever waiting, sent in
//! batches by one background task, so they never delay or fail a call.
//!
//! The queue is bounded (the oldest event is dropped when it is full), a batch holds at most
//! [`MAX_BATCH`] events, the task sends every [`FLUSH_EVERY`] or as soon as a batch is full,
//! retries a failed batch with backoff, and [`Events::close`] sends what is left at shutdown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Endpoint;

pub const MAX_BATCH: usize = 25;
pub const MAX_QUEUE: usize = 5000;
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
pub const RETRIES: u32 = 3;
pub const RETRY_BASE: Duration = Duration::from_millis(250);

struct Inner {
    queue: Mutex<VecDeque<Value>>,
    wake: Notify,
    closing: AtomicBool,
    dropped: AtomicU64,
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch: a full one, or with `all` whatever is left.
    fn take_batch(&self, all: bool) -> Vec<Value> {
        let mut queue = self.queue();
        if queue.len() < MAX_BATCH && !all {
            return Vec::new();
        }
        let n = queue.len().min(MAX_BATCH);
        queue.drain(..n).collect()
    }
}

/// The event queue and its sender task.
pub struct Events {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Events {
    /// Starts the sender task on the current runtime.
    pub(super) fn start(endpoint: Endpoint) -> Events {
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let task = tokio::spawn(send_loop(inner.clone(), endpoint));
        Events {
            inner,
            task: Mutex::new(Some(task)),
        }
    }

    /// Queues an event; never waits.
    pub fn push(&self, event: Value) {
        let full = {
            let mut queue = self.inner.queue();
            if queue.len() >= MAX_QUEUE {
                queue.pop_front();
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(event);
            queue.len() >= MAX_BATCH
        };
        if full {
            self.inner.wake.notify_one();
        }
    }

    /// Sends what is queued, giving up after `within`.
    pub async fn close(&self, within: Duration) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(within, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!(
                left = self.inner.queue().len(),
                "events not sent before exit"
            );
        }
    }
}

async fn send_loop(inner: Arc<Inner>, endpoint: Endpoint) {
    let mut due = tokio::time::Instant::now() + FLUSH_EVERY;
    loop {
        if !inner.closing.load(Ordering::Acquire) {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = inner.wake.notified() => {}
            }
        }
        let closing = inner.closing.load(Ordering::Acquire);
        // Full batches go at once; a partial one waits for the timer (or the end).
        let timer = tokio::time::Instant::now() >= due;
        if timer {
            due = tokio::time::Instant::now() + FLUSH_EVERY;
        }
        loop {
            let batch = inner.take_batch(timer || closing);
            if batch.is_empty() {
                break;
            }
            send(&endpoint, batch, &inner.closing).await;
        }
        let dropped = inner.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "event queue full: oldest events dropped");
        }
        if closing {
            return;
        }
    }
}

/// Sends one batch, retrying with backoff; at shutdown once only, so a service that is down
/// does not hold the exit back.
async fn send(endpoint: &Endpoint, events: Vec<Value>, closing: &AtomicBool) {
    let count = events.len();
    let body = json!({ "events": events });
    let mut delay = RETRY_BASE;
    for attempt in 0..=RETRIES {
        match endpoint.post("/v1/events", &body, endpoint.timeout).await {
            Ok(_) => return,
            Err(e) if attempt == RETRIES || closing.load(Ordering::Acquire) => {
                tracing::warn!(error = %e, events = count, "events dropped");
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "sending events failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}
