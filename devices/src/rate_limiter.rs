//! Token-bucket rate limiting for device I/O (Firecracker's model): one bucket for bytes
//! (bandwidth) and one for operations, each refilled linearly with `size` tokens per
//! `refill_time_ms`, plus an optional `one_time_burst` spent first and never refilled.
//!
//! A consumer asks [`RateLimiter::consume`] before starting an operation. When a bucket is
//! short, the limiter arms its timerfd for the moment the bucket will hold enough tokens and
//! reports itself blocked: the consumer puts the request back, waits for the timerfd to become
//! readable, calls [`RateLimiter::event_handler`] and retries. Nothing is dropped.
//!
//! **Requests larger than the bucket.** A request of more tokens than `size` could never fit.
//! Rule: such a request is admitted once the bucket is full (after the one-time burst has
//! paid what it can), and the bucket goes into debt (a negative budget) for the excess; later
//! requests wait until the debt is refilled. The request passes after at most one
//! `refill_time_ms`, and the long-run rate stays `size` per `refill_time_ms`.
//!
//! Time is a parameter of the bucket arithmetic ([`TokenBucket::reduce`] and friends take
//! `now`), so tests drive the clock; [`RateLimiter::consume`] passes `Instant::now()`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

const NANOS_PER_MS: u128 = 1_000_000;
/// The shortest timer the limiter arms; a zero duration would disarm the timerfd instead.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// One token bucket as the user configures it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// Tokens added per refill period, and the most the bucket holds.
    pub size: u64,
    /// Tokens available once, on top of `size`, spent before the bucket; never refilled.
    pub one_time_burst: u64,
    /// The time in which an empty bucket refills to `size`, in milliseconds.
    pub refill_time_ms: u64,
}

/// The limits of one device: `None` means that resource is not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Bytes moved by reads and writes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests.
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimitConfig {
    /// Checks that every configured bucket can refill; the error names the field.
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        for (name, bucket) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            let Some(bucket) = bucket else { continue };
            if bucket.size == 0 {
                return Err(RateLimiterError::ZeroField {
                    bucket: name,
                    field: "size",
                });
            }
            if bucket.refill_time_ms == 0 {
                return Err(RateLimiterError::ZeroField {
                    bucket: name,
                    field: "refill_time_ms",
                });
            }
        }
        Ok(())
    }
}

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// A byte of data.
    Bytes,
    /// One request.
    Ops,
}

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("rate limit {bucket}.{field} must be greater than zero (omit the {bucket} bucket for no limit)")]
    ZeroField {
        bucket: &'static str,
        field: &'static str,
    },
    #[error("cannot create the rate limiter's timer")]
    Timer(#[source] io::Error),
    #[error("cannot read the rate limiter's timer")]
    ReadTimer(#[source] io::Error),
}

/// A token bucket with a linear refill. Budget may go negative (see the module doc).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_time_ns: u128,
    one_time_burst: u64,
    /// Tokens available; negative while paying off an oversized request.
    budget: i128,
    /// Refill progress below one token, in token-nanoseconds (`elapsed_ns * size`), so no
    /// fraction of a token is lost between refills.
    carry: u128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket. `config` must have passed [`RateLimitConfig::validate`]; a zero
    /// refill time is treated as one millisecond rather than dividing by zero.
    pub fn new(config: TokenBucketConfig, now: Instant) -> Self {
        Self {
            size: config.size,
            refill_time_ns: u128::from(config.refill_time_ms.max(1)) * NANOS_PER_MS,
            one_time_burst: config.one_time_burst,
            budget: i128::from(config.size),
            carry: 0,
            last_update: now,
        }
    }

    /// Tokens in the bucket now (negative while in debt), burst excluded.
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_ns = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = self.last_update.max(now);
        let size = i128::from(self.size);
        if self.budget >= size {
            self.carry = 0;
            return;
        }
        self.carry = self
            .carry
            .saturating_add(elapsed_ns.saturating_mul(u128::from(self.size)));
        let added = self.carry / self.refill_time_ns;
        self.carry %= self.refill_time_ns;
        let added = i128::try_from(added).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(added).min(size);
        if self.budget == size {
            self.carry = 0;
        }
    }

    /// Takes `tokens` at time `now` if they are there (burst first); returns whether it did.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = tokens.min(self.one_time_burst);
        let need = i128::from(tokens - from_burst);
        let size = i128::from(self.size);
        let fits = need <= self.budget || (need > size && self.budget >= size);
        if fits {
            self.one_time_burst -= from_burst;
            self.budget -= need;
        }
        fits
    }

    /// Gives back `tokens` taken for an operation that did not start (capped at `size`).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self
            .budget
            .saturating_add(i128::from(tokens))
            .min(i128::from(self.size));
    }

    /// How long until `reduce(tokens)` can succeed, counted from the last update.
    pub fn time_until_available(&self, tokens: u64) -> Duration {
        let need = i128::from(tokens.saturating_sub(self.one_time_burst));
        let size = i128::from(self.size);
        let target = need.min(size);
        let deficit = target.saturating_sub(self.budget);
        if deficit <= 0 {
            return Duration::ZERO;
        }
        // deficit > 0 here, so the conversion cannot fail.
        let deficit = u128::try_from(deficit).unwrap_or(u128::MAX);
        let needed = deficit
            .saturating_mul(self.refill_time_ns)
            .saturating_sub(self.carry);
        let ns = needed.div_ceil(u128::from(self.size.max(1)));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// A bandwidth and an ops bucket with the timer that wakes a blocked consumer.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with full buckets; `RateLimitConfig::default()` limits nothing.
    pub fn new(config: RateLimitConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let timer = TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(RateLimiterError::Timer)?;
        let now = Instant::now();
        Ok(Self {
            bandwidth: config.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: config.ops.map(|c| TokenBucket::new(c, now)),
            timer,
            blocked: false,
        })
    }

    /// Whether a bucket ran short and the timer has not fired yet.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `tokens` of `kind` now; see [`Self::consume_at`].
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        self.consume_at(tokens, kind, Instant::now())
    }

    /// Takes `tokens` of `kind` at time `now`. Returns false while blocked or when the bucket
    /// is short; then the timer is armed for when it will not be.
    pub fn consume_at(&mut self, tokens: u64, kind: TokenType, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else { return true };
        if bucket.reduce(tokens, now) {
            return true;
        }
        let wait = bucket.time_until_available(tokens).max(MIN_WAIT);
        match self.timer.reset(wait, None) {
            Ok(()) => {
                self.blocked = true;
                false
            }
            Err(e) => {
                // Without a timer nothing would wake the consumer: let the request through.
                tracing::error!(error = %e, "cannot arm the rate limiter's timer; not limiting");
                true
            }
        }
    }

    /// Returns `tokens` of `kind` taken for an operation that did not start.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        let bucket = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(bucket) = bucket {
            bucket.replenish(tokens);
        }
    }

    /// Handles the timer becoming readable: the consumer may retry.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer.wait() {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(RateLimiterError::ReadTimer(e.into())),
        }
        self.blocked = false;
        Ok(())
    }

    /// Replaces the limits while running: new buckets start full, and a blocked consumer is
    /// released so it retries under the new limits.
    pub fn update(&mut self, config: RateLimitConfig) -> Result<(), RateLimiterError> {
        config.validate()?;
        let now = Instant::now();
        self.bandwidth = config.bandwidth.map(|c| TokenBucket::new(c, now));
        self.ops = config.ops.map(|c| TokenBucket::new(c, now));
        if self.blocked {
            if let Err(e) = self.timer.clear() {
                tracing::warn!(error = %e, "cannot disarm the rate limiter's timer");
            }
            self.blocked = false;
        }
        Ok(())
    }

    /// The bucket of `kind`, if limited.
    pub fn bucket(&self, kind: TokenType) -> Option<&TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_ref(),
            TokenType::Ops => self.ops.as_ref(),
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to watch for readability while blocked.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own (the limiter's timerfd, alive for this call);
    // no memory is passed and the result is checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL only changes the descriptor's status flags.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1000 tokens per 100 ms: 10 tokens per millisecond.
    const BUCKET: TokenBucketConfig = TokenBucketConfig {
        size: 1000,
        one_time_burst: 0,
        refill_time_ms: 100,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_new_starts_full() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(1000, t0));
        assert_eq!(bucket.budget(), 0);
    }

    #[test]
    fn bucket_empty_refuses_until_refilled() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(1000, t0));
        assert!(!bucket.reduce(1, t0));
    }

    #[test]
    fn bucket_refills_linearly_with_time() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(1000, t0));
        // Half the refill time brings back half the size.
        assert!(!bucket.reduce(501, t0 + ms(50)));
        assert!(bucket.reduce(500, t0 + ms(50)));
        assert_eq!(bucket.budget(), 0);
    }

    #[test]
    fn bucket_refill_keeps_fractions_of_tokens() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one token every 3.33 ms.
        let config = TokenBucketConfig {
            size: 3,
            one_time_burst: 0,
            refill_time_ms: 10,
        };
        let mut bucket = TokenBucket::new(config, t0);
        assert!(bucket.reduce(3, t0));
        // Two steps of 5 ms give 1.5 + 1.5 tokens: three, not two.
        assert!(bucket.reduce(1, t0 + ms(5)));
        assert!(bucket.reduce(2, t0 + ms(10)));
    }

    #[test]
    fn bucket_refill_stops_at_size() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(100, t0));
        // A second after, the bucket holds `size`, not the 10_000 tokens of ten periods.
        assert!(bucket.reduce(1000, t0 + ms(1000)));
        assert_eq!(bucket.budget(), 0);
    }

    #[test]
    fn burst_is_spent_first_and_only_once() {
        let t0 = Instant::now();
        let config = TokenBucketConfig {
            one_time_burst: 500,
            ..BUCKET
        };
        let mut bucket = TokenBucket::new(config, t0);
        assert!(bucket.reduce(1500, t0));
        assert_eq!(bucket.one_time_burst(), 0);
        // Half a refill period later only half of `size` is back: the burst does not return.
        assert!(!bucket.reduce(501, t0 + ms(50)));
        assert!(bucket.reduce(500, t0 + ms(50)));
    }

    #[test]
    fn bucket_oversized_request_passes_when_full_and_leaves_debt() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(2500, t0));
        assert_eq!(bucket.budget(), -1500);
        // The debt is paid off at the refill rate: 1500 tokens take 150 ms, then 1 more.
        assert!(!bucket.reduce(1, t0 + ms(150)));
        assert!(bucket.reduce(1, t0 + ms(151)));
    }

    #[test]
    fn bucket_oversized_request_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(600, t0));
        assert!(!bucket.reduce(5000, t0));
        assert_eq!(bucket.time_until_available(5000), ms(60));
        assert!(bucket.reduce(5000, t0 + ms(60)));
    }

    #[test]
    fn bucket_time_until_available_matches_refill_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(1000, t0));
        assert_eq!(bucket.time_until_available(250), ms(25));
    }

    #[test]
    fn bucket_replenish_returns_tokens_up_to_size() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(BUCKET, t0);
        assert!(bucket.reduce(10, t0));
        bucket.replenish(50);
        assert_eq!(bucket.budget(), 1000);
    }

    #[test]
    fn validate_zero_size_names_the_field() {
        let config = RateLimitConfig {
            bandwidth: Some(TokenBucketConfig { size: 0, ..BUCKET }),
            ops: None,
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("bandwidth.size"), "{err}");
    }

    #[test]
    fn validate_zero_refill_time_names_the_field() {
        let config = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                refill_time_ms: 0,
                ..BUCKET
            }),
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("ops.refill_time_ms"), "{err}");
    }

    #[test]
    fn limiter_without_buckets_never_blocks() {
        let mut limiter = RateLimiter::new(RateLimitConfig::default()).unwrap();
        assert!(limiter.consume(u64::MAX, TokenType::Bytes));
        assert!(limiter.consume(u64::MAX, TokenType::Ops));
        assert!(!limiter.is_blocked());
    }

    #[test]
    fn limiter_short_bucket_blocks_and_arms_timer() {
        let config = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        };
        let mut limiter = RateLimiter::new(config).unwrap();
        let t0 = Instant::now();
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        assert!(limiter.is_blocked());
        assert!(limiter.timer.is_armed().unwrap());
    }

    #[test]
    fn limiter_blocked_refuses_other_kinds_too() {
        let config = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        };
        let mut limiter = RateLimiter::new(config).unwrap();
        let t0 = Instant::now();
        assert!(limiter.consume_at(1, TokenType::Ops, t0));
        assert!(!limiter.consume_at(1, TokenType::Ops, t0));
        // Bytes are unlimited, but a blocked limiter keeps requests in order.
        assert!(!limiter.consume_at(1, TokenType::Bytes, t0));
    }

    #[test]
    fn limiter_timer_fires_and_unblocks() {
        let config = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 5,
            }),
        };
        let mut limiter = RateLimiter::new(config).unwrap();
        assert!(limiter.consume(1, TokenType::Ops));
        assert!(!limiter.consume(1, TokenType::Ops));
        std::thread::sleep(ms(20));
        limiter.event_handler().unwrap();
        assert!(limiter.consume(1, TokenType::Ops));
    }

    #[test]
    fn limiter_update_replaces_buckets_and_unblocks() {
        let config = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 60_000,
            }),
        };
        let mut limiter = RateLimiter::new(config).unwrap();
        assert!(limiter.consume(1, TokenType::Ops));
        assert!(!limiter.consume(1, TokenType::Ops));
        limiter.update(RateLimitConfig::default()).unwrap();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(1, TokenType::Ops));
    }

    #[test]
    fn limiter_event_handler_without_expiry_is_harmless() {
        let mut limiter = RateLimiter::new(RateLimitConfig::default()).unwrap();
        limiter.event_handler().unwrap();
        assert!(!limiter.is_blocked());
    }
}
