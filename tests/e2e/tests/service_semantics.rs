//! Where kube-proxy and a new user's expectations meet the YAML source:
//! contested addresses and objects the API server would have rejected.
//! Needs root (network namespaces, cgroups, BPF); `make test` runs as root.

use std::time::Duration;

use anyhow::Result;
use lb_e2e::{
    manifests::{endpoint_slice, service},
    probe::per_backend,
    scenario::Scenario,
};

const VIP: &str = "10.96.0.10";

/// Service `name` on VIP:80 -> 8080 with the scenario's server `server` as
/// its only endpoint.
fn web(s: &Scenario, name: &str, server: usize) -> String {
    format!(
        "{}---\n{}",
        service(name, VIP, &[("http", 80, "TCP", "8080")]),
        endpoint_slice(
            name,
            &format!("{name}-abc12"),
            ("http", 8080, "TCP"),
            &[&s.servers[server].ip]
        )
    )
}

/// Which server answered connections to the VIP; every one must succeed.
fn answering(s: &Scenario) -> Result<Vec<String>> {
    let attempts = s.connect(&format!("{VIP}:80"), 10, &[])?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    Ok(per_backend(&attempts).into_keys().collect())
}

/// kube-proxy: a Service deleted and another created with the same
/// clusterIP in one sync serves the new one (its rules are rebuilt from
/// the whole set each sync). Replacing one Service by another on the same
/// address in one update must not leave the VIP unprogrammed.
#[test]
fn a_service_replaced_by_another_on_its_cluster_ip_serves_at_once() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    s.apply("web.yaml", &web(&s, "web", 0), |t| {
        t.contains("default/web:http")
    })?;
    assert_eq!(answering(&s)?, ["web-1"]);
    s.apply("web.yaml", &web(&s, "web-v2", 1), |t| {
        t.contains("default/web-v2:http") && !t.contains("default/web:http")
    })?;
    assert_eq!(answering(&s)?, ["web-2"]);
    assert!(
        !s.agent.log_text().contains("already used"),
        "{}",
        s.agent.log_text()
    );
    Ok(())
}

/// Two live Services on one address: the first by name (the oldest, with
/// the API) serves, the other is told why with its file, and takes over
/// the moment the owner goes.
#[test]
fn a_refused_claimant_serves_as_soon_as_the_owner_goes() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    s.apply("alpha.yaml", &web(&s, "alpha", 0), |t| {
        t.contains("default/alpha:http")
    })?;
    s.agent.write_manifest("beta.yaml", &web(&s, "beta", 1))?;
    s.agent.wait_for_log(
        "beta.yaml object=Service default/beta field=spec reason=frontend 10.96.0.10:80/TCP of default/beta:http is already used by default/alpha",
        Duration::from_secs(5),
    )?;
    assert_eq!(answering(&s)?, ["web-1"]);
    s.agent.remove_manifest("alpha.yaml")?;
    s.agent.wait_for_services(Duration::from_secs(5), |t| {
        t.contains("default/beta:http") && !t.contains("default/alpha:http")
    })?;
    assert_eq!(answering(&s)?, ["web-2"]);
    Ok(())
}

/// The API server rejects a Service whose two ports share a name (and
/// EndpointSlice ports, matched by name, could not be told apart); the YAML
/// source rejects it whole, with file, object and field, and the rest of
/// the directory is programmed.
#[test]
fn a_service_the_api_server_would_reject_is_not_programmed_at_all() -> Result<()> {
    let s = Scenario::new(1, &["--service-cidrs", "10.96.0.0/16"])?;
    s.apply("web.yaml", &web(&s, "web", 0), |t| {
        t.contains("default/web:http")
    })?;
    s.agent.write_manifest(
        "bad.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service(
                "twins",
                "10.96.0.20",
                &[("http", 80, "TCP", "8080"), ("http", 81, "TCP", "8081")]
            ),
            service("outside", "10.200.0.1", &[("http", 80, "TCP", "8080")]),
            endpoint_slice(
                "twins",
                "twins-abc12",
                ("http", 8080, "TCP"),
                &[&s.servers[0].ip]
            ),
        ),
    )?;
    for needle in [
        "bad.yaml object=Service default/twins field=spec.ports[1].name",
        "bad.yaml object=Service default/outside field=spec.clusterIP reason=10.200.0.1 is outside the service CIDRs (10.96.0.0/16)",
    ] {
        s.agent.wait_for_log(needle, Duration::from_secs(5))?;
    }
    let table = s.agent.service_list()?;
    assert!(
        !table.contains("10.96.0.20") && !table.contains("10.200.0.1"),
        "{table}"
    );
    assert_eq!(answering(&s)?, ["web-1"]);
    Ok(())
}
