//! `/metrics`: Prometheus text, built at scrape time from the counters the
//! workers keep (so the hot path pays one relaxed atomic add, nothing more).
//! Every metric is prefixed `shardsync_`; labels are `shard` (source
//! `host:port`) and `target` (target node `host:port`), never keys. With
//! several targets, per-shard metrics also carry `target` (the target as
//! named on the command line): each target has its own shard workers.
//!
//! Counters are rendered from their declarations (`ShardCounters::METRICS`,
//! `WriterCounters::METRICS` in `shard-worker`): a new counter needs no
//! line here. This file lists only what is computed from state: the
//! tables below, the shard state, the heartbeat lags and error counts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use shard_worker::counters::{MetricDesc, MetricKind};
use shard_worker::progress::{ErrorClass, ShardState, ShardStats, WriterStats};

use crate::status::{TaskStatus, Workers};

type Labels<'a> = Vec<(&'a str, &'a str)>;

/// A metric of a shard computed from its state.
struct Derived<T> {
    name: &'static str,
    help: &'static str,
    kind: MetricKind,
    value: fn(&T) -> f64,
}

const SHARD_DERIVED: &[Derived<ShardStats>] = &[
    Derived {
        name: "applied_offset_bytes",
        help: "Replication offset confirmed by the targets.",
        kind: MetricKind::Gauge,
        value: |s| s.applied().unwrap_or(0) as f64,
    },
    Derived {
        name: "lag_seconds",
        help: "Age of the oldest command read but not yet applied.",
        kind: MetricKind::Gauge,
        value: |s| s.lag_ms() as f64 / 1000.0,
    },
    Derived {
        name: "intake_buffered_bytes",
        help: "Stream bytes read from the source, waiting in memory.",
        kind: MetricKind::Gauge,
        value: |s| s.stream_spill.memory.get() as f64,
    },
    Derived {
        name: "spill_bytes",
        help: "Stream bytes read from the source, waiting in spill files.",
        kind: MetricKind::Gauge,
        value: |s| s.stream_spill.on_disk.get() as f64,
    },
    Derived {
        name: "spilled_bytes_total",
        help: "Stream bytes ever written to spill files.",
        kind: MetricKind::Counter,
        value: |s| s.stream_spill.total.get() as f64,
    },
];

const WRITER_DERIVED: &[Derived<WriterStats>] = &[
    Derived {
        name: "target_connected",
        help: "1 while the writer is connected to the target node.",
        kind: MetricKind::Gauge,
        value: |w| w.connected.load(Ordering::Relaxed) as u8 as f64,
    },
    Derived {
        name: "target_overflow_disk_bytes",
        help: "Overflow bytes in spill files.",
        kind: MetricKind::Gauge,
        value: |w| w.overflow.on_disk.get() as f64,
    },
    Derived {
        name: "target_overflow_spilled_bytes_total",
        help: "Overflow bytes ever written to spill files.",
        kind: MetricKind::Counter,
        value: |w| w.overflow.total.get() as f64,
    },
];

/// Metric families in the order they first get a sample.
#[derive(Default)]
struct Families {
    list: Vec<MetricFamily>,
    index: HashMap<&'static str, usize>,
}

impl Families {
    fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let i = *self.index.entry(name).or_insert_with(|| {
            let mut family = MetricFamily::default();
            family.set_name(format!("shardsync_{name}"));
            family.set_help(help.to_string());
            family.set_field_type(match kind {
                MetricKind::Counter => MetricType::COUNTER,
                MetricKind::Gauge => MetricType::GAUGE,
            });
            self.list.push(family);
            self.list.len() - 1
        });
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        match kind {
            MetricKind::Counter => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            MetricKind::Gauge => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.list[i].mut_metric().push(m);
    }

    /// A declared counter's sample.
    fn declared(&mut self, desc: &'static MetricDesc, labels: &[(&str, &str)], value: u64) {
        let labels = match desc.label {
            Some(extra) => with(labels, extra),
            None => labels.to_vec(),
        };
        self.sample(desc.name, desc.help, desc.kind, &labels, value as f64);
    }

    fn derived<T>(&mut self, table: &[Derived<T>], of: &T, labels: &[(&str, &str)]) {
        for d in table {
            self.sample(d.name, d.help, d.kind, labels, (d.value)(of));
        }
    }

    fn encode(self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.list, &mut out)
            .expect("text encoding of well-formed families");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// Renders every metric of the task.
pub fn render(status: &TaskStatus) -> String {
    let mut out = Families::default();
    let running = !matches!(status.state(), "stopped" | "failed");
    out.sample(
        "up",
        "1 while the task runs (0 once stopped or failed).",
        MetricKind::Gauge,
        &[],
        if running { 1.0 } else { 0.0 },
    );
    out.sample(
        "process_resident_memory_bytes",
        "Resident memory of the shardsync process.",
        MetricKind::Gauge,
        &[],
        resident_memory_bytes() as f64,
    );
    let groups = status.groups();
    let many = groups.len() > 1;
    for g in &groups {
        for s in &g.shards() {
            let labels: Labels = if many {
                vec![("shard", s.source.as_str()), ("target", g.target.as_str())]
            } else {
                vec![("shard", s.source.as_str())]
            };
            shard_metrics(&mut out, g, s, &labels);
        }
    }
    for w in groups.iter().flat_map(|g| g.writers()) {
        writer_metrics(&mut out, &w);
    }
    out.encode()
}

fn shard_metrics(out: &mut Families, group: &Workers, s: &ShardStats, labels: &[(&str, &str)]) {
    let current = group.shard_state(s);
    for st in ShardState::ALL {
        out.sample(
            "shard_state",
            "1 for the state each shard is in.",
            MetricKind::Gauge,
            &with(labels, ("state", st.as_str())),
            (st == current) as u8 as f64,
        );
    }
    for (desc, value) in s.counters.samples() {
        out.declared(desc, labels, value);
    }
    out.derived(SHARD_DERIVED, s, labels);
    let (stream, applied) = s.heartbeat_lags();
    for (stage, lag) in [("stream", stream), ("applied", applied)] {
        if let Some(ms) = lag {
            out.sample(
                "heartbeat_lag_seconds",
                "Lag measured with the heartbeat key written on the source every second: stage=stream is its arrival in the replication stream, stage=applied its application on the target.",
                MetricKind::Gauge,
                &with(labels, ("stage", stage)),
                ms as f64 / 1000.0,
            );
        }
    }
}

fn writer_metrics(out: &mut Families, w: &WriterStats) {
    let labels = [("target", w.target.as_str())];
    for (desc, value) in w.counters.samples() {
        out.declared(desc, &labels, value);
    }
    out.derived(WRITER_DERIVED, w, &labels);
    let counts = w.error_counts();
    for (_, code, n) in counts.iter().filter(|c| c.0 == ErrorClass::Replay) {
        out.sample(
            "target_errors_total",
            "Replayed commands the target refused for themselves (skipped with --on-error skip), by error code.",
            MetricKind::Counter,
            &[("target", w.target.as_str()), ("code", code)],
            *n as f64,
        );
    }
    for class in [ErrorClass::Replay, ErrorClass::Retried] {
        let n: u64 = counts.iter().filter(|c| c.0 == class).map(|c| c.2).sum();
        out.sample(
            "target_refusals_total",
            "Error replies from the target by class: replay (a command refused for itself), \
             retried (refused for now: LOADING, CLUSTERDOWN, ...; sent again).",
            MetricKind::Counter,
            &[("target", w.target.as_str()), ("class", class.as_str())],
            n as f64,
        );
    }
}

/// `labels` and one more.
fn with<'a>(labels: &[(&'a str, &'a str)], more: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// Resident set size, from `VmRSS` in `/proc/self/status` (in kB there,
/// whatever the page size); 0 where /proc is not available.
pub fn resident_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    /// (family, type, label names) of every family in `text`.
    fn shapes(text: &str) -> BTreeSet<(String, String, String)> {
        let mut types = HashMap::new();
        let mut out = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let name_end = line.find(['{', ' ']).unwrap();
                let name = &line[..name_end];
                let labels: Vec<&str> = match line[name_end..].strip_prefix('{') {
                    Some(rest) => rest[..rest.find('}').unwrap()]
                        .split(',')
                        .map(|kv| kv.split('=').next().unwrap())
                        .collect(),
                    None => Vec::new(),
                };
                out.insert((name.to_string(), types[name].clone(), labels.join(",")));
            }
        }
        out
    }

    fn one_of_each() -> TaskStatus {
        let status = TaskStatus::default();
        let shard = Arc::new(ShardStats::new("src:6379", 1));
        shard.heartbeat_seen(1, 0);
        let group = status.add_group(Workers::new("dst:6379".into(), vec![shard]));
        let writer = Arc::new(WriterStats::new("dst:6379"));
        writer.count_error(ErrorClass::Replay, "WRONGTYPE");
        group.add_writer(writer);
        status
    }

    /// The names, types and labels tests outside the repository read: none
    /// may change (new families may be added).
    const CONTRACT: &[(&str, &str, &str)] = &[
        ("shardsync_up", "gauge", ""),
        ("shardsync_process_resident_memory_bytes", "gauge", ""),
        ("shardsync_shard_state", "gauge", "shard,state"),
        ("shardsync_full_sync_keys_total", "counter", "shard"),
        ("shardsync_full_sync_bytes_total", "counter", "shard"),
        ("shardsync_full_sync_total_bytes", "gauge", "shard"),
        ("shardsync_full_syncs_total", "counter", "shard"),
        ("shardsync_partial_resyncs_total", "counter", "shard"),
        ("shardsync_source_offset_bytes", "gauge", "shard"),
        ("shardsync_applied_offset_bytes", "gauge", "shard"),
        ("shardsync_lag_seconds", "gauge", "shard"),
        ("shardsync_commands_received_total", "counter", "shard"),
        ("shardsync_commands_filtered_total", "counter", "shard"),
        ("shardsync_commands_unsupported_total", "counter", "shard"),
        ("shardsync_source_reconnects_total", "counter", "shard"),
        ("shardsync_commands_split_total", "counter", "shard"),
        ("shardsync_commands_rewritten_total", "counter", "shard"),
        ("shardsync_transactions_split_total", "counter", "shard"),
        ("shardsync_barriers_total", "counter", "shard"),
        ("shardsync_intake_buffered_bytes", "gauge", "shard"),
        ("shardsync_spill_bytes", "gauge", "shard"),
        ("shardsync_spilled_bytes_total", "counter", "shard"),
        ("shardsync_values_converted_total", "counter", "shard,how"),
        ("shardsync_field_ttls_dropped_total", "counter", "shard"),
        (
            "shardsync_stream_consumers_dropped_total",
            "counter",
            "shard",
        ),
        ("shardsync_heartbeat_lag_seconds", "gauge", "shard,stage"),
        ("shardsync_target_connected", "gauge", "target"),
        ("shardsync_commands_applied_total", "counter", "target"),
        ("shardsync_target_written_bytes_total", "counter", "target"),
        ("shardsync_target_inflight_commands", "gauge", "target"),
        ("shardsync_target_queued_batches", "gauge", "target"),
        ("shardsync_keys_skipped_total", "counter", "target"),
        ("shardsync_target_errors_total", "counter", "target,code"),
        ("shardsync_target_refusals_total", "counter", "target,class"),
        ("shardsync_target_reconnects_total", "counter", "target"),
        (
            "shardsync_target_resent_commands_total",
            "counter",
            "target",
        ),
        (
            "shardsync_target_resent_non_idempotent_total",
            "counter",
            "target",
        ),
        ("shardsync_target_overflow_batches", "gauge", "target"),
        ("shardsync_target_overflow_disk_bytes", "gauge", "target"),
        (
            "shardsync_target_overflow_spilled_bytes_total",
            "counter",
            "target",
        ),
        ("shardsync_target_redirects_total", "counter", "target,kind"),
        (
            "shardsync_target_restores_rebuilt_total",
            "counter",
            "target",
        ),
    ];

    #[test]
    fn every_contract_metric_keeps_its_name_type_and_labels() {
        let got = shapes(&render(&one_of_each()));
        for (name, kind, labels) in CONTRACT {
            let want = (name.to_string(), kind.to_string(), labels.to_string());
            assert!(got.contains(&want), "missing {want:?}; got {got:#?}");
        }
    }

    #[test]
    fn labelled_counters_share_one_family() {
        let text = render(&one_of_each());
        assert_eq!(
            text.matches("# TYPE shardsync_values_converted_total")
                .count(),
            1
        );
        for how in ["restamped", "rebuilt", "in_parts"] {
            assert!(
                text.contains(&format!(
                    "shardsync_values_converted_total{{how=\"{how}\",shard=\"src:6379\"}} 0"
                )) || text.contains(&format!(
                    "shardsync_values_converted_total{{shard=\"src:6379\",how=\"{how}\"}} 0"
                )),
                "{how}: {text}"
            );
        }
    }

    #[test]
    fn a_counter_bumped_by_its_event_is_exported() {
        let status = one_of_each();
        let shard = status.groups()[0].shards()[0].clone();
        shard_worker::events::CommandsFiltered { n: 3 }.emit(&shard.counters);
        let text = render(&status);
        assert!(
            text.contains("shardsync_commands_filtered_total{shard=\"src:6379\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn resident_memory_is_read() {
        assert!(resident_memory_bytes() > 1024 * 1024);
    }
}
