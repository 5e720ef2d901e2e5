//! The circuit breaker in front of `evaluate` (SPEC §5): after `threshold` consecutive failures
//! nothing is sent for `cooldown`; then one call probes, and its result closes the circuit or
//! opens it again. Time is passed in, so the state machine is tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; every other call is refused until it ends.
    Probing,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// Leave to send one request. Report how it went with [`Permit::success`] or
/// [`Permit::failure`]; a permit dropped unreported (the call was cancelled) says nothing about
/// the service, so a probe dropped that way lets the next call probe instead.
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit to send now, or `None` while the circuit is open.
    pub fn admit(&self, now: Instant) -> Option<Permit<'_>> {
        let mut state = self.state();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now >= until => {
                *state = State::Probing;
                true
            }
            State::Open { .. } | State::Probing => return None,
        };
        Some(Permit {
            breaker: self,
            probe,
            reported: false,
        })
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state(), State::Closed { .. })
    }
}

impl Permit<'_> {
    /// The service answered (any decision, a denial too).
    pub fn success(mut self) {
        self.reported = true;
        *self.breaker.state() = State::Closed { failures: 0 };
    }

    /// The request failed. Returns true when this failure opened the circuit.
    pub fn failure(mut self, now: Instant) -> bool {
        self.reported = true;
        let b = self.breaker;
        let mut state = b.state();
        let open = State::Open {
            until: now + b.cooldown,
        };
        match *state {
            State::Closed { failures } if failures + 1 < b.threshold => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            // Another call's failure may have opened it meanwhile: keep the earlier deadline.
            State::Open { .. } if !self.probe => false,
            _ => {
                *state = open;
                true
            }
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let mut state = self.breaker.state();
            if *state == State::Probing {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_threshold_consecutive_failures_and_successes_reset_the_count() {
        let b = Breaker::new(3, COOL);
        let t = Instant::now();
        assert!(!b.admit(t).unwrap().failure(t));
        assert!(!b.admit(t).unwrap().failure(t));
        b.admit(t).unwrap().success();
        assert!(!b.admit(t).unwrap().failure(t));
        assert!(!b.admit(t).unwrap().failure(t));
        assert!(b.admit(t).unwrap().failure(t), "third in a row opens");
        assert!(b.is_open());
        assert!(b.admit(t + COOL / 2).is_none());
    }

    #[test]
    fn one_probe_after_the_cooldown_closes_or_reopens() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        assert!(b.admit(t).unwrap().failure(t));
        let later = t + COOL;
        let probe = b.admit(later).expect("the cooldown is over: probe");
        assert!(b.admit(later).is_none(), "only one probe at a time");
        assert!(probe.failure(later), "a failed probe re-opens");
        assert!(b.admit(later + COOL / 2).is_none());
        b.admit(later + COOL).expect("probe again").success();
        assert!(!b.is_open());
        assert!(b.admit(later + COOL).is_some());
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_call_probe() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        assert!(b.admit(t).unwrap().failure(t));
        drop(b.admit(t + COOL).expect("probe"));
        assert!(b.admit(Instant::now() + COOL).is_some());
    }

    #[test]
    fn concurrent_failures_while_closed_do_not_extend_an_open_circuit() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        let first = b.admit(t).unwrap();
        let second = b.admit(t).unwrap();
        assert!(first.failure(t));
        assert!(!second.failure(t + COOL / 2));
        assert!(
            b.admit(t + COOL).is_some(),
            "the first failure's deadline holds"
        );
    }
}
