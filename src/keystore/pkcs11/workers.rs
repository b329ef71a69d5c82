//! The HSM worker threads: where every PKCS#11 call of a request runs, off the async runtime.
//!
//! Owns a fixed set of OS threads (one per pool session) and the queue that feeds them. Knows
//! nothing of keys, sessions or cryptoki: a job is a closure.
//!
//! Why not `spawn_blocking` behind a semaphore (the first design): there each call waited for a
//! permit, woke a parked blocking thread, and the thread parked again when done, so under load
//! every request paid two thread wake-ups and the device sat idle between calls while the
//! runtime handed the permit on. Here requests queue ahead of the workers, and a busy worker
//! takes the next job without sleeping (benches/RESULTS.md has the numbers).
//!
//! Backpressure: a job that no worker has started within the caller's wait is withdrawn and the
//! caller answers `Busy`; so is a job whose caller went away. A job that started always runs to
//! the end and reports, so no operation happens without its caller hearing of it.
//!
//! Short calls skip the hand-off: while the device's calls take a few microseconds (a local
//! software token), a job runs on the async runtime thread that asked for it, as any other
//! short computation would, and costs no thread wake-up on either side. Two limits keep a slow
//! device from ever stalling the runtime: a job runs inline only while the smoothed duration of
//! recent jobs is under [`INLINE_MAX`] (a network HSM's round trip is far above it, so its jobs
//! always go to the workers), and at most one fewer jobs than the runtime has threads run inline
//! at once, so a call that hangs without warning holds one runtime thread, never all of them.
//! Jobs that may wait on a lock or write to the token ([`Placement::Worker`]) never run inline,
//! however fast the device.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::locks::IgnorePoison;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const WITHDRAWN: u8 = 2;

struct Job {
    state: Arc<AtomicU8>,
    queued_at: Instant,
    task: Box<dyn Task>,
}

/// A call and, once run, its answer: one allocation per call, run and delivered apart.
trait Task: Send {
    /// Runs the call and keeps its answer.
    fn run(&mut self);
    /// Hands the answer to the caller (wakes the caller's task).
    fn deliver(self: Box<Self>);
}

struct Call<F, T> {
    f: Option<F>,
    answer: Option<T>,
    tx: tokio::sync::oneshot::Sender<T>,
}

impl<F: FnOnce() -> T + Send, T: Send> Task for Call<F, T> {
    fn run(&mut self) {
        if let Some(f) = self.f.take() {
            self.answer = Some(f());
        }
    }

    fn deliver(self: Box<Self>) {
        let Call { answer, tx, .. } = *self;
        if let Some(answer) = answer {
            let _ = tx.send(answer);
        }
    }
}

#[derive(Default)]
struct Pending {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job: a push wakes one only when there is one to wake.
    idle: usize,
    closed: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
    running: AtomicUsize,
    started: AtomicU64,
    waited_nanos: AtomicU64,
    /// Jobs run inline (on a runtime thread) since start, and how many run so now.
    inline_started: AtomicU64,
    inline_running: AtomicUsize,
    /// Smoothed duration of a job, wherever it ran (an exponential moving average, 1/8).
    typical_nanos: AtomicU64,
    /// Total time jobs ran, wherever they ran.
    busy_nanos: AtomicU64,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            pending: Mutex::default(),
            ready: Condvar::new(),
            running: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            waited_nanos: AtomicU64::new(0),
            inline_started: AtomicU64::new(0),
            inline_running: AtomicUsize::new(0),
            // A device is slow until its calls have shown otherwise.
            typical_nanos: AtomicU64::new(INLINE_MAX_NANOS * 8),
            busy_nanos: AtomicU64::new(0),
        }
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Only pushes and pops happen under the lock; a panic there leaves a valid queue.
        self.pending.lock().ignore_poison()
    }

    fn push(&self, job: Job) -> bool {
        let mut p = self.lock();
        if p.closed {
            return false;
        }
        p.jobs.push_back(job);
        let wake = p.idle > 0;
        drop(p);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    /// Counts one job's duration, and folds it into the smoothed one. Racing updates of the
    /// average may lose one sample; it only steers where jobs run.
    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(took, Ordering::Relaxed);
        let old = self.typical_nanos.load(Ordering::Relaxed);
        let new = old - old / 8 + took / 8;
        self.typical_nanos.store(new, Ordering::Relaxed);
    }

    /// The next job if one is queued.
    fn try_pop(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }

    /// The next job, waiting for one; `None` once closed.
    fn pop(&self) -> Option<Job> {
        let mut p = self.lock();
        loop {
            if p.closed {
                return None;
            }
            if let Some(job) = p.jobs.pop_front() {
                return Some(job);
            }
            p.idle += 1;
            p = self.ready.wait(p).ignore_poison();
            p.idle -= 1;
        }
    }
}

/// Where a job may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inline when the device is fast, else on a worker: a request's device calls.
    Anywhere,
    /// Always on a worker: jobs that wait on locks or write to the token, whose length the
    /// device's typical call says nothing about.
    Worker,
}

/// What became of a call.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The job ran; its answer.
    Done(T),
    /// No worker was free within the wait; the job was withdrawn unrun.
    Busy,
    /// The job panicked, or the workers were shut down.
    Lost,
}

/// Withdraws a job that has not started when its caller stops waiting (or goes away).
struct Withdraw(Arc<AtomicU8>);

impl Withdraw {
    /// True when the job was withdrawn, false when a worker had already started it.
    fn now(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.now();
    }
}

/// The worker threads. Dropping this stops them once their current jobs end.
pub struct Workers {
    queue: Arc<Queue>,
    size: usize,
}

/// Figures for metrics.
#[derive(Debug, Clone, Copy)]
pub struct WorkerStats {
    /// Worker threads (one per session).
    pub size: usize,
    /// Jobs running on a worker now.
    pub running: usize,
    /// Jobs started on a worker thread.
    pub started: u64,
    /// Total time jobs waited in the queue for a worker.
    pub waited: Duration,
    /// Jobs run on the asking runtime thread instead.
    pub inline: u64,
    /// Total time jobs ran (their device calls), inline or on a worker.
    pub busy: Duration,
}

/// Jobs whose smoothed duration is under this run inline (module doc). A local software token's
/// seal is 10–30 µs; the shortest network HSM round trip is several times this.
pub const INLINE_MAX: Duration = Duration::from_nanos(INLINE_MAX_NANOS);
const INLINE_MAX_NANOS: u64 = 100_000;

/// A claim on one of the runtime's inline places; released on drop.
struct InlinePlace<'a>(&'a AtomicUsize);

impl Drop for InlinePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Workers {
    /// Starts `size` threads named `kesh-hsm-<n>`.
    pub fn start(size: usize) -> std::io::Result<Workers> {
        let queue = Arc::new(Queue::default());
        let size = size.max(1);
        for n in 0..size {
            let q = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kesh-hsm-{n}"))
                .spawn(move || work(&q));
            if let Err(e) = spawned {
                close(&queue);
                return Err(e);
            }
        }
        Ok(Workers { queue, size })
    }

    /// A place to run a job inline, if the device is fast and the runtime keeps a thread free.
    fn inline_place(&self) -> Option<InlinePlace<'_>> {
        let q = &self.queue;
        if q.typical_nanos.load(Ordering::Relaxed) >= INLINE_MAX_NANOS {
            return None;
        }
        // Only on a multi-threaded runtime, leaving one of its threads out: a current-thread
        // runtime (or none) has no thread to spare.
        let limit = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .map_or(0, |h| h.metrics().num_workers().saturating_sub(1));
        let running = &q.inline_running;
        let mut now = running.load(Ordering::Acquire);
        loop {
            if now >= limit {
                return None;
            }
            match running.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(InlinePlace(running)),
                Err(seen) => now = seen,
            }
        }
    }

    /// Runs `f` inline or on a worker (see the module doc), waiting at most `wait` for a
    /// worker to take it.
    pub async fn call<T, F>(&self, wait: Duration, placement: Placement, f: F) -> Outcome<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let inline = match placement {
            Placement::Anywhere => self.inline_place(),
            Placement::Worker => None,
        };
        if let Some(_place) = inline {
            let started = Instant::now();
            // As on a worker: a panicking job loses its answer, not the thread.
            let answer = std::panic::catch_unwind(AssertUnwindSafe(f));
            self.queue.record(started.elapsed());
            self.queue.inline_started.fetch_add(1, Ordering::Relaxed);
            return match answer {
                Ok(v) => Outcome::Done(v),
                Err(_) => Outcome::Lost,
            };
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let withdraw = Withdraw(state.clone());
        let job = Job {
            state,
            queued_at: Instant::now(),
            task: Box::new(Call {
                f: Some(f),
                answer: None,
                tx,
            }),
        };
        if !self.queue.push(job) {
            return Outcome::Lost;
        }
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(v)) => Outcome::Done(v),
            Ok(Err(_)) => Outcome::Lost,
            Err(_) if withdraw.now() => Outcome::Busy,
            // Started: it runs to the end, and its caller hears how it went.
            Err(_) => match rx.await {
                Ok(v) => Outcome::Done(v),
                Err(_) => Outcome::Lost,
            },
        }
    }

    /// Figures for metrics, now.
    pub fn stats(&self) -> WorkerStats {
        let q = &self.queue;
        WorkerStats {
            size: self.size,
            running: q.running.load(Ordering::Relaxed),
            started: q.started.load(Ordering::Relaxed),
            waited: Duration::from_nanos(q.waited_nanos.load(Ordering::Relaxed)),
            inline: q.inline_started.load(Ordering::Relaxed),
            busy: Duration::from_nanos(q.busy_nanos.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        close(&self.queue);
    }
}

/// Stops the workers; queued jobs are dropped, so their callers see `Lost`.
fn close(queue: &Queue) {
    let dropped = {
        let mut p = queue.lock();
        p.closed = true;
        std::mem::take(&mut p.jobs)
    };
    queue.ready.notify_all();
    drop(dropped);
}

fn work(queue: &Queue) {
    let mut answers: Vec<Box<dyn Task>> = Vec::with_capacity(DELIVERY_BATCH);
    let mut oldest: Option<Instant> = None;
    loop {
        let job = match queue.try_pop() {
            Some(job) => job,
            None => {
                deliver(&mut answers);
                oldest = None;
                match queue.pop() {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        if job
            .state
            .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue; // withdrawn by its caller
        }
        let waited = u64::try_from(job.queued_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        queue.started.fetch_add(1, Ordering::Relaxed);
        queue.waited_nanos.fetch_add(waited, Ordering::Relaxed);
        queue.running.fetch_add(1, Ordering::Relaxed);
        // A panicking job loses its answer (the caller sees `Lost`), never the worker.
        let mut task = job.task;
        let started = Instant::now();
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| task.run())).is_ok();
        let took = started.elapsed();
        queue.record(took);
        if ran {
            answers.push(task);
            oldest.get_or_insert_with(Instant::now);
        }
        queue.running.fetch_sub(1, Ordering::Relaxed);
        // A job as long as the delay says the device is slow: holding its answer for the next
        // job would add a whole device call to its latency.
        if answers.len() >= DELIVERY_BATCH
            || took >= DELIVERY_DELAY
            || oldest.is_some_and(|t| t.elapsed() >= DELIVERY_DELAY)
        {
            deliver(&mut answers);
            oldest = None;
        }
    }
}

/// Answers are handed back when the queue runs dry, when this many have gathered, when the
/// oldest has waited [`DELIVERY_DELAY`], or when the job just run took that long: one wake-up
/// of the async runtime then serves a burst of fast calls (a local software token's take
/// ~12 µs), while a slow device's answers go out at once.
const DELIVERY_BATCH: usize = 8;
const DELIVERY_DELAY: Duration = Duration::from_micros(100);

fn deliver(answers: &mut Vec<Box<dyn Task>>) {
    for task in answers.drain(..) {
        task.deliver();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn runs_jobs_off_the_runtime_and_returns_results() {
        rt().block_on(async {
            let w = Workers::start(2).unwrap();
            let name = w
                .call(Duration::from_secs(1), Placement::Anywhere, || {
                    std::thread::current().name().unwrap_or("").to_owned()
                })
                .await;
            assert!(matches!(name, Outcome::Done(n) if n.starts_with("kesh-hsm-")));
            assert_eq!(w.stats().started, 1);
        });
    }

    #[test]
    fn a_job_not_started_in_time_is_withdrawn_unrun() {
        rt().block_on(async {
            let w = Arc::new(Workers::start(1).unwrap());
            let (release, blocked) = std::sync::mpsc::channel::<()>();
            let busy = {
                let w = w.clone();
                tokio::spawn(async move {
                    w.call(Duration::from_secs(5), Placement::Anywhere, move || {
                        blocked.recv().is_ok()
                    })
                    .await
                })
            };
            while w.stats().running == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            let second = w
                .call(Duration::from_millis(50), Placement::Anywhere, move || {
                    r.store(true, Ordering::SeqCst)
                })
                .await;
            assert!(matches!(second, Outcome::Busy));
            release.send(()).unwrap();
            assert!(matches!(busy.await.unwrap(), Outcome::Done(true)));
            // The withdrawn job is skipped, not run late.
            let after = w
                .call(Duration::from_secs(1), Placement::Anywhere, || 7)
                .await;
            assert!(matches!(after, Outcome::Done(7)));
            assert!(!ran.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn a_slow_jobs_answer_is_not_held_while_the_next_job_runs() {
        rt().block_on(async {
            let w = Arc::new(Workers::start(1).unwrap());
            let queue = w.queue.clone();
            let first = {
                let w = w.clone();
                tokio::spawn(async move {
                    w.call(Duration::from_secs(5), Placement::Worker, move || {
                        // A network HSM's call, which ends once the second job is queued.
                        while queue.lock().jobs.is_empty() {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        1
                    })
                    .await
                })
            };
            while w.stats().running == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Queued behind the first on the one worker, and blocked until released.
            let (release, blocked) = std::sync::mpsc::channel::<()>();
            let second = {
                let w = w.clone();
                tokio::spawn(async move {
                    w.call(Duration::from_secs(5), Placement::Worker, move || {
                        blocked.recv_timeout(Duration::from_secs(10)).is_ok()
                    })
                    .await
                })
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), first).await;
            release.send(()).unwrap();
            assert!(
                matches!(answer, Ok(Ok(Outcome::Done(1)))),
                "the first answer waited for the second job"
            );
            assert!(matches!(second.await.unwrap(), Outcome::Done(true)));
        });
    }

    #[test]
    fn a_started_job_is_waited_for_past_the_wait() {
        rt().block_on(async {
            let w = Workers::start(1).unwrap();
            let slow = w
                .call(Duration::from_millis(10), Placement::Anywhere, || {
                    std::thread::sleep(Duration::from_millis(100));
                    "done"
                })
                .await;
            assert!(matches!(slow, Outcome::Done("done")));
        });
    }

    fn on_worker() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("kesh-hsm-"))
    }

    #[test]
    fn fast_jobs_run_on_the_runtime_thread_once_the_device_has_shown_it_is_fast() {
        rt().block_on(async {
            let w = Workers::start(2).unwrap();
            // A device is slow until shown otherwise: the first jobs go to the workers.
            assert!(matches!(
                w.call(Duration::from_secs(1), Placement::Anywhere, on_worker)
                    .await,
                Outcome::Done(true)
            ));
            for _ in 0..64 {
                w.call(Duration::from_secs(1), Placement::Anywhere, || ())
                    .await;
            }
            let mut inline = 0;
            for _ in 0..16 {
                if let Outcome::Done(false) = w
                    .call(Duration::from_secs(1), Placement::Anywhere, on_worker)
                    .await
                {
                    inline += 1;
                }
            }
            assert_eq!(inline, 16);
            assert!(w.stats().inline >= 16);
            // However fast the device: a job that may wait on a lock stays off the runtime.
            let inline_before = w.stats().inline;
            assert!(matches!(
                w.call(Duration::from_secs(1), Placement::Worker, on_worker)
                    .await,
                Outcome::Done(true)
            ));
            assert_eq!(w.stats().inline, inline_before);
        });
    }

    #[test]
    fn a_slow_devices_jobs_stay_on_the_workers() {
        rt().block_on(async {
            let w = Workers::start(2).unwrap();
            for _ in 0..64 {
                w.call(Duration::from_secs(1), Placement::Anywhere, || ())
                    .await;
            }
            // The device turns slow (a network HSM's round trip): a few calls move it off.
            let slow = || std::thread::sleep(INLINE_MAX * 4);
            for _ in 0..8 {
                w.call(Duration::from_secs(1), Placement::Anywhere, slow)
                    .await;
            }
            let inline_before = w.stats().inline;
            for _ in 0..8 {
                let ran_on_worker = w
                    .call(Duration::from_secs(1), Placement::Anywhere, move || {
                        slow();
                        on_worker()
                    })
                    .await;
                assert!(matches!(ran_on_worker, Outcome::Done(true)));
            }
            assert_eq!(w.stats().inline, inline_before);
        });
    }

    #[test]
    fn a_job_that_hangs_inline_leaves_the_runtime_a_thread() {
        rt().block_on(async {
            let w = Arc::new(Workers::start(2).unwrap());
            for _ in 0..64 {
                w.call(Duration::from_secs(1), Placement::Anywhere, || ())
                    .await;
            }
            // A fast device hangs without warning, in a job running inline, and a second
            // request arrives while it does: the runtime (two threads) must keep serving.
            let (release, hung) = std::sync::mpsc::channel::<()>();
            let entered = Arc::new(AtomicBool::new(false));
            let hanging = {
                let (w, entered) = (w.clone(), entered.clone());
                tokio::spawn(async move {
                    w.call(Duration::from_secs(5), Placement::Anywhere, move || {
                        entered.store(true, Ordering::SeqCst);
                        hung.recv().is_ok() && !on_worker()
                    })
                    .await
                })
            };
            while !entered.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let second = tokio::time::timeout(
                Duration::from_secs(2),
                w.call(Duration::from_secs(1), Placement::Anywhere, on_worker),
            )
            .await;
            // Served, and by a worker: the one inline place was taken.
            assert!(matches!(second, Ok(Outcome::Done(true))), "{second:?}");
            let ticked = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::time::sleep(Duration::from_millis(10)),
            )
            .await;
            assert!(ticked.is_ok());
            release.send(()).unwrap();
            assert!(matches!(hanging.await.unwrap(), Outcome::Done(true)));
        });
    }

    #[test]
    fn a_current_thread_runtime_never_runs_jobs_inline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = Workers::start(1).unwrap();
            for _ in 0..64 {
                let ran = w
                    .call(Duration::from_secs(1), Placement::Anywhere, on_worker)
                    .await;
                assert!(matches!(ran, Outcome::Done(true)));
            }
            assert_eq!(w.stats().inline, 0);
        });
    }

    #[test]
    fn a_panicking_job_costs_its_answer_not_the_worker() {
        rt().block_on(async {
            let w = Workers::start(1).unwrap();
            let lost: Outcome<()> = w
                .call(Duration::from_secs(1), Placement::Anywhere, || {
                    panic!("job bug")
                })
                .await;
            assert!(matches!(lost, Outcome::Lost));
            assert!(matches!(
                w.call(Duration::from_secs(1), Placement::Anywhere, || 1)
                    .await,
                Outcome::Done(1)
            ));
        });
    }
}
