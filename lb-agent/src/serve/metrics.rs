//! Prometheus metrics: what is programmed, how full each map is, how
//! reconciliation and the API watches are doing.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use lb_common::outcome::{Counted, Outcome};
use lb_common::policy::ENDPOINT_FAIL_CLOSED;
use lb_core::plan::{Applied, Capacity};
use lb_policy::{plan::PolicyCapacity, tables::PolicyTables};

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Frontends programmed.
    pub frontends: IntGauge,
    /// Distinct backends programmed.
    pub backends: IntGauge,
    /// Entries per map.
    pub map_entries: IntGaugeVec,
    /// Capacity per map.
    pub map_capacity: IntGaugeVec,
    /// Reconciliations run.
    pub reconciles: IntCounter,
    /// Reconciliations that hit an error (capacity, failed write).
    pub reconcile_errors: IntCounter,
    /// Frontends a full map keeps out of the datapath, retried on every pass.
    pub frontends_pending: IntGauge,
    /// The same frontends by name, with the map that was full (1 each).
    pub frontends_not_programmed: IntGaugeVec,
    /// Time from snapshot to programmed maps.
    pub reconcile_seconds: Histogram,
    /// Objects (or fields) skipped as invalid in the latest snapshot.
    pub invalid_objects: IntGauge,
    /// API watch restarts per resource.
    pub watch_restarts: IntCounterVec,
    /// Connected UDP sockets terminated because their backend left and
    /// they could not be connected again.
    pub udp_sockets_terminated: IntCounter,
    /// Connected UDP sockets connected again, through their frontend, to a
    /// live backend because their backend left.
    pub udp_sockets_reconnected: IntCounter,
    /// Connected UDP sockets whose backend left waiting for their frontend
    /// to have a backend again.
    pub udp_sockets_waiting: IntGauge,
    /// Unix time of the last successful reconciliation.
    pub last_sync_seconds: IntGauge,
    /// Packets the tc programs handled, by outcome (kernel counters).
    pub tc_packets: IntGaugeVec,
    /// connect()/sendmsg() calls the socket programs refused, by reason
    /// (kernel counters).
    pub socket_refused: IntGaugeVec,
    /// Drop reports of the tc path not sent (over budget or ring buffer full).
    pub tc_drop_events_lost: IntGauge,
    /// Service ports whose Maglev table has fewer than 100 slots per backend.
    pub maglev_undersized: IntGauge,
    /// 1 while NodePorts answer on 127.0.0.0/8 to the node's processes.
    pub localhost_node_ports: IntGauge,
    /// Which sockets the socket programs translate (2 all, 1 the node's
    /// network namespace, 0 none).
    pub socket_path_scope: IntGauge,
    /// Security identities in use (label and CIDR identities).
    pub policy_identities: IntGauge,
    /// This node's pods programmed as policy endpoints (by address).
    pub policy_endpoints: IntGauge,
    /// Endpoints refusing new flows because their policy could not be
    /// programmed (a full map, a failed write).
    pub policy_endpoints_fail_closed: IntGauge,
    /// Endpoints whose host interface was not found (not enforced at
    /// their own interface yet).
    pub policy_endpoints_without_interface: IntGauge,
    /// The policy revision in the kernel.
    pub policy_revision: IntGauge,
    /// Policy map writes that failed.
    pub policy_write_errors: IntCounter,
    /// Time from snapshot to programmed policy maps.
    pub policy_reconcile_seconds: Histogram,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Metrics {
    /// Creates and registers every metric (plus process metrics).
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let gauge = |name: &str, help: &str| register(r, IntGauge::new(name, help).expect("valid"));
        let counter =
            |name: &str, help: &str| register(r, IntCounter::new(name, help).expect("valid"));
        Self {
            frontends: gauge(
                "lb_frontends",
                "Service frontends (VIP, port, protocol) programmed",
            ),
            backends: gauge("lb_backends", "Distinct backends programmed"),
            map_entries: register(
                r,
                IntGaugeVec::new(
                    Opts::new("lb_map_entries", "Entries in a BPF map"),
                    &["map"],
                )
                .expect("valid"),
            ),
            map_capacity: register(
                r,
                IntGaugeVec::new(
                    Opts::new("lb_map_capacity", "Capacity of a BPF map"),
                    &["map"],
                )
                .expect("valid"),
            ),
            reconciles: counter("lb_reconciles_total", "Reconciliations run"),
            reconcile_errors: counter("lb_reconcile_errors_total", "Reconciliations with an error"),
            frontends_pending: gauge(
                "lb_frontends_pending",
                "Frontends a full map keeps out of the datapath; retried on every pass",
            ),
            frontends_not_programmed: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "lb_frontend_not_programmed",
                        "1 for each frontend (namespace/service:port) a full map keeps in its \
                         previous state, with the map",
                    ),
                    &["frontend", "map"],
                )
                .expect("valid"),
            ),
            reconcile_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lb_reconcile_duration_seconds",
                        "From snapshot to programmed maps",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18).expect("valid")),
                )
                .expect("valid"),
            ),
            invalid_objects: gauge("lb_invalid_objects", "Objects or fields skipped as invalid"),
            watch_restarts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "lb_watch_restarts_total",
                        "Kubernetes API watch errors and restarts",
                    ),
                    &["resource"],
                )
                .expect("valid"),
            ),
            udp_sockets_terminated: counter(
                "lb_udp_sockets_terminated_total",
                "Connected UDP sockets destroyed because their backend left and they could not \
                 be connected again",
            ),
            udp_sockets_reconnected: counter(
                "lb_udp_sockets_reconnected_total",
                "Connected UDP sockets connected again to a live backend of their Service \
                 because their backend left",
            ),
            udp_sockets_waiting: gauge(
                "lb_udp_sockets_waiting",
                "Connected UDP sockets of a removed backend waiting for their Service to have a \
                 backend again",
            ),
            tc_packets: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "lb_tc_packets",
                        "Packets handled by the tc programs since they were loaded, by outcome",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            socket_refused: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "lb_socket_refused",
                        "connect() and sendmsg() calls to Service frontends refused by the \
                         socket programs since they were loaded, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            tc_drop_events_lost: gauge(
                "lb_tc_drop_events_lost",
                "Drop reports of the tc path not sent: over a CPU's budget or the ring \
                 buffer full (the drops themselves are counted in lb_tc_packets)",
            ),
            maglev_undersized: gauge(
                "lb_maglev_undersized_service_ports",
                "Service ports whose Maglev table has fewer than 100 slots per backend \
                 (raise maglevTableSize)",
            ),
            localhost_node_ports: gauge(
                "lb_localhost_node_ports",
                "1 while NodePorts answer on 127.0.0.0/8 to the node's own processes \
                 (0: localhostNodePorts off, no NodePorts, or a kernel without SO_NETNS_COOKIE)",
            ),
            socket_path_scope: gauge(
                "lb_socket_path_scope",
                "Sockets the socket programs translate: 2 every socket of the cgroup, 1 those \
                 of the node's own network namespace (socketLb false), 0 none",
            ),
            policy_identities: gauge(
                "lb_policy_identities",
                "Security identities in use: one per distinct set of identity-relevant labels, \
                 one per CIDR a policy names",
            ),
            policy_endpoints: gauge(
                "lb_policy_endpoints",
                "Addresses of this node's pods programmed as policy endpoints",
            ),
            policy_endpoints_fail_closed: gauge(
                "lb_policy_endpoints_fail_closed",
                "Endpoints refusing new flows because their policy could not be programmed \
                 (full policy map or failed write); retried on every pass",
            ),
            policy_endpoints_without_interface: gauge(
                "lb_policy_endpoints_without_interface",
                "Endpoints whose host-side interface was not found (no /32 or /128 route to a \
                 veth or netkit device): their own packets are not checked at their interface",
            ),
            policy_revision: gauge(
                "lb_policy_revision",
                "Policy revision in the kernel; flows are checked again after each bump",
            ),
            policy_write_errors: counter(
                "lb_policy_write_errors_total",
                "Policy map writes that failed",
            ),
            policy_reconcile_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lb_policy_reconcile_duration_seconds",
                        "From snapshot to programmed policy maps (compile, plan, writes)",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18).expect("valid")),
                )
                .expect("valid"),
            ),
            last_sync_seconds: gauge(
                "lb_last_sync_timestamp_seconds",
                "Unix time of the last successful reconciliation",
            ),
            registry,
        }
    }

    /// Records the programmed state and map occupancy.
    pub fn observe_state(&self, applied: &Applied, capacity: &Capacity) {
        self.frontends.set(applied.frontends.len() as i64);
        self.backends.set(applied.backends.len() as i64);
        for (map, entries, cap) in [
            ("services", applied.frontends.len(), capacity.services),
            ("backends", applied.backends.len(), capacity.backends),
            ("backend_slots", applied.slot_count(), capacity.slots),
            ("maglev", applied.maglev_entries(), capacity.maglev_entries),
        ] {
            self.map_entries
                .with_label_values(&[map])
                .set(entries as i64);
            self.map_capacity.with_label_values(&[map]).set(cap as i64);
        }
    }

    /// Sets the policy gauges from what the policy maps hold.
    pub fn observe_policy(&self, tables: &PolicyTables, capacity: &PolicyCapacity) {
        self.policy_identities.set(tables.identities.len() as i64);
        self.policy_endpoints.set(tables.endpoints.len() as i64);
        self.policy_endpoints_fail_closed.set(
            tables
                .endpoints
                .values()
                .filter(|ep| ep.flags & ENDPOINT_FAIL_CLOSED != 0)
                .count() as i64,
        );
        self.policy_endpoints_without_interface.set(
            tables
                .endpoints
                .values()
                .filter(|ep| ep.ifindex == 0)
                .count() as i64,
        );
        self.policy_revision.set(i64::from(tables.state.revision));
        for (map, entries, cap) in [
            ("ipcache", tables.ipcache.len(), capacity.ipcache),
            ("endpoints", tables.endpoints.len(), capacity.endpoints),
            ("policy", tables.entry_count(), capacity.entries),
        ] {
            self.map_entries
                .with_label_values(&[map])
                .set(entries as i64);
            self.map_capacity.with_label_values(&[map]).set(cap as i64);
        }
    }

    /// Sets the kernel counters of these outcomes: `lb_tc_packets{outcome}`
    /// or `lb_socket_refused{reason}`, as each outcome is counted.
    pub fn set_outcomes(&self, counts: &[(Outcome, u64)]) {
        for (outcome, count) in counts {
            let gauges = match outcome.counted() {
                Counted::Tc => &self.tc_packets,
                Counted::Socket => &self.socket_refused,
            };
            gauges
                .with_label_values(&[outcome.label()])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_state_and_capacity() {
        let metrics = Metrics::new();
        metrics.observe_state(&Applied::default(), &Capacity::default());
        metrics
            .watch_restarts
            .with_label_values(&["services"])
            .inc();
        let text = metrics.render();
        assert!(
            text.contains("lb_map_capacity{map=\"services\"} 65536"),
            "{text}"
        );
        assert!(text.contains("lb_frontends 0"));
        assert!(text.contains("lb_watch_restarts_total{resource=\"services\"} 1"));
    }
}
