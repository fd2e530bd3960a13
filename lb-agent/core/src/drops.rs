//! Why the tc path dropped or refused new flows, in words: the programs
//! report each such packet ([`DropEvent`]) and the agent turns the reports
//! into records for its log and its `/drops` endpoint, keeping a bounded
//! history.

use std::collections::VecDeque;
use std::net::SocketAddr;

use lb_common::events::DropEvent;
use serde::{Deserialize, Serialize};

use crate::addr::{ip_from_addr, port_from_be, protocol_name};

/// Drops kept for `/drops`, newest last.
pub const RECENT_DROPS: usize = 256;
/// Drops logged one by one per drain; the others are summed up in one line.
pub const LOGGED_PER_DRAIN: usize = 10;

/// One drop, as `/drops` shows it (and `lbctl drops` reads it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DropRecord {
    /// Unix time of the drop, in seconds.
    pub unix_time: f64,
    /// The outcome's metric label (`lb_tc_packets{outcome}`).
    pub reason: String,
    /// What it means.
    pub explanation: String,
    /// `TCP`, `UDP` or the protocol number.
    pub protocol: String,
    /// The client's address and port, as the packet arrived.
    pub client: SocketAddr,
    /// The frontend address and port it was sent to.
    pub frontend: SocketAddr,
    /// The Service port (`namespace/name:port`), the service id if the
    /// frontend is gone, or `-` for a drop that is not about a Service
    /// (policy).
    pub service: String,
    /// For policy drops: the source's identity, with its labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// For policy drops: the destination's identity, with its labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
}

impl DropRecord {
    /// `event`, with its service named by `name` and its boot time turned
    /// into Unix time by `unix_time`.
    pub fn new(event: &DropEvent, name: Option<&str>, unix_time: f64) -> Self {
        let t = &event.tuple;
        let outcome = event.outcome();
        Self {
            unix_time,
            reason: outcome.map_or("unknown", |o| o.label()).into(),
            explanation: outcome
                .map_or("dropped (a reason this agent does not know)", |o| {
                    o.explanation()
                })
                .into(),
            protocol: protocol_name(t.proto),
            client: SocketAddr::new(ip_from_addr(&t.saddr), port_from_be(t.sport)),
            frontend: SocketAddr::new(ip_from_addr(&t.daddr), port_from_be(t.dport)),
            service: match (name, event.service_id) {
                (Some(name), _) => name.to_owned(),
                (None, 0) => "-".to_owned(),
                (None, id) => format!("service id {id}"),
            },
            source_identity: None,
            destination_identity: None,
        }
    }

    /// The record with the identities of a policy drop, named by `name`.
    pub fn with_identities(mut self, event: &DropEvent, name: impl Fn(u32) -> String) -> Self {
        if event.src_identity != 0 || event.dst_identity != 0 {
            self.source_identity = Some(name(event.src_identity));
            self.destination_identity = Some(name(event.dst_identity));
        }
        self
    }
}

/// The latest drops, at most [`RECENT_DROPS`].
#[derive(Debug, Default)]
pub struct DropLog {
    recent: VecDeque<DropRecord>,
}

impl DropLog {
    /// Keeps `records` (oldest first) and returns what to log: the first
    /// [`LOGGED_PER_DRAIN`] one by one, and how many more there were.
    pub fn record(&mut self, records: Vec<DropRecord>) -> (Vec<DropRecord>, usize) {
        let logged = records.iter().take(LOGGED_PER_DRAIN).cloned().collect();
        let more = records.len().saturating_sub(LOGGED_PER_DRAIN);
        for record in records {
            if self.recent.len() == RECENT_DROPS {
                self.recent.pop_front();
            }
            self.recent.push_back(record);
        }
        (logged, more)
    }

    /// The kept drops as a JSON array, oldest first.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.recent).unwrap_or_else(|_| "[]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{addr_from_ip, port_to_be};
    use lb_common::{conntrack::CtKey, net::PROTO_TCP, outcome::Outcome};

    fn event(outcome: Outcome) -> DropEvent {
        DropEvent {
            tuple: CtKey {
                saddr: addr_from_ip("192.168.100.200".parse().unwrap()),
                daddr: addr_from_ip("fd00::1".parse().unwrap()),
                sport: port_to_be(40_000),
                dport: port_to_be(30_080),
                proto: PROTO_TCP,
                pad: [0; 3],
            },
            reason: outcome.index(),
            service_id: 7,
            time_ns: 123,
            src_identity: 0,
            dst_identity: 0,
        }
    }

    #[test]
    fn records_say_who_was_dropped_and_why() {
        let r = DropRecord::new(
            &event(Outcome::DropSourceRange),
            Some("default/web:http"),
            1.5,
        );
        assert_eq!(r.reason, "drop_source_range");
        assert_eq!(r.client, "192.168.100.200:40000".parse().unwrap());
        assert_eq!(r.frontend, "[fd00::1]:30080".parse().unwrap());
        assert_eq!(r.protocol, "TCP");
        assert_eq!(r.service, "default/web:http");
        assert_eq!(
            r.explanation,
            "dropped: source address not in loadBalancerSourceRanges"
        );
        let gone = DropRecord::new(&event(Outcome::Reject), None, 1.5);
        assert_eq!(gone.service, "service id 7");
        assert!(gone.explanation.starts_with("refused"));
        let json = DropLog::default().to_json();
        assert_eq!(json, "[]");
    }

    #[test]
    fn an_unknown_code_from_a_newer_datapath_is_still_a_drop() {
        let mut unknown = event(Outcome::Reject);
        unknown.reason = 63;
        let r = DropRecord::new(&unknown, None, 0.0);
        assert_eq!(r.reason, "unknown");
        assert!(r.explanation.starts_with("dropped"));
    }

    #[test]
    fn the_log_is_bounded_and_floods_are_summed_up() {
        let mut log = DropLog::default();
        let many = |n: usize| {
            (0..n)
                .map(|i| DropRecord::new(&event(Outcome::DropNoLocalEndpoints), None, i as f64))
                .collect::<Vec<_>>()
        };
        assert_eq!(log.record(many(3)), (many(3), 0));
        let (logged, more) = log.record(many(RECENT_DROPS + 5));
        assert_eq!(logged, many(LOGGED_PER_DRAIN));
        assert_eq!(more, RECENT_DROPS + 5 - LOGGED_PER_DRAIN);
        assert_eq!(log.recent.len(), RECENT_DROPS);
        // Oldest dropped first: the newest batch fills the history.
        assert_eq!(
            log.recent.back().unwrap().unix_time,
            (RECENT_DROPS + 4) as f64
        );
        let json: serde_json::Value = serde_json::from_str(&log.to_json()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), RECENT_DROPS);
        assert_eq!(json[0]["reason"], "drop_no_local_endpoints");
        assert!(json[0]["unixTime"].is_number());
        // What lbctl reads back is what was kept.
        let read: Vec<DropRecord> = serde_json::from_str(&log.to_json()).unwrap();
        assert_eq!(read, Vec::from(log.recent.clone()));
    }
}
