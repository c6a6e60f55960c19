//! How failures are retried: the policy (how long, how fast) and the state
//! of one outage. Used by writers (reconnecting to a target node) and by
//! the coordinator's supervisor (restarting a shard worker).

use std::time::{Duration, Instant};

/// Backoff between reconnection attempts, and how long to keep trying.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Give up when an outage lasts longer than this.
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A connection that answers nothing for this long is dropped and
    /// opened again (a frozen or half-dead peer).
    pub reply_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(720 * 60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(120),
        }
    }
}

/// The state of one outage: when it began and the next delay. An outage
/// ends only when a new connection made progress, so a failure that recurs
/// right after each reconnection still runs into the policy's timeout.
#[derive(Debug)]
pub struct Backoff {
    started: Instant,
    next: Duration,
}

impl Backoff {
    pub fn start(policy: &RetryPolicy) -> Backoff {
        Backoff {
            started: Instant::now(),
            next: policy.initial_backoff,
        }
    }

    /// The delay before the next attempt, or `None` when the outage has
    /// outlasted the policy's timeout.
    pub fn next_delay(&mut self, policy: &RetryPolicy) -> Option<Duration> {
        if self.started.elapsed() >= policy.timeout {
            return None;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(policy.max_backoff);
        Some(delay)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stop_at_the_timeout() {
        let policy = RetryPolicy {
            timeout: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..RetryPolicy::default()
        };
        let mut b = Backoff::start(&policy);
        let delays: Vec<u128> = (0..4)
            .map(|_| b.next_delay(&policy).unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        let expired = RetryPolicy {
            timeout: Duration::ZERO,
            ..policy
        };
        assert_eq!(Backoff::start(&expired).next_delay(&expired), None);
    }
}
