//! What `lbctl` shows: the frontends and backends in the maps (`service
//! list`), the open sockets the socket path translated (`socket list`) and
//! the agent's latest drop reports (`drops`).

use std::fmt::Write as _;

use lb_common::{
    net::Addr,
    service::{
        uses_maglev, RevNat, ServiceName, SCOPE_TC_CLUSTER, SERVICE_FLAG_AFFINITY,
        SERVICE_FLAG_NO_LOCAL_BACKENDS,
    },
    socket::SockRevNatKey,
};

use crate::{
    addr::{ip_from_addr, port_from_be, protocol_name},
    drops::DropRecord,
    plan::{name_to_string, Applied, Dump},
};

/// Formats `addr:port` with brackets for IPv6.
pub fn endpoint(addr: &Addr, port_be: u16) -> String {
    std::net::SocketAddr::new(ip_from_addr(addr), port_from_be(port_be)).to_string()
}

/// Renders the services of a map dump as an aligned table, one line per backend.
pub fn service_table(dump: &Dump) -> String {
    let applied = Applied::inspect(dump);
    let counts: std::collections::BTreeMap<_, _> = dump
        .services
        .iter()
        .map(|(k, v)| (*k, v.backend_count))
        .collect();
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut frontends: Vec<_> = applied.frontends.iter().collect();
    frontends.sort_by(|a, b| (&a.1.name, a.0).cmp(&(&b.1.name, b.0)));
    for (key, frontend) in frontends {
        let external = uses_maglev(key.scope);
        let path = if key.scope == SCOPE_TC_CLUSTER {
            " (per packet)"
        } else {
            " (external)"
        };
        let first = [
            frontend.service_id.to_string(),
            frontend.name.clone(),
            format!(
                "{}/{}{}",
                endpoint(&key.addr, key.port),
                protocol_name(key.proto),
                if external { path } else { "" }
            ),
        ];
        if external {
            let [id, name, fe] = first;
            let backends = counts.get(key).copied().unwrap_or(0);
            rows.push([
                id,
                name,
                fe,
                format!("{backends} backends in a Maglev table"),
            ]);
            continue;
        }
        let mut backends = frontend.backends.iter().map(|b| endpoint(&b.addr, b.port));
        let first_backend = backends.next().unwrap_or_else(|| {
            if frontend.flags & SERVICE_FLAG_NO_LOCAL_BACKENDS != 0 {
                "(none on this node: traffic policy Local)".into()
            } else {
                "(none: connections are refused)".into()
            }
        });
        let [id, mut name, fe] = first;
        if frontend.flags & SERVICE_FLAG_AFFINITY != 0 {
            name = format!("{name} (affinity {}s)", frontend.affinity_timeout_s);
        }
        rows.push([id, name, fe, first_backend]);
        for backend in backends {
            rows.push([String::new(), String::new(), String::new(), backend]);
        }
        if !frontend.complete {
            rows.push([
                String::new(),
                String::new(),
                String::new(),
                "(incomplete: being repaired)".into(),
            ]);
        }
    }
    render(["ID", "SERVICE", "FRONTEND", "BACKENDS"], &rows)
}

/// Renders the reverse translations of open translated sockets, by service
/// then backend: what `getpeername()` and `recvmsg()` show instead of the
/// backend. Service names come from the names map.
pub fn socket_table(
    service_names: &[(u32, ServiceName)],
    translations: &[(SockRevNatKey, RevNat)],
) -> String {
    let names: std::collections::BTreeMap<u32, String> = service_names
        .iter()
        .map(|(id, name)| (*id, name_to_string(name)))
        .collect();
    let mut rows: Vec<[String; 4]> = translations
        .iter()
        .map(|(key, rev)| {
            [
                names
                    .get(&rev.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("(service {} removed)", rev.service_id)),
                endpoint(&rev.addr, rev.port),
                endpoint(&key.addr, key.port),
                key.cookie.to_string(),
            ]
        })
        .collect();
    rows.sort();
    render(["SERVICE", "SHOWS", "BACKEND", "SOCKET COOKIE"], &rows)
}

/// Renders drop reports, oldest first, with their age at `now_unix`.
pub fn drop_table(records: &[DropRecord], now_unix: f64) -> String {
    let rows: Vec<[String; 4]> = records
        .iter()
        .map(|r| {
            [
                format!("{:.0}s ago", (now_unix - r.unix_time).max(0.0)),
                format!("{} -> {}/{}", r.client, r.frontend, r.protocol),
                r.service.clone(),
                match (&r.source_identity, &r.destination_identity) {
                    (Some(src), Some(dst)) => {
                        format!("{} (identity {src} to {dst})", r.explanation)
                    }
                    _ => r.explanation.clone(),
                },
            ]
        })
        .collect();
    render(["WHEN", "FLOW", "SERVICE", "WHY"], &rows)
}

fn render<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addr::{addr_from_ip, port_to_be},
        desired::{DesiredState, Frontend},
        plan::{memory::MemoryMaps, plan, Capacity, MaglevSettings, Scope},
    };
    use lb_common::{
        net::PROTO_TCP,
        service::{Backend, ServiceKey, SCOPE_EXTERNAL},
    };

    #[test]
    fn drops_are_listed_with_their_age_flow_and_reason() {
        let record = DropRecord {
            unix_time: 100.0,
            reason: "drop_source_range".into(),
            explanation: "dropped: source address not in loadBalancerSourceRanges".into(),
            protocol: "TCP".into(),
            client: "192.168.100.200:51890".parse().unwrap(),
            frontend: "192.168.100.50:80".parse().unwrap(),
            service: "default/web:tcp".into(),
            source_identity: None,
            destination_identity: None,
        };
        assert_eq!(
            drop_table(&[record], 112.4),
            "WHEN     FLOW                                            SERVICE          WHY\n\
             12s ago  192.168.100.200:51890 -> 192.168.100.50:80/TCP  default/web:tcp  \
             dropped: source address not in loadBalancerSourceRanges\n"
        );
    }

    /// The maps of one frontend, `default/web:http` at 10.96.0.10:80 with
    /// backends 10.0.0.1:8080 and [fd00::2]:8080, as the plan writes them.
    fn web_dump() -> Dump {
        let key = ServiceKey {
            addr: addr_from_ip("10.96.0.10".parse().unwrap()),
            port: port_to_be(80),
            proto: PROTO_TCP,
            scope: SCOPE_EXTERNAL,
        };
        let backends = ["10.0.0.1", "fd00::2"]
            .iter()
            .map(|ip| Backend {
                addr: addr_from_ip(ip.parse().unwrap()),
                port: port_to_be(8080),
                proto: PROTO_TCP,
                flags: 0,
            })
            .collect();
        let desired = DesiredState {
            frontends: [(
                key,
                Frontend {
                    name: "default/web:http".into(),
                    backends,
                    ..Frontend::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let p = plan(
            &mut Default::default(),
            &desired,
            &Capacity::default(),
            &MaglevSettings::default(),
            Scope::All,
        );
        let mut maps = MemoryMaps::default();
        for op in p.groups.iter().flat_map(|g| &g.ops) {
            maps.write(op).unwrap();
        }
        maps.dump()
    }

    #[test]
    fn table_lists_each_backend_under_its_frontend() {
        let table = service_table(&web_dump());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ID"));
        assert!(
            lines[1].contains("default/web:http")
                && lines[1].contains("10.96.0.10:80/TCP")
                && lines[1].ends_with("10.0.0.1:8080")
        );
        assert!(lines[2].trim() == "[fd00::2]:8080");
    }

    #[test]
    fn sockets_are_listed_with_the_frontend_they_show_and_their_backend() {
        let dump = web_dump();
        let service_id = dump.services[0].1.service_id;
        let socket = |cookie, ip: &str, service_id| {
            (
                SockRevNatKey::new(cookie, addr_from_ip(ip.parse().unwrap()), port_to_be(8080)),
                RevNat {
                    addr: addr_from_ip("10.96.0.10".parse().unwrap()),
                    port: port_to_be(80),
                    pad: 0,
                    service_id,
                },
            )
        };
        let table = socket_table(
            &dump.names,
            &[
                socket(7, "fd00::2", service_id),
                socket(9, "10.0.0.1", service_id + 100),
                socket(5, "10.0.0.1", service_id),
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        let gone = format!("(service {} removed)", service_id + 100);
        let row = |line: &str, first: &str, backend: &str, cookie: &str| {
            let cells: Vec<&str> = line.split("  ").filter(|c| !c.is_empty()).collect();
            cells.iter().map(|c| c.trim()).collect::<Vec<_>>()
                == [first, "10.96.0.10:80", backend, cookie]
        };
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("SERVICE"), "{table}");
        assert!(row(lines[1], &gone, "10.0.0.1:8080", "9"), "{table}");
        assert!(
            row(lines[2], "default/web:http", "10.0.0.1:8080", "5"),
            "{table}"
        );
        assert!(
            row(lines[3], "default/web:http", "[fd00::2]:8080", "7"),
            "{table}"
        );
    }
}
