//! `/healthz` as kube-proxy serves it, and the healthCheckNodePort servers of
//! LoadBalancer Services with externalTrafficPolicy Local.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use lb_core::desired::ServiceHealth;

use super::http::{Handler, Response, Server};

/// RFC 3339 UTC timestamp with seconds, as Go's `time.Time` marshals to JSON.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether the agent has programmed the datapath, and when it last did.
#[derive(Clone, Default)]
pub struct Healthz {
    last_updated: Arc<Mutex<Option<SystemTime>>>,
}

impl Healthz {
    /// Records a successful reconciliation.
    pub fn updated(&self) {
        *self.last_updated.lock().expect("not poisoned") = Some(SystemTime::now());
    }

    /// kube-proxy's answer: 200 once the datapath is programmed, 503 before.
    pub fn response(&self) -> Response {
        let last = *self.last_updated.lock().expect("not poisoned");
        let now = SystemTime::now();
        let body = serde_json::json!({
            "lastUpdated": last.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
            "nodeEligible": true,
        });
        Response::json(if last.is_some() { 200 } else { 503 }, body.to_string())
    }

    /// A handler for `/healthz` (and `/livez`).
    pub fn handler(&self, extra: Option<Handler>) -> Handler {
        let health = self.clone();
        Arc::new(move |path| match path {
            "/healthz" | "/livez" => Some(health.response()),
            other => extra.as_ref().and_then(|h| h(other)),
        })
    }
}

/// kube-proxy's healthCheckNodePort answer for one Service.
pub fn service_health_response(health: &ServiceHealth) -> Response {
    let body = serde_json::json!({
        "service": {"namespace": health.namespace, "name": health.name},
        "localEndpoints": health.local_endpoints,
        "serviceProxyHealthy": true,
    });
    Response::json(
        if health.local_endpoints > 0 { 200 } else { 503 },
        body.to_string(),
    )
}

/// One server per healthCheckNodePort, opened and closed as Services change.
pub struct HealthCheckServers {
    bind_ip: std::net::IpAddr,
    servers: BTreeMap<u16, (Server, Arc<RwLock<ServiceHealth>>)>,
}

impl HealthCheckServers {
    /// Servers will listen on `bind_ip` (all node addresses: `0.0.0.0` or `::`).
    pub fn new(bind_ip: std::net::IpAddr) -> Self {
        Self {
            bind_ip,
            servers: BTreeMap::new(),
        }
    }

    /// Makes the running servers match `wanted`. Returns the ports that could
    /// not be opened, with the reason; the other ports are unaffected.
    pub fn update(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) -> Vec<String> {
        self.servers.retain(|port, _| wanted.contains_key(port));
        let mut errors = Vec::new();
        for (port, health) in wanted {
            if let Some((_, state)) = self.servers.get(port) {
                *state.write().expect("not poisoned") = health.clone();
                continue;
            }
            let state = Arc::new(RwLock::new(health.clone()));
            let shared = state.clone();
            let handler: Handler = Arc::new(move |_| {
                Some(service_health_response(
                    &shared.read().expect("not poisoned"),
                ))
            });
            match Server::start(SocketAddr::new(self.bind_ip, *port), handler) {
                Ok(server) => {
                    self.servers.insert(*port, (server, state));
                }
                Err(err) => errors.push(format!(
                    "healthCheckNodePort {port} of {}/{}: {err}",
                    health.namespace, health.name
                )),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_612_345);
        assert_eq!(rfc3339(t), "2026-11-25T13:12:25Z");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn service_health_follows_local_endpoints() {
        let mut health = ServiceHealth {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let ok = service_health_response(&health);
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.body,
            r#"{"localEndpoints":2,"service":{"name":"web","namespace":"default"},"serviceProxyHealthy":true}"#
        );
        health.local_endpoints = 0;
        assert_eq!(service_health_response(&health).status, 503);
    }

    #[test]
    fn healthz_is_unavailable_until_the_first_sync() {
        let healthz = Healthz::default();
        assert_eq!(healthz.response().status, 503);
        healthz.updated();
        let response = healthz.response();
        assert_eq!(response.status, 200);
        assert!(
            response.body.contains("\"lastUpdated\":\"20"),
            "{}",
            response.body
        );
    }
}
