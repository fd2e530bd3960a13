//! What the agent serves over HTTP: kube-proxy's `/healthz` and the
//! healthCheckNodePorts ([`health`]), Prometheus metrics ([`metrics`]) and
//! the latest drop reports, on a small bounded server ([`http`]).

pub mod health;
pub mod http;
pub mod metrics;
