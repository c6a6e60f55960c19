//! `/metrics`: Prometheus text, built at scrape time from the counters the
//! workers keep (so the hot path pays one relaxed atomic add, nothing more).
//! Every metric is prefixed `shardsync_`; labels are `shard` (source
//! `host:port`) and `target` (target node `host:port`), never keys. With
//! several targets, per-shard metrics also carry `target` (the target as
//! named on the command line): each target has its own shard workers.

use std::sync::atomic::Ordering;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use shard_worker::progress::ShardState;

use crate::status::TaskStatus;

struct Family {
    inner: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut inner = MetricFamily::default();
        inner.set_name(format!("shardsync_{name}"));
        inner.set_help(help.to_string());
        inner.set_field_type(kind);
        Family { inner }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
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
        match self.inner.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.inner.mut_metric().push(m);
    }
}

/// Renders every metric of the task.
pub fn render(status: &TaskStatus) -> String {
    let mut families = Vec::new();
    let mut up = Family::new(
        "up",
        "1 while the task runs (0 once stopped or failed).",
        MetricType::GAUGE,
    );
    let running = !matches!(status.state(), "stopped" | "failed");
    up.sample(&[], if running { 1.0 } else { 0.0 });
    families.push(up);
    let mut rss = Family::new(
        "process_resident_memory_bytes",
        "Resident memory of the shardsync process.",
        MetricType::GAUGE,
    );
    rss.sample(&[], resident_memory_bytes() as f64);
    families.push(rss);

    let groups = status.groups();
    if !groups.is_empty() {
        use MetricType::{COUNTER, GAUGE};
        let many = groups.len() > 1;
        let mut state = Family::new("shard_state", "1 for the state each shard is in.", GAUGE);
        let mut keys = Family::new(
            "full_sync_keys_total",
            "Keys read from the source's RDB in the current full sync.",
            COUNTER,
        );
        let mut bytes = Family::new(
            "full_sync_bytes_total",
            "RDB bytes read in the current full sync.",
            COUNTER,
        );
        let mut total = Family::new(
            "full_sync_total_bytes",
            "Announced RDB size (0 when the transfer is diskless).",
            GAUGE,
        );
        let mut full_syncs = Family::new("full_syncs_total", "Full syncs started.", COUNTER);
        let mut partial = Family::new(
            "partial_resyncs_total",
            "Partial resyncs accepted by the source.",
            COUNTER,
        );
        let mut offset = Family::new(
            "source_offset_bytes",
            "Replication offset read from the source.",
            GAUGE,
        );
        let mut applied = Family::new(
            "applied_offset_bytes",
            "Replication offset confirmed by the targets.",
            GAUGE,
        );
        let mut lag = Family::new(
            "lag_seconds",
            "Age of the oldest command read but not yet applied.",
            GAUGE,
        );
        let mut received = Family::new(
            "commands_received_total",
            "Commands read from the replication stream.",
            COUNTER,
        );
        let mut filtered = Family::new(
            "commands_filtered_total",
            "Commands not replayed by design (other databases, PUBLISH).",
            COUNTER,
        );
        let mut unsupported = Family::new(
            "commands_unsupported_total",
            "Commands that could not be replayed (logged as errors).",
            COUNTER,
        );
        let mut reconnects = Family::new(
            "source_reconnects_total",
            "Source connections lost and retried.",
            COUNTER,
        );
        let mut split = Family::new(
            "commands_split_total",
            "Multi-key commands split into per-slot parts (cluster targets).",
            COUNTER,
        );
        let mut rewritten = Family::new(
            "commands_rewritten_total",
            "Cross-slot commands replaced by an equivalent (cluster targets).",
            COUNTER,
        );
        let mut tx_split = Family::new(
            "transactions_split_total",
            "Transactions whose keys span slots, applied per slot.",
            COUNTER,
        );
        let mut barriers = Family::new(
            "barriers_total",
            "Waits for everything dispatched to be confirmed (slot moves, rewrites).",
            COUNTER,
        );
        let mut buffered = Family::new(
            "intake_buffered_bytes",
            "Stream bytes read from the source, waiting in memory.",
            GAUGE,
        );
        let mut spill = Family::new(
            "spill_bytes",
            "Stream bytes read from the source, waiting in spill files.",
            GAUGE,
        );
        let mut spilled = Family::new(
            "spilled_bytes_total",
            "Stream bytes ever written to spill files.",
            COUNTER,
        );
        let mut converted = Family::new(
            "values_converted_total",
            "RDB values not sent as a plain RESTORE, by how: restamped (payload stamped with an older target's RDB version), rebuilt (ordinary commands), in_parts (big values, written in bounded parts).",
            COUNTER,
        );
        let mut ttls_dropped = Family::new(
            "field_ttls_dropped_total",
            "Hash fields written without their TTL (the target predates Redis 7.4).",
            COUNTER,
        );
        let mut heartbeat_lag = Family::new(
            "heartbeat_lag_seconds",
            "Lag measured with the heartbeat key written on the source every second: stage=stream is its arrival in the replication stream, stage=applied its application on the target.",
            GAUGE,
        );
        let mut consumers_dropped = Family::new(
            "stream_consumers_dropped_total",
            "Stream consumers without pending entries left out (the target predates Redis 6.2).",
            COUNTER,
        );
        for (g, s) in groups
            .iter()
            .flat_map(|g| g.shards.iter().map(move |s| (g, s)))
        {
            let shard = s.source.as_str();
            let current = g.shard_state(s);
            let l: Vec<(&str, &str)> = if many {
                vec![("shard", shard), ("target", g.target.as_str())]
            } else {
                vec![("shard", shard)]
            };
            for st in ShardState::ALL {
                state.sample(
                    &with(&l, ("state", st.as_str())),
                    (st == current) as u8 as f64,
                );
            }
            keys.sample(&l, s.full_sync_keys.load(Ordering::Relaxed) as f64);
            bytes.sample(&l, s.full_sync_bytes.load(Ordering::Relaxed) as f64);
            total.sample(&l, s.full_sync_total_bytes.load(Ordering::Relaxed) as f64);
            full_syncs.sample(&l, s.full_syncs.load(Ordering::Relaxed) as f64);
            partial.sample(&l, s.partial_syncs.load(Ordering::Relaxed) as f64);
            offset.sample(&l, s.source_offset.load(Ordering::Relaxed) as f64);
            applied.sample(&l, s.applied().unwrap_or(0) as f64);
            lag.sample(&l, s.lag_ms() as f64 / 1000.0);
            received.sample(&l, s.commands_received.load(Ordering::Relaxed) as f64);
            filtered.sample(&l, s.commands_filtered.load(Ordering::Relaxed) as f64);
            unsupported.sample(&l, s.commands_unsupported.load(Ordering::Relaxed) as f64);
            reconnects.sample(&l, s.source_reconnects.load(Ordering::Relaxed) as f64);
            split.sample(&l, s.commands_split.load(Ordering::Relaxed) as f64);
            rewritten.sample(&l, s.commands_rewritten.load(Ordering::Relaxed) as f64);
            tx_split.sample(&l, s.transactions_split.load(Ordering::Relaxed) as f64);
            barriers.sample(&l, s.barriers.load(Ordering::Relaxed) as f64);
            buffered.sample(&l, s.stream_spill.memory.load(Ordering::Relaxed) as f64);
            spill.sample(&l, s.stream_spill.on_disk.load(Ordering::Relaxed) as f64);
            spilled.sample(&l, s.stream_spill.total.load(Ordering::Relaxed) as f64);
            for (how, n) in [
                ("restamped", &s.values_restamped),
                ("rebuilt", &s.values_rebuilt),
                ("in_parts", &s.big_values),
            ] {
                converted.sample(&with(&l, ("how", how)), n.load(Ordering::Relaxed) as f64);
            }
            ttls_dropped.sample(&l, s.field_ttls_dropped.load(Ordering::Relaxed) as f64);
            consumers_dropped.sample(&l, s.consumers_dropped.load(Ordering::Relaxed) as f64);
            let (stream, applied) = s.heartbeat_lags();
            for (stage, lag) in [("stream", stream), ("applied", applied)] {
                if let Some(ms) = lag {
                    heartbeat_lag.sample(&with(&l, ("stage", stage)), ms as f64 / 1000.0);
                }
            }
        }
        families.extend([
            state,
            keys,
            bytes,
            total,
            full_syncs,
            partial,
            offset,
            applied,
            lag,
            received,
            filtered,
            unsupported,
            reconnects,
            split,
            rewritten,
            tx_split,
            barriers,
            buffered,
            spill,
            spilled,
            converted,
            ttls_dropped,
            consumers_dropped,
            heartbeat_lag,
        ]);

        let mut connected = Family::new(
            "target_connected",
            "1 while the writer is connected to the target node.",
            GAUGE,
        );
        let mut cmds = Family::new(
            "commands_applied_total",
            "Commands confirmed by the target node.",
            COUNTER,
        );
        let mut wbytes = Family::new(
            "target_written_bytes_total",
            "Bytes written to the target node.",
            COUNTER,
        );
        let mut inflight = Family::new(
            "target_inflight_commands",
            "Commands written and waiting for their reply.",
            GAUGE,
        );
        let mut queued = Family::new(
            "target_queued_batches",
            "Batches waiting in the writer's queue.",
            GAUGE,
        );
        let mut skipped = Family::new(
            "keys_skipped_total",
            "Keys kept as the target had them (--on-conflict skip).",
            COUNTER,
        );
        let mut errors = Family::new(
            "target_errors_total",
            "Error replies from the target, by error code.",
            COUNTER,
        );
        let mut wreconnects = Family::new(
            "target_reconnects_total",
            "Target connections lost and retried.",
            COUNTER,
        );
        let mut resent = Family::new(
            "target_resent_commands_total",
            "Commands resent after a lost connection.",
            COUNTER,
        );
        let mut resent_ni = Family::new(
            "target_resent_non_idempotent_total",
            "Resent commands that may have run twice.",
            COUNTER,
        );
        let mut overflow = Family::new(
            "target_overflow_batches",
            "Batches waiting in the writer's overflow (its queue was full).",
            GAUGE,
        );
        let mut overflow_disk = Family::new(
            "target_overflow_disk_bytes",
            "Overflow bytes in spill files.",
            GAUGE,
        );
        let mut overflow_total = Family::new(
            "target_overflow_spilled_bytes_total",
            "Overflow bytes ever written to spill files.",
            COUNTER,
        );
        let mut redirects = Family::new(
            "target_redirects_total",
            "Commands a target node redirected (MOVED or ASK), by kind.",
            COUNTER,
        );
        let mut restores_rebuilt = Family::new(
            "target_restores_rebuilt_total",
            "RESTOREs the target node refused (payload from a newer Redis), rebuilt with ordinary commands.",
            COUNTER,
        );
        for w in groups.iter().flat_map(|g| g.writers()) {
            let target = w.target.as_str();
            restores_rebuilt.sample(
                &[("target", target)],
                w.restores_rebuilt.load(Ordering::Relaxed) as f64,
            );
            let l = [("target", target)];
            connected.sample(&l, w.connected.load(Ordering::Relaxed) as u8 as f64);
            cmds.sample(&l, w.commands_applied.load(Ordering::Relaxed) as f64);
            wbytes.sample(&l, w.bytes_written.load(Ordering::Relaxed) as f64);
            inflight.sample(&l, w.inflight_commands.load(Ordering::Relaxed) as f64);
            queued.sample(&l, w.queued_batches.load(Ordering::Relaxed) as f64);
            overflow.sample(&l, w.overflow_batches.load(Ordering::Relaxed) as f64);
            redirects.sample(
                &[("target", target), ("kind", "moved")],
                w.moved.load(Ordering::Relaxed) as f64,
            );
            redirects.sample(
                &[("target", target), ("kind", "ask")],
                w.asked.load(Ordering::Relaxed) as f64,
            );
            overflow_disk.sample(&l, w.overflow.on_disk.load(Ordering::Relaxed) as f64);
            overflow_total.sample(&l, w.overflow.total.load(Ordering::Relaxed) as f64);
            skipped.sample(&l, w.keys_skipped.load(Ordering::Relaxed) as f64);
            wreconnects.sample(&l, w.reconnects.load(Ordering::Relaxed) as f64);
            resent.sample(&l, w.resent_commands.load(Ordering::Relaxed) as f64);
            resent_ni.sample(&l, w.resent_non_idempotent.load(Ordering::Relaxed) as f64);
            for (code, n) in w.error_counts() {
                errors.sample(&[("target", target), ("code", &code)], n as f64);
            }
        }
        families.extend([
            restores_rebuilt,
            connected,
            cmds,
            wbytes,
            inflight,
            queued,
            skipped,
            errors,
            wreconnects,
            resent,
            resent_ni,
            overflow,
            overflow_disk,
            overflow_total,
            redirects,
        ]);
    }

    let families: Vec<MetricFamily> = families
        .into_iter()
        .map(|f| f.inner)
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("text encoding of well-formed families");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

/// `labels` and one more.
fn with<'a>(labels: &[(&'a str, &'a str)], more: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// Resident set size from /proc (0 where /proc is not available).
pub fn resident_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
