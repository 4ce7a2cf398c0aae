//! One single-threaded runtime per core, each serving whole connections.
//!
//! A connection — its TLS session, its HTTP server, the upstream connection kept for it and
//! any tunnel — lives on one thread from accept to close. Nothing it does crosses threads, so
//! waking a task is a local queue push rather than a futex and an inter-processor interrupt,
//! and no task is ever stolen. The accept loops hand each new connection to the next worker in
//! turn.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The most workers any [`Workers`] has started; per-worker tables are this long.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// This thread's worker index (0 on threads that are not workers).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many per-worker slots a table needs: every [`current`] is below it.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// The worker runtimes. Dropping it stops them; tasks still running on them are dropped.
pub struct Workers {
    handles: Box<[Handle]>,
    next: AtomicUsize,
    _stop: DropGuard,
}

impl Workers {
    /// Starts `count` worker threads (at least one). Each builds its runtime on its own thread,
    /// so a failure part-way drops nothing inside the caller's runtime, and the workers already
    /// started stop again.
    pub fn start(count: usize) -> io::Result<Arc<Workers>> {
        let count = count.max(1);
        COUNT.fetch_max(count, Ordering::Relaxed);
        let stop = CancellationToken::new();
        // Stops the threads started so far if a later one fails, and all of them with Workers.
        let guard = stop.clone().drop_guard();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("ciphergate-worker-{i}"))
                .spawn(move || {
                    let runtime = match Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    INDEX.with(|index| index.set(i));
                    if tx.send(Ok(runtime.handle().clone())).is_err() {
                        return;
                    }
                    runtime.block_on(stop.cancelled());
                    // Name lookups run on the blocking pool and are bounded by connect_timeout.
                    runtime.shutdown_timeout(Duration::from_millis(100));
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended while starting"))??;
            handles.push(handle);
        }
        Ok(Arc::new(Workers {
            handles: handles.into_boxed_slice(),
            next: AtomicUsize::new(0),
            _stop: guard,
        }))
    }

    /// The number of workers: `TOKIO_WORKER_THREADS` when it is set to a positive number, as
    /// for any tokio program, otherwise one per available core.
    pub fn default_count() -> usize {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `task` on the next worker in turn, tracked by `tracker`.
    pub fn spawn<F>(&self, tracker: &TaskTracker, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        tracker.spawn_on(task, &self.handles[i]);
    }
}

/// One `T` per worker, for state that connections on one worker share and that must not be
/// driven from another (idle upstream connections, whose tasks run on the worker that opened
/// them).
pub struct PerWorker<T>(Box<[T]>);

impl<T> PerWorker<T> {
    pub fn new(mut make: impl FnMut() -> T) -> Self {
        PerWorker((0..count()).map(|_| make()).collect())
    }

    /// The calling worker's `T`.
    pub fn get(&self) -> &T {
        &self.0[current() % self.0.len()]
    }
}
