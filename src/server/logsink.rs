//! Buffered line output for logs written on the request path (the audit trail on stdout).
//!
//! A request appends its line to a shared buffer; one flusher thread writes the buffer out a
//! moment later ([`FLUSH_DELAY`]), so under load hundreds of lines share one `write` instead
//! of each request paying a system call (measured: a synchronous line per request cost a
//! quarter of the server's throughput). [`LineSink::flush`] writes everything out at once, for
//! shutdown. When the output stalls (a full pipe), writers wait once [`MAX_BUFFERED`] bytes
//! are pending rather than drop audit records.
//!
//! Owns the buffer, the flusher thread and the output; knows nothing of what the lines say.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::locks::IgnorePoison;

/// How long a line may wait for company before it is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);
/// Bytes pending before writers wait for the output.
pub const MAX_BUFFERED: usize = 1 << 20;

struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Signalled when the buffer goes from empty to not, and when it drains.
    changed: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

/// A buffered, line-oriented output. Cheap to clone.
#[derive(Clone)]
pub struct LineSink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineSink").finish_non_exhaustive()
    }
}

impl LineSink {
    /// The process's stdout sink (one flusher thread, however many callers).
    pub fn stdout() -> LineSink {
        static STDOUT: OnceLock<LineSink> = OnceLock::new();
        STDOUT
            .get_or_init(|| LineSink::new(Box::new(std::io::stdout())))
            .clone()
    }

    /// A sink writing to `out`, with its own flusher thread.
    pub fn new(out: Box<dyn Write + Send>) -> LineSink {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            changed: Condvar::new(),
            out: Mutex::new(out),
        });
        let flusher = shared.clone();
        // Without the thread lines are still written, by `flush` and by writers at the cap.
        let _ = std::thread::Builder::new()
            .name("kesh-log".into())
            .spawn(move || flush_forever(&flusher));
        LineSink { shared }
    }

    /// Appends one line; `fill` writes it (without the newline) into the buffer.
    pub fn line(&self, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut pending = self.shared.pending.lock().ignore_poison();
        while pending.len() >= MAX_BUFFERED {
            pending = self.shared.changed.wait(pending).ignore_poison();
        }
        let was_empty = pending.is_empty();
        fill(&mut pending);
        pending.push(b'\n');
        drop(pending);
        if was_empty {
            self.shared.changed.notify_all();
        }
    }

    /// Writes out everything appended so far.
    pub fn flush(&self) {
        write_out(&self.shared);
    }
}

fn write_out(shared: &Shared) {
    // Holding the output lock across the swap keeps lines in order between two flushers.
    let mut out = shared.out.lock().ignore_poison();
    let batch = std::mem::take(&mut *shared.pending.lock().ignore_poison());
    shared.changed.notify_all();
    if !batch.is_empty() {
        // Nowhere to report a failing stdout; the lines are lost as a direct write's would be.
        let _ = out.write_all(&batch);
        let _ = out.flush();
    }
}

fn flush_forever(shared: &Shared) {
    loop {
        {
            let mut pending = shared.pending.lock().ignore_poison();
            while pending.is_empty() {
                pending = shared.changed.wait(pending).ignore_poison();
            }
        }
        std::thread::sleep(FLUSH_DELAY);
        write_out(shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().ignore_poison().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_without_an_explicit_flush() {
        let out = Capture::default();
        let sink = LineSink::new(Box::new(out.clone()));
        for i in 0..1000 {
            sink.line(|b| b.extend_from_slice(format!("line {i}").as_bytes()));
        }
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for _ in 0..500 {
            if out.0.lock().ignore_poison().len() == want.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            String::from_utf8(out.0.lock().ignore_poison().clone()).unwrap(),
            want
        );
    }

    #[test]
    fn flush_writes_everything_at_once() {
        let out = Capture::default();
        let sink = LineSink::new(Box::new(out.clone()));
        sink.line(|b| b.extend_from_slice(b"last words"));
        sink.flush();
        assert_eq!(&*out.0.lock().ignore_poison(), b"last words\n");
    }
}
