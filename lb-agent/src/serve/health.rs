//! `/healthz` as kube-proxy serves it, and the healthCheckNodePort servers of
//! LoadBalancer Services with externalTrafficPolicy Local.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::jiff::Timestamp;
use lb_core::desired::ServiceHealth;

use super::http::{Handler, Response, Server};

/// RFC 3339 UTC timestamp with seconds, as Go's `time.Time` marshals to JSON.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|secs| Timestamp::from_second(secs).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

/// How long a change may wait to be programmed before `/healthz` reports the
/// agent unhealthy: kube-proxy's health timeout (twice its 30 s sync period).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the main loop may go without turning before `/livez` fails and
/// the kubelet restarts the agent. The loop turns at least once a second
/// when idle; a full reconciliation of 10,000 Services takes seconds.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What `/healthz` and `/livez` report on.
struct HealthState {
    /// The last time the datapath was brought up to date.
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<Instant>,
    /// The main loop's last turn.
    last_turn: Instant,
    /// Whether the node should get new load-balancer traffic.
    node_eligible: bool,
}

/// The agent's health as kube-proxy defines it: `/healthz` (readiness, and
/// what cloud load balancers probe) is 200 once the datapath is programmed,
/// while no change has waited longer than [`HEALTH_TIMEOUT`] and the node
/// is eligible; `/livez` is 200 while the main loop turns, whether or not
/// it has synced (an API server down at start must not become a restart
/// loop), and ignores node eligibility.
#[derive(Clone)]
pub struct Healthz {
    state: Arc<Mutex<HealthState>>,
}

impl Default for Healthz {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(HealthState {
                last_updated: None,
                pending_since: None,
                last_turn: Instant::now(),
                node_eligible: true,
            })),
        }
    }
}

impl Healthz {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().expect("not poisoned")
    }

    /// Records a turn of the main loop.
    pub fn turned(&self) {
        self.state().last_turn = Instant::now();
    }

    /// Records a change waiting to be programmed.
    pub fn queued(&self) {
        self.state().pending_since.get_or_insert_with(Instant::now);
    }

    /// Records a reconciliation: everything queued so far is programmed.
    pub fn updated(&self) {
        let mut state = self.state();
        state.last_updated = Some(SystemTime::now());
        state.pending_since = None;
    }

    /// Records whether the node should get new load-balancer traffic.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// `/healthz` at `now` (wall clock `wall`).
    fn healthz_at(&self, now: Instant, wall: SystemTime) -> Response {
        let state = self.state();
        let synced = state.last_updated.is_some();
        let stale = state
            .pending_since
            .is_some_and(|since| now.saturating_duration_since(since) > HEALTH_TIMEOUT);
        let healthy = synced && !stale && state.node_eligible;
        let body = serde_json::json!({
            "lastUpdated": state.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(wall),
            "nodeEligible": state.node_eligible,
        });
        Response::json(if healthy { 200 } else { 503 }, body.to_string())
    }

    /// `/livez` at `now` (wall clock `wall`).
    fn livez_at(&self, now: Instant, wall: SystemTime) -> Response {
        let state = self.state();
        let turning = now.saturating_duration_since(state.last_turn) <= LIVENESS_TIMEOUT;
        let body = serde_json::json!({
            "lastUpdated": state.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(wall),
        });
        Response::json(if turning { 200 } else { 503 }, body.to_string())
    }

    /// A handler for `/healthz` and `/livez`.
    pub fn handler(&self, extra: Option<Handler>) -> Handler {
        let health = self.clone();
        Arc::new(move |path| match path {
            "/healthz" => Some(health.healthz_at(Instant::now(), SystemTime::now())),
            "/livez" => Some(health.livez_at(Instant::now(), SystemTime::now())),
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
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert_eq!(healthz.healthz_at(now, wall).status, 503);
        assert_eq!(
            healthz.livez_at(now, wall).status,
            200,
            "alive before the first sync: an API server down at start is no reason to restart"
        );
        healthz.updated();
        let response = healthz.healthz_at(Instant::now(), wall);
        assert_eq!(response.status, 200);
        assert!(
            response.body.contains("\"lastUpdated\":\"20"),
            "{}",
            response.body
        );
    }

    #[test]
    fn a_change_waiting_too_long_makes_healthz_fail_until_it_is_programmed() {
        let healthz = Healthz::default();
        healthz.updated();
        healthz.queued();
        let wall = SystemTime::now();
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(healthz.healthz_at(soon, wall).status, 200);
        let late = Instant::now() + HEALTH_TIMEOUT + Duration::from_secs(1);
        assert_eq!(healthz.healthz_at(late, wall).status, 503);
        healthz.updated();
        assert_eq!(healthz.healthz_at(late, wall).status, 200);
    }

    #[test]
    fn a_stuck_main_loop_fails_livez() {
        let healthz = Healthz::default();
        healthz.updated();
        let wall = SystemTime::now();
        let stuck = Instant::now() + LIVENESS_TIMEOUT + Duration::from_secs(1);
        assert_eq!(healthz.livez_at(stuck, wall).status, 503);
        assert_eq!(
            healthz.healthz_at(stuck, wall).status,
            200,
            "nothing was waiting to be programmed"
        );
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let healthz = Healthz::default();
        healthz.updated();
        healthz.set_node_eligible(false);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let response = healthz.healthz_at(now, wall);
        assert_eq!(response.status, 503);
        assert!(
            response.body.contains("\"nodeEligible\":false"),
            "{}",
            response.body
        );
        assert_eq!(healthz.livez_at(now, wall).status, 200);
    }
}
