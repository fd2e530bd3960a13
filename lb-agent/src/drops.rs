//! Why the tc path dropped or refused new flows, in words: the programs
//! report each such packet ([`DropEvent`]) and the daemon drains them here
//! for the log and the `/drops` endpoint. Sans-IO: decoding, wording and a
//! bounded history.

use std::collections::VecDeque;
use std::net::SocketAddr;

use lb_common::tc::{
    CtKey, DropEvent, STATS_LEN, STAT_CT_INSERT_FAILED, STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_ENDPOINTS, STAT_DROP_NO_LOCAL, STAT_DROP_SNAT_ADDR, STAT_DROP_SNAT_PORTS,
    STAT_DROP_SOURCE_RANGE, STAT_REJECT,
};
use serde::{Deserialize, Serialize};

use crate::{
    addr::{ip_from_addr, port_from_be},
    view::protocol_name,
};

/// Drops kept for `/drops`, newest last.
pub const RECENT_DROPS: usize = 256;
/// Drops logged one by one per drain; the others are summed up in one line.
pub const LOGGED_PER_DRAIN: usize = 10;

/// Labels of the tc counters (`lb_tc_packets{outcome}`), in
/// `lb_common::tc::STAT_*` order; drop events use the same words.
pub const TC_OUTCOMES: [&str; STATS_LEN as usize] = [
    "forward",
    "reply",
    "new_flow",
    "reject",
    "drop_no_endpoints",
    "drop_no_local_endpoints",
    "drop_source_range",
    "drop_no_backend",
    "drop_snat_ports_exhausted",
    "drop_no_snat_address",
    "conntrack_insert_failed",
    "fib_redirect",
    "icmp_error",
];

/// What a drop reason means for the client.
pub fn explanation(reason: u32) -> &'static str {
    match reason {
        STAT_REJECT => {
            "refused: the Service has no endpoints (answered with a TCP reset or ICMP unreachable)"
        }
        STAT_DROP_NO_ENDPOINTS => {
            "dropped: the Service has no endpoints and the node's answer rate limit was reached"
        }
        STAT_DROP_NO_LOCAL => "dropped: traffic policy Local and no endpoint on this node",
        STAT_DROP_SOURCE_RANGE => "dropped: source address not in loadBalancerSourceRanges",
        STAT_DROP_NO_BACKEND => "dropped: the chosen backend was being replaced (a retry succeeds)",
        STAT_DROP_SNAT_PORTS => "dropped: no free SNAT port towards the chosen backend",
        STAT_DROP_SNAT_ADDR => {
            "dropped: no node address (or backend) of the packet's IP family to translate to"
        }
        STAT_CT_INSERT_FAILED => "dropped: the conntrack table could not take the flow",
        _ => "dropped",
    }
}

/// Decodes one ring buffer record; `None` if it is too short.
pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
    };
    let addr_at = |at: usize| -> Option<[u32; 4]> {
        Some([
            u32_at(at)?,
            u32_at(at + 4)?,
            u32_at(at + 8)?,
            u32_at(at + 12)?,
        ])
    };
    Some(DropEvent {
        tuple: CtKey {
            saddr: addr_at(0)?,
            daddr: addr_at(16)?,
            sport: u16_at(32)?,
            dport: u16_at(34)?,
            proto: *bytes.get(36)?,
            pad: [0; 3],
        },
        reason: u32_at(40)?,
        service_id: u32_at(44)?,
        time_ns: u64::from_ne_bytes(bytes.get(48..56)?.try_into().ok()?),
    })
}

/// One drop, as `/drops` shows it (and `lbctl drops` reads it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DropRecord {
    /// Unix time of the drop, in seconds.
    pub unix_time: f64,
    /// The counter label (`lb_tc_packets{outcome}`).
    pub reason: String,
    /// What it means.
    pub explanation: String,
    /// `TCP`, `UDP` or the protocol number.
    pub protocol: String,
    /// The client's address and port, as the packet arrived.
    pub client: SocketAddr,
    /// The frontend address and port it was sent to.
    pub frontend: SocketAddr,
    /// The Service port (`namespace/name:port`), or the service id if the
    /// frontend is gone.
    pub service: String,
}

impl DropRecord {
    /// `event`, with its service named by `name` and its boot time turned
    /// into Unix time by `unix_time`.
    pub fn new(event: &DropEvent, name: Option<&str>, unix_time: f64) -> Self {
        let t = &event.tuple;
        let reason = TC_OUTCOMES
            .get(event.reason as usize)
            .copied()
            .unwrap_or("unknown");
        Self {
            unix_time,
            reason: reason.into(),
            explanation: explanation(event.reason).into(),
            protocol: protocol_name(t.proto),
            client: SocketAddr::new(ip_from_addr(&t.saddr), port_from_be(t.sport)),
            frontend: SocketAddr::new(ip_from_addr(&t.daddr), port_from_be(t.dport)),
            service: name.map_or_else(|| format!("service id {}", event.service_id), str::to_owned),
        }
    }

    /// The log line.
    pub fn line(&self) -> String {
        format!(
            "{} -> {}/{} ({}): {}",
            self.client, self.frontend, self.protocol, self.service, self.explanation
        )
    }
}

/// The latest drops, at most [`RECENT_DROPS`].
#[derive(Debug, Default)]
pub struct DropLog {
    recent: VecDeque<DropRecord>,
}

impl DropLog {
    /// Keeps `records` (oldest first) and returns the log lines for them: the
    /// first [`LOGGED_PER_DRAIN`] one by one, then one line for the rest.
    pub fn record(&mut self, records: Vec<DropRecord>) -> Vec<String> {
        let mut lines: Vec<String> = records
            .iter()
            .take(LOGGED_PER_DRAIN)
            .map(DropRecord::line)
            .collect();
        if records.len() > LOGGED_PER_DRAIN {
            lines.push(format!(
                "{} more drops not logged one by one (see /drops and lb_tc_packets)",
                records.len() - LOGGED_PER_DRAIN
            ));
        }
        for record in records {
            if self.recent.len() == RECENT_DROPS {
                self.recent.pop_front();
            }
            self.recent.push_back(record);
        }
        lines
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
    use lb_common::PROTO_TCP;

    fn event(reason: u32) -> DropEvent {
        DropEvent {
            tuple: CtKey {
                saddr: addr_from_ip("192.168.100.200".parse().unwrap()),
                daddr: addr_from_ip("fd00::1".parse().unwrap()),
                sport: port_to_be(40_000),
                dport: port_to_be(30_080),
                proto: PROTO_TCP,
                pad: [0; 3],
            },
            reason,
            service_id: 7,
            time_ns: 123,
        }
    }

    /// The bytes the kernel hands over: the struct's memory.
    fn bytes(e: &DropEvent) -> Vec<u8> {
        let mut out = Vec::new();
        for word in e.tuple.saddr.iter().chain(&e.tuple.daddr) {
            out.extend(word.to_ne_bytes());
        }
        out.extend(e.tuple.sport.to_ne_bytes());
        out.extend(e.tuple.dport.to_ne_bytes());
        out.extend([e.tuple.proto, 0, 0, 0]);
        out.extend(e.reason.to_ne_bytes());
        out.extend(e.service_id.to_ne_bytes());
        out.extend(e.time_ns.to_ne_bytes());
        out
    }

    #[test]
    fn records_decode_to_the_event_written() {
        let e = event(STAT_DROP_SOURCE_RANGE);
        let raw = bytes(&e);
        assert_eq!(raw.len(), std::mem::size_of::<DropEvent>());
        assert_eq!(decode(&raw), Some(e));
        assert_eq!(decode(&raw[..55]), None);
    }

    #[test]
    fn records_say_who_was_dropped_and_why() {
        let r = DropRecord::new(
            &event(STAT_DROP_SOURCE_RANGE),
            Some("default/web:http"),
            1.5,
        );
        assert_eq!(r.reason, "drop_source_range");
        assert_eq!(r.client, "192.168.100.200:40000".parse().unwrap());
        assert_eq!(r.frontend, "[fd00::1]:30080".parse().unwrap());
        assert_eq!(
            r.line(),
            "192.168.100.200:40000 -> [fd00::1]:30080/TCP (default/web:http): \
             dropped: source address not in loadBalancerSourceRanges"
        );
        let gone = DropRecord::new(&event(STAT_REJECT), None, 1.5);
        assert_eq!(gone.service, "service id 7");
        assert!(gone.explanation.starts_with("refused"));
        let json = DropLog::default().to_json();
        assert_eq!(json, "[]");
    }

    #[test]
    fn every_counted_drop_has_its_own_explanation() {
        let reasons = [
            STAT_REJECT,
            STAT_DROP_NO_ENDPOINTS,
            STAT_DROP_NO_LOCAL,
            STAT_DROP_SOURCE_RANGE,
            STAT_DROP_NO_BACKEND,
            STAT_DROP_SNAT_PORTS,
            STAT_DROP_SNAT_ADDR,
            STAT_CT_INSERT_FAILED,
        ];
        let words: std::collections::BTreeSet<&str> =
            reasons.iter().map(|&r| explanation(r)).collect();
        assert_eq!(words.len(), reasons.len());
        assert!(!words.contains(explanation(u32::MAX)));
    }

    #[test]
    fn the_log_is_bounded_and_floods_are_summed_up() {
        let mut log = DropLog::default();
        let many = |n: usize| {
            (0..n)
                .map(|i| DropRecord::new(&event(STAT_DROP_NO_LOCAL), None, i as f64))
                .collect::<Vec<_>>()
        };
        let lines = log.record(many(3));
        assert_eq!(lines.len(), 3);
        let lines = log.record(many(RECENT_DROPS + 5));
        assert_eq!(lines.len(), LOGGED_PER_DRAIN + 1);
        assert!(lines[LOGGED_PER_DRAIN].starts_with(&format!("{} more", RECENT_DROPS + 5 - 10)));
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
