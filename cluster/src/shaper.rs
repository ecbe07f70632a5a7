//! Shaping of the frames that leave a hub's port, as `tc netem` and `tbf` would on a link: a
//! [`Shape`] (delay ± uniform jitter, loss, a rate), decided per frame by a [`Link`] in the
//! forwarding thread, and the frames to send later held by a [`Shaper`]: one thread per hub
//! with a bounded priority queue by due time, waiting on a condition variable until the
//! earliest is due (or a new one is earlier), so that a delayed frame never blocks forwarding.
//!
//! Per link, in order: a frame is lost with probability `loss` (counted `lost`); then, with a
//! rate, it takes tokens from a bucket (bytes, refilled at `rate` per second, holding at most
//! 10 ms of the rate and at least two full-size frames); a frame that finds too few waits for
//! them, and one that would wait for more than [`RATE_QUEUE`] bytes' worth is dropped (the
//! link's queue is full: `shaped_dropped`); then it is delayed by `delay` ± a uniform `jitter`.
//! Frames of one link leave in the order they came (a jittered frame never overtakes an
//! earlier one: TCP sees delay variation, not reordering). The queue of a hub holds at most
//! [`SHAPE_QUEUE_BYTES`] (frames, their destinations and bookkeeping); a frame that does not
//! fit is dropped (`shaped_dropped`).

use std::collections::BinaryHeap;
use std::io::Read as _;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use drydock_gc::Deadline;

/// How the frames leaving a port are shaped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub delay: Duration,
    pub jitter: Duration,
    /// 0.0..=1.0
    pub loss: f64,
    /// bytes per second; None = unlimited
    pub rate: Option<u64>,
}

/// The most bytes a rate-limited link queues (waiting for tokens) before it drops frames.
pub const RATE_QUEUE: u64 = 256 << 10;
/// The most bytes a hub holds for later delivery (all its shaped links together).
pub const SHAPE_QUEUE_BYTES: usize = 8 << 20;
/// A full-size Ethernet frame (without its FCS), the least a token bucket must hold twice.
const FULL_FRAME: f64 = 1514.0;

/// A small, fast generator (xorshift64*) for loss and jitter: not for secrets.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from the kernel's random source, or from the clock if that cannot be read.
    pub(crate) fn seeded() -> Self {
        let mut b = [0u8; 8];
        let seed = match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b))
        {
            Ok(()) => u64::from_ne_bytes(b),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        };
        Self::from_seed(seed)
    }

    pub(crate) fn from_seed(seed: u64) -> Self {
        // xorshift's state must not be zero.
        Self(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What becomes of one frame on a shaped link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send it now.
    Now,
    /// Hold it until then.
    At(Instant),
    /// Lost (the shape's `loss`).
    Lost,
    /// The link's queue is full (or its rate is zero).
    Overflow,
}

/// One shaped port's state: its shape, its token bucket and when its last frame leaves.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    shape: Shape,
    tokens: f64,
    at: Instant,
    last_due: Instant,
}

impl Link {
    pub(crate) fn new(shape: Shape, now: Instant) -> Self {
        let tokens = shape.rate.map(burst).unwrap_or(0.0);
        Self {
            shape,
            tokens,
            at: now,
            last_due: now,
        }
    }

    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The fate of a frame of `len` bytes that arrives at `now`.
    pub(crate) fn decide(&mut self, len: usize, now: Instant, rng: &mut Rng) -> Verdict {
        if self.shape.loss > 0.0 && rng.unit() < self.shape.loss {
            return Verdict::Lost;
        }
        let mut due = now;
        if let Some(rate) = self.shape.rate {
            if rate == 0 {
                return Verdict::Overflow;
            }
            let rate_f = rate as f64;
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate_f).min(burst(rate));
            self.at = self.at.max(now);
            let left = self.tokens - len as f64;
            if left < -(RATE_QUEUE as f64) {
                return Verdict::Overflow;
            }
            self.tokens = left;
            if left < 0.0 {
                due += Duration::from_secs_f64(-left / rate_f);
            }
        }
        due += self.delay(rng);
        due = due.max(self.last_due);
        self.last_due = due;
        if due <= now {
            Verdict::Now
        } else {
            Verdict::At(due)
        }
    }

    /// `delay` ± a uniform `jitter`, never below zero.
    fn delay(&self, rng: &mut Rng) -> Duration {
        let (d, j) = (self.shape.delay, self.shape.jitter);
        if j.is_zero() {
            return d;
        }
        let offset = j.as_secs_f64() * (2.0 * rng.unit() - 1.0);
        Duration::from_secs_f64((d.as_secs_f64() + offset).max(0.0))
    }
}

/// The bucket's size at `rate` bytes per second: 10 ms of it, at least two full-size frames.
fn burst(rate: u64) -> f64 {
    (rate as f64 / 100.0).max(2.0 * FULL_FRAME)
}

/// An item held until its time, and the bytes it is counted as.
#[derive(Debug)]
struct Held<T> {
    due: Instant,
    seq: u64,
    bytes: usize,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    /// Reversed: the max-heap's top is the earliest due (the first held among equals).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Debug)]
struct Queue<T> {
    heap: BinaryHeap<Held<T>>,
    bytes: usize,
    cap: usize,
    seq: u64,
    stopped: bool,
}

#[derive(Debug)]
struct Shared<T> {
    queue: Mutex<Queue<T>>,
    wake: Condvar,
}

/// A thread that hands each held item to its `deliver` function at the item's due time.
#[derive(Debug)]
pub(crate) struct Shaper<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T: Send + 'static> Shaper<T> {
    /// Start the thread `name`, holding at most `cap` bytes.
    pub(crate) fn start(
        name: String,
        cap: usize,
        deliver: impl FnMut(T) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                heap: BinaryHeap::new(),
                bytes: 0,
                cap,
                seq: 0,
                stopped: false,
            }),
            wake: Condvar::new(),
        });
        let thread = std::thread::Builder::new().name(name).spawn({
            let shared = shared.clone();
            move || run(&shared, deliver)
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hold `item` until `due`, counted as `bytes` (what it owns) and its place in the queue;
    /// `false` (and the item dropped) if the queue has no room for it.
    pub(crate) fn hold(&self, due: Instant, bytes: usize, item: T) -> bool {
        let bytes = bytes + std::mem::size_of::<Held<T>>();
        let mut q = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if q.bytes + bytes > q.cap {
            return false;
        }
        q.seq += 1;
        let seq = q.seq;
        let earliest = q.heap.peek().is_none_or(|top| due < top.due);
        q.heap.push(Held {
            due,
            seq,
            bytes,
            item,
        });
        q.bytes += bytes;
        drop(q);
        if earliest {
            self.shared.wake.notify_one();
        }
        true
    }

    /// The bytes held now.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    /// Stop the thread (what is held is dropped) and join it. Idempotent.
    pub(crate) fn stop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopped = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<T: Send + 'static> Drop for Shaper<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<T>(shared: &Shared<T>, mut deliver: impl FnMut(T)) {
    let mut due = Vec::new();
    let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if q.stopped {
            return;
        }
        let now = Instant::now();
        while q.heap.peek().is_some_and(|top| top.due <= now) {
            if let Some(h) = q.heap.pop() {
                q.bytes -= h.bytes;
                due.push(h.item);
            }
        }
        if !due.is_empty() {
            // Delivered without the lock: the forwarding thread keeps holding frames meanwhile.
            drop(q);
            due.drain(..).for_each(&mut deliver);
            q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        // Until the earliest is due, a new earlier one comes, or the stop.
        q = match q.heap.peek().map(|top| Deadline::at(top.due)) {
            Some(d) => {
                shared
                    .wake
                    .wait_timeout(q, d.remaining())
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_generator_is_uniform_enough_and_never_stuck() {
        let mut r = Rng::from_seed(0);
        let n = 100_000;
        let below = (0..n).filter(|_| r.unit() < 0.25).count();
        assert!((23_000..27_000).contains(&below), "{below}");
        let mut s = Rng::seeded();
        assert_ne!(s.next_u64(), s.next_u64());
        assert!((0..1000).all(|_| (0.0..1.0).contains(&s.unit())));
    }

    #[test]
    fn loss_drops_about_its_share_and_all_or_none_at_the_ends() {
        let now = Instant::now();
        let mut rng = Rng::from_seed(42);
        let mut count = |loss: f64| {
            let mut l = Link::new(
                Shape {
                    loss,
                    ..Shape::default()
                },
                now,
            );
            (0..10_000)
                .filter(|_| l.decide(100, now, &mut rng) == Verdict::Lost)
                .count()
        };
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), 10_000);
        let some = count(0.05);
        assert!((350..650).contains(&some), "{some}");
    }

    #[test]
    fn delay_and_jitter_stay_in_their_bounds_and_keep_the_order() {
        let now = Instant::now();
        let mut rng = Rng::from_seed(7);
        let mut l = Link::new(
            Shape {
                delay: 100 * MS,
                jitter: 10 * MS,
                ..Shape::default()
            },
            now,
        );
        let mut last = now;
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..1000u32 {
            let t = now + i * MS;
            let Verdict::At(due) = l.decide(100, t, &mut rng) else {
                panic!("not held")
            };
            assert!(due >= last, "frame {i} overtook an earlier one");
            last = due;
            let d = due - t;
            assert!(d >= 90 * MS && d <= 110 * MS, "{d:?}");
            spread = (spread.0.min(d), spread.1.max(d));
        }
        assert!(spread.1 - spread.0 > 10 * MS, "no jitter: {spread:?}");
        // No shape but loss: sent at once.
        let mut plain = Link::new(Shape::default(), now);
        assert_eq!(plain.decide(100, now, &mut rng), Verdict::Now);
    }

    #[test]
    fn a_rate_paces_frames_and_drops_past_its_queue() {
        let now = Instant::now();
        let mut rng = Rng::from_seed(1);
        let rate = 1_000_000; // 1 MB/s: 10 ms of it is the 10,000-byte bucket
        let mut l = Link::new(
            Shape {
                rate: Some(rate),
                ..Shape::default()
            },
            now,
        );
        // The bucket's 10,000 bytes go at once.
        for _ in 0..10 {
            assert_eq!(l.decide(1000, now, &mut rng), Verdict::Now);
        }
        // Then each 1000 bytes waits 1 ms more.
        let mut held = 0u64;
        loop {
            match l.decide(1000, now, &mut rng) {
                Verdict::At(due) => {
                    held += 1;
                    let want = Duration::from_micros(1000 * held);
                    let got = due - now;
                    assert!(got.abs_diff(want) < Duration::from_micros(5), "{got:?}");
                }
                Verdict::Overflow => break,
                v => panic!("{v:?}"),
            }
        }
        // The queue: RATE_QUEUE bytes' worth.
        assert_eq!(held, RATE_QUEUE / 1000);
        // Time refills the bucket: after the queue has drained and 10 ms more, a burst again.
        let later = now + Duration::from_secs(1);
        assert_eq!(l.decide(1000, later, &mut rng), Verdict::Now);
        let mut zero = Link::new(
            Shape {
                rate: Some(0),
                ..Shape::default()
            },
            now,
        );
        assert_eq!(zero.decide(60, now, &mut rng), Verdict::Overflow);
    }

    #[test]
    fn held_items_come_out_at_their_time_in_time_order() {
        let (tx, rx) = mpsc::channel();
        let mut s = Shaper::start("shaper-test".into(), 1000, move |x: (u32, Instant)| {
            let _ = tx.send((x.0, x.1, Instant::now()));
        })
        .unwrap();
        let t0 = Instant::now();
        // Held out of order; an earlier one after a later one wakes the thread sooner.
        for (n, ms) in [(3, 300), (1, 100), (2, 200), (0, 0)] {
            let due = t0 + ms * MS;
            assert!(s.hold(due, 0, (n, due)));
        }
        for want in 0..4 {
            let (n, due, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(n, want);
            assert!(at >= due, "item {n} came {:?} early", due - at);
        }
        assert_eq!(s.held_bytes(), 0);
        // The bound: 1000 bytes, each item's place in the queue counted.
        let o = std::mem::size_of::<Held<(u32, Instant)>>();
        let later = t0 + Duration::from_secs(3600);
        assert!(s.hold(later, 600 - o, (9, later)));
        assert!(!s.hold(later, 600 - o, (10, later)), "over the cap");
        assert!(s.hold(later, 400 - o, (11, later)));
        assert_eq!(s.held_bytes(), 1000);
        // Stopping does not wait for what is held.
        let t = Instant::now();
        s.stop();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(rx.try_recv().is_err());
    }
}
