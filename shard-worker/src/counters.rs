//! Counters, each declared once with the metric that exports it.
//!
//! A counter is a relaxed atomic: the worker that bumps it pays one
//! uncontended add, and `/metrics` and `/status` read the same value. The
//! [`counters!`] declaration gives a struct of counters and, beside it, the
//! table of how each is exported ([`MetricDesc`]): adding a counter is one
//! line there plus the event that bumps it (`events.rs`); the coordinator
//! renders every declared counter without knowing it by name.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter or gauge.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Lowers a gauge (never below 0).
    pub fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counter (only ever grows within a sync) or gauge (goes up and down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// How one counter is exported.
#[derive(Clone, Copy, Debug)]
pub struct MetricDesc {
    /// The metric's name without the `shardsync_` prefix.
    pub name: &'static str,
    /// Its help text (a family's first counter gives the family's).
    pub help: &'static str,
    pub kind: MetricKind,
    /// A label this counter's samples carry, for counters that share a
    /// family (`values_converted_total{how="rebuilt"}`).
    pub label: Option<(&'static str, &'static str)>,
}

/// Declares a struct of [`Counter`]s and its `METRICS` table:
///
/// ```text
/// counters! {
///     /// Doc of the struct.
///     pub struct Name {
///         field: Counter "metric_name_total" = "Help, and the field's doc.",
///         other: Counter "family_total" {"label" = "value"} = "...",
///     }
/// }
/// ```
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $field:ident : $kind:ident $metric:literal
                    $({ $lk:literal = $lv:literal })? = $help:literal
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Default, Debug)]
        pub struct $name {
            $(
                #[doc = $help]
                pub $field: $crate::counters::Counter,
            )*
        }

        impl $name {
            /// How each counter is exported, in declaration order.
            pub const METRICS: &'static [$crate::counters::MetricDesc] = &[
                $(
                    $crate::counters::MetricDesc {
                        name: $metric,
                        help: $help,
                        kind: $crate::counters::MetricKind::$kind,
                        label: $crate::counter_label!($($lk, $lv)?),
                    },
                )*
            ];

            /// Every counter with how it is exported.
            pub fn samples(&self) -> impl Iterator<Item = (&'static $crate::counters::MetricDesc, u64)> + '_ {
                let values = [$(self.$field.get()),*];
                Self::METRICS.iter().zip(values)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! counter_label {
    () => {
        None
    };
    ($k:literal, $v:literal) => {
        Some(($k, $v))
    };
}

#[cfg(test)]
mod tests {
    crate::counters! {
        /// Two counters of a test.
        pub struct Demo {
            seen: Counter "demo_seen_total" = "Things seen.",
            kept: Gauge "demo_total" {"how" = "kept"} = "Things, by how.",
        }
    }

    #[test]
    fn declared_counters_export_their_values_in_order() {
        let d = Demo::default();
        d.seen.add(3);
        d.kept.set(7);
        d.kept.sub(9);
        let got: Vec<String> = d
            .samples()
            .map(|(m, v)| format!("{} {:?} {:?} {v}", m.name, m.label, m.kind))
            .collect();
        assert_eq!(
            got,
            [
                "demo_seen_total None Counter 3",
                "demo_total Some((\"how\", \"kept\")) Gauge 0",
            ]
        );
    }
}
