//! Polling instead of fixed sleeps.

use std::time::{Duration, Instant};

/// Calls `check` every 20 ms until it returns true or `timeout` passes.
/// Returns whether it became true.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`], panicking with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, check),
        "timed out after {timeout:?} waiting for {what}"
    );
}
