//! The evaluation pool: a fixed set of threads for decoding and inference, so CPU-heavy work
//! never runs on the async workers. Admission is bounded by a semaphore; the time a job waits
//! for a thread is measured (`acc_eval_queue_seconds`) and bounded by the caller's budget.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

pub struct EvalPool {
    jobs: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    threads: usize,
}

impl EvalPool {
    pub fn new(threads: usize) -> EvalPool {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("acc-eval-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!("cannot start evaluation thread {i}: {e}");
            }
        }
        EvalPool { jobs: tx, permits: Arc::new(Semaphore::new(threads)), threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a pool thread. Returns how long the job waited for a thread, and its result;
    /// `None` if the pool is gone. Dropping the returned future gives the slot back as soon as
    /// the job (if started) ends.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<(f64, R)> {
        let queued = Instant::now();
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let waited = queued.elapsed().as_secs_f64();
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let r = f();
            drop(permit);
            let _ = tx.send(r);
        });
        self.jobs.send(job).ok()?;
        rx.await.ok().map(|r| (waited, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_off_the_caller_thread_and_wait_when_saturated() {
        let pool = Arc::new(EvalPool::new(1));
        let caller = std::thread::current().id();
        let (_, other) = pool.run(move || std::thread::current().id() != caller).await.unwrap();
        assert!(other);
        let p2 = pool.clone();
        let slow =
            tokio::spawn(async move { p2.run(|| std::thread::sleep(std::time::Duration::from_millis(200))).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (waited, _) = pool.run(|| ()).await.unwrap();
        assert!(waited > 0.1, "second job waited {waited}s for the only thread");
        slow.await.unwrap();
    }
}
