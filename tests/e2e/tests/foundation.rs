//! The first vertical slice: Services written as Kubernetes YAML reach pods
//! through socket-level VIP translation, in the lab, on the real kernel.
//! Needs root (network namespaces, cgroups, BPF); `make test` runs as root.

use std::{thread, time::Duration};

use anyhow::{Context, Result};
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::{Lab, Node, Pod},
    manifests::{endpoint_slice, service},
    probe::{per_backend, Attempt},
    scenario::Scenario,
};

const VIP: &str = "10.96.0.10";

fn setup(servers: usize) -> Result<Scenario> {
    Scenario::new(servers, &[])
}

/// Publishes Service `web` (VIP:80 -> 8080) with `endpoints` as its slice.
fn publish_web(s: &Scenario, endpoints: &[&Pod]) -> Result<String> {
    let ips: Vec<&str> = endpoints.iter().map(|p| p.ip.as_str()).collect();
    s.apply(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", VIP, &[("http", 80, "TCP", "8080")]),
            endpoint_slice("web", "web-abc12", ("http", 8080, "TCP"), &ips)
        ),
        |table| {
            table.lines().count() == ips.len().max(1) + 1
                && ips.iter().all(|ip| table.contains(&format!("{ip}:8080")))
        },
    )
}

fn connect(s: &Scenario, count: u32) -> Result<Vec<Attempt>> {
    s.connect(&format!("{VIP}:80"), count, &[])
}

/// Upstream: test/e2e/network/service.go "should serve a basic endpoint from pods"
/// and "should be able to up and down services" (spread over endpoints).
#[test]
fn clusterip_reaches_every_backend_with_addresses_preserved() -> Result<()> {
    let s = setup(3)?;
    let all: Vec<&Pod> = s.servers.iter().collect();
    let table = publish_web(&s, &all)?;
    assert!(
        table.contains("default/web:http") && table.contains("10.96.0.10:80/TCP"),
        "{table}"
    );

    let attempts = connect(&s, 300)?;
    let failures: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    let counts = per_backend(&attempts);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, count) in &counts {
        let share = *count as f64 / 300.0;
        assert!(
            (0.20..=0.47).contains(&share),
            "{backend} got {share:.2} of connections: {counts:?}"
        );
    }
    for attempt in &attempts {
        assert_eq!(
            attempt.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername must show the VIP"
        );
        let seen = attempt.seen_source.as_deref().unwrap_or_default();
        assert!(
            seen.starts_with(&format!("{}:", s.client.ip)),
            "server saw {seen}, not the client pod"
        );
    }
    Ok(())
}

/// Upstream: test/e2e/network/service.go "should be able to update service type"
/// family: endpoint updates reach the proxy; here a removed backend gets no new
/// connections one second after the EndpointSlice file changes, and an added
/// one does.
#[test]
fn endpoint_changes_apply_within_a_second() -> Result<()> {
    let s = setup(3)?;
    let (b1, b2, b3) = (&s.servers[0], &s.servers[1], &s.servers[2]);
    publish_web(&s, &[b1, b2])?;
    let before = per_backend(&connect(&s, 60)?);
    assert!(
        before.contains_key("web-1") && before.contains_key("web-2"),
        "{before:?}"
    );

    s.agent.write_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", VIP, &[("http", 80, "TCP", "8080")]),
            endpoint_slice("web", "web-abc12", ("http", 8080, "TCP"), &[&b2.ip, &b3.ip])
        ),
    )?;
    thread::sleep(Duration::from_secs(1));
    let attempts = connect(&s, 100)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    let after = per_backend(&attempts);
    assert!(
        !after.contains_key("web-1"),
        "removed backend still chosen: {after:?}"
    );
    assert!(
        after.contains_key("web-3"),
        "added backend never chosen: {after:?}"
    );
    assert!(after.contains_key("web-2"), "{after:?}");
    Ok(())
}

/// Upstream: test/e2e/network/service.go "should be rejected when no endpoints
/// exist": the connection is refused at once, never left to time out.
#[test]
fn service_without_endpoints_refuses_at_once() -> Result<()> {
    let s = setup(1)?;
    let table = publish_web(&s, &[])?;
    assert!(table.contains("connections are refused"), "{table}");
    let started = std::time::Instant::now();
    let attempts = connect(&s, 5)?;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refusal must not wait for a timeout"
    );
    for attempt in attempts {
        assert_eq!(attempt.errno, Some(libc::ECONNREFUSED), "{attempt:?}");
    }
    Ok(())
}

/// An invalid object next to valid ones is reported with file, object and
/// field, and the valid services keep working.
#[test]
fn invalid_objects_are_reported_and_skipped() -> Result<()> {
    let s = setup(2)?;
    let all: Vec<&Pod> = s.servers.iter().collect();
    publish_web(&s, &all)?;
    s.agent.write_manifest(
        "broken.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service("bad-ip", "10.96.0.300", &[("http", 80, "TCP", "8080")]),
            service("zero-port", "10.96.0.12", &[("http", 0, "TCP", "8080")]),
            "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: default\nspec:\n  clusterIP: 10.96.0.13\n  ports: [{port: 80}]\n",
        ),
    )?;
    for needle in [
        "broken.yaml object=Service default/bad-ip field=spec.clusterIP",
        "broken.yaml object=Service default/zero-port field=spec.ports[0].port",
        "broken.yaml object=Service (unnamed) field=metadata.name",
    ] {
        s.agent.wait_for_log(needle, Duration::from_secs(5))?;
    }
    let table = s.agent.service_list()?;
    assert!(
        !table.contains("bad-ip") && !table.contains("10.96.0.13"),
        "{table}"
    );
    let attempts = connect(&s, 20)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    Ok(())
}

/// The datapath survives the agent: with the agent killed, pinned programs
/// and maps keep translating; a restarted agent adopts them.
#[test]
fn translation_survives_agent_restart() -> Result<()> {
    let mut s = setup(2)?;
    let all: Vec<&Pod> = s.servers.iter().collect();
    publish_web(&s, &all)?;
    s.agent.kill();
    let attempts = connect(&s, 20)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");

    // The restarted agent reads the same manifests and finds nothing to write.
    s.agent = Agent::start(&s.lab, &s.bins, &s.node)?;
    s.agent
        .wait_for_log("reconciled frontends=1 writes=0 ", Duration::from_secs(5))?;
    let attempts = connect(&s, 20)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    Ok(())
}

/// One connection from the client to the VIP, held open `hold_ms` after its
/// answer and then checked again (labpod `--hold-ms`).
fn hold_connection(lab: &Lab, bins: &Binaries, client: &Pod, hold_ms: u32) -> Result<Vec<Attempt>> {
    let target = format!("{VIP}:80");
    let hold = hold_ms.to_string();
    let args = ["connect", "--target", &target, "--hold-ms", &hold];
    let output = lab.run_in(client, &bins.labpod, &args)?;
    lb_e2e::probe::parse_attempts(&output.stdout)
}

/// Holds one connection to the VIP while the agent is killed, `between`
/// runs, and a new agent starts; returns what the connection saw.
fn hold_across_restart(
    s: &mut Scenario,
    between: impl FnOnce(&Node) -> Result<()>,
) -> Result<Vec<Attempt>> {
    let all: Vec<&Pod> = s.servers.iter().collect();
    publish_web(s, &all)?;
    let (lab, bins, client, node) = (&s.lab, &s.bins, &s.client, &s.node);
    let agent = &mut s.agent;
    thread::scope(|scope| -> Result<Vec<Attempt>> {
        let connection = scope.spawn(move || hold_connection(lab, bins, client, 3000));
        thread::sleep(Duration::from_millis(500));
        agent.kill();
        between(node)?;
        *agent = Agent::start(lab, bins, node)?;
        agent.wait_for_log("ready: programs attached", Duration::from_secs(5))?;
        connection.join().expect("the connection thread")
    })
}

fn assert_shows_the_service(held: &[Attempt]) {
    assert_eq!(held.len(), 1);
    assert!(held[0].ok, "{held:?}");
    assert_eq!(held[0].peer.as_deref(), Some("10.96.0.10:80"));
}

/// A connection opened before an agent restart keeps working and keeps
/// showing the Service as its peer: the restarted agent's programs reuse the
/// pinned reverse-translation map.
#[test]
fn a_connection_held_across_a_restart_still_shows_the_service() -> Result<()> {
    let mut s = setup(1)?;
    let held = hold_across_restart(&mut s, |_| Ok(()))?;
    assert_shows_the_service(&held);
    Ok(())
}

/// An agent that finds backends pinned but no backend-port set (an upgrade
/// from a version without it) rebuilds the set from the backends, so the
/// reverse hooks do not skip sockets translated before the upgrade.
#[test]
fn an_upgraded_agent_rebuilds_the_backend_ports_from_the_pinned_backends() -> Result<()> {
    let mut s = setup(1)?;
    let held = hold_across_restart(&mut s, |node| {
        let pin = node.bpffs.join("LB_BEPORT_V1");
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))
    })?;
    assert_shows_the_service(&held);
    Ok(())
}

/// A connection keeps showing the Service after the Service is deleted (it
/// keeps flowing, as with kube-proxy): the port of its backend stays in the
/// set of backend ports the reverse hooks consult.
#[test]
fn a_connection_held_while_its_service_is_deleted_still_shows_the_service() -> Result<()> {
    let s = setup(1)?;
    let all: Vec<&Pod> = s.servers.iter().collect();
    publish_web(&s, &all)?;
    let held = thread::scope(|scope| -> Result<Vec<Attempt>> {
        let connection = scope.spawn(|| hold_connection(&s.lab, &s.bins, &s.client, 2500));
        thread::sleep(Duration::from_millis(500));
        std::fs::remove_file(s.agent.manifests.join("web.yaml"))?;
        s.agent
            .wait_for_services(Duration::from_secs(5), |table| !table.contains("web"))?;
        connection.join().expect("the connection thread")
    })?;
    assert_shows_the_service(&held);
    Ok(())
}

/// A closed connection leaves no reverse translation behind (short
/// connections must not push the entries of long ones out of the LRU), and
/// an open one is listed by `lbctl socket list` with the VIP it shows.
#[test]
fn closed_connections_leave_no_reverse_translation_and_open_ones_are_listed() -> Result<()> {
    let s = setup(1)?;
    let all: Vec<&Pod> = s.servers.iter().collect();
    publish_web(&s, &all)?;
    let attempts = connect(&s, 50)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    let rows = |table: &str| table.lines().skip(1).count();
    let after_close = s.agent.socket_list()?;
    assert_eq!(rows(&after_close), 0, "{after_close}");

    let backend = format!("{}:8080", s.servers[0].ip);
    let while_open = thread::scope(|scope| -> Result<String> {
        let connection = scope.spawn(|| hold_connection(&s.lab, &s.bins, &s.client, 2000));
        thread::sleep(Duration::from_millis(700));
        let table = s.agent.socket_list();
        let held = connection.join().expect("the connection thread")?;
        assert!(held.len() == 1 && held[0].ok, "{held:?}");
        table
    })?;
    assert_eq!(rows(&while_open), 1, "{while_open}");
    let row = while_open.lines().nth(1).unwrap_or_default();
    assert!(
        row.contains("default/web") && row.contains(&format!("{VIP}:80")) && row.contains(&backend),
        "{while_open}"
    );
    let after_hold = s.agent.socket_list()?;
    assert_eq!(rows(&after_hold), 0, "{after_hold}");
    Ok(())
}
