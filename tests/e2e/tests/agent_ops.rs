//! Operating the agent: health endpoints, metrics, and restarts under load.

use std::{process::Stdio, thread, time::Duration};

use anyhow::{Context, Result};
use lb_e2e::{
    agent::Agent,
    manifests::{service, slice, Endpoint},
    probe::{http_get, parse_attempts, Attempt},
    scenario::Scenario,
};

const VIP: &str = "10.96.0.10";

fn web_yaml(name: &str, vip: &str, extra_spec: &str, eps: &[Endpoint<'_>]) -> String {
    let svc = service(name, vip, &[("http", 80, "TCP", "8080")]).replace(
        "  type: ClusterIP\n",
        &format!("  type: ClusterIP\n{extra_spec}"),
    );
    format!(
        "{svc}---\n{}",
        slice(name, &format!("{name}-a"), &[("http", 8080, "TCP")], eps)
    )
}

/// `/healthz` on port 10256 answers like kube-proxy's, and `/metrics` on
/// 10249 shows what is programmed and how full the maps are.
#[test]
fn healthz_and_metrics_describe_the_agent() -> Result<()> {
    let s = Scenario::new(1, &["--node-name", "node1"])?;
    let node_url = |port: u16, path: &str| format!("http://{}:{port}{path}", s.node.ip);
    s.apply(
        "web.yaml",
        &web_yaml("web", VIP, "", &[Endpoint::ready(s.ip(1))]),
        |t| t.contains("default/web:http"),
    )?;
    let (status, body) = http_get(&s.client.netns, &node_url(10256, "/healthz"))?;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert!(
        json["lastUpdated"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    assert!(json["currentTime"].is_string(), "{body}");

    s.agent.write_manifest(
        "broken.yaml",
        &service("bad", "10.96.0.300", &[("http", 80, "TCP", "80")]),
    )?;
    s.agent
        .wait_for_log("Service default/bad", Duration::from_secs(5))?;
    let (status, metrics) = http_get(&s.client.netns, &node_url(10249, "/metrics"))?;
    assert_eq!(status, 200);
    for needle in [
        "lb_frontends 1",
        "lb_backends 1",
        "lb_map_entries{map=\"services\"} 1",
        "lb_map_capacity{map=\"services\"} 65536",
        "lb_map_capacity{map=\"backend_slots\"} 524288",
        "lb_invalid_objects 1",
        "lb_reconcile_duration_seconds_count",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let reconciles = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lb_reconciles_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(reconciles >= 2, "{metrics}");
    Ok(())
}

/// A NodePort Service with more endpoints than its Maglev table gives 100
/// slots each is still served, and is logged and counted so the operator
/// learns which `maglevTableSize` it needs.
#[test]
fn an_undersized_maglev_table_is_logged_and_counted() -> Result<()> {
    let s = Scenario::new(
        3,
        &[
            "--node-name",
            "node1",
            "--tc-interfaces",
            "eth0",
            "--maglev-table-size",
            "251",
        ],
    )?;
    let node_port = |eps: &[Endpoint<'_>]| {
        web_yaml("web", VIP, "", eps)
            .replace("type: ClusterIP", "type: NodePort")
            .replace(
                "    targetPort: 8080\n",
                "    targetPort: 8080\n    nodePort: 30080\n",
            )
    };
    let three: Vec<Endpoint> = (1..=3).map(|i| Endpoint::ready(s.ip(i))).collect();
    s.apply("web.yaml", &node_port(&three), |t| t.contains(":30080/TCP"))?;
    s.agent.wait_for_log(
        "service=default/web:http backends=3 wanted_size=509",
        Duration::from_secs(5),
    )?;
    s.agent.wait_for_log(
        "raise maglevTableSize to wanted_size",
        Duration::from_secs(1),
    )?;
    let metrics_url = format!("http://{}:10249/metrics", s.node.ip);
    let (_, metrics) = http_get(&s.client.netns, &metrics_url)?;
    assert!(
        metrics.contains("lb_maglev_undersized_service_ports 1"),
        "{metrics}"
    );

    s.apply("web.yaml", &node_port(&three[..2]), |t| {
        t.contains(":30080/TCP")
    })?;
    let mut last = String::new();
    for _ in 0..50 {
        last = http_get(&s.client.netns, &metrics_url)?.1;
        if last.contains("lb_maglev_undersized_service_ports 0") {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("still counted with 2 backends:\n{last}")
}

/// Upstream: network/loadbalancer.go "should only target nodes with endpoints"
/// (kube-proxy side): a healthCheckNodePort answers 200 with kube-proxy's JSON
/// while this node has a ready endpoint of the Service, 503 when it has none.
#[test]
fn health_check_node_port_reports_local_endpoints() -> Result<()> {
    let s = Scenario::new(1, &["--node-name", "node1"])?;
    let lb = "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n";
    let as_lb = |eps: &[Endpoint<'_>]| {
        web_yaml("web", VIP, lb, eps).replace("type: ClusterIP", "type: LoadBalancer")
    };
    s.apply(
        "web.yaml",
        &as_lb(&[Endpoint::ready(s.ip(1)).on("node1")]),
        |t| t.contains("default/web:http"),
    )?;
    let url = format!("http://{}:32100/", s.node.ip);
    // Slow clients on both the probe port and the healthCheckNodePort (a
    // byte now and then, never a whole request) do not keep either from
    // answering.
    let mut slow = Vec::new();
    for port in [10256, 32100] {
        let target: std::net::SocketAddr = format!("{}:{port}", s.node.ip).parse()?;
        for _ in 0..40 {
            let mut stream = s.lab.tcp_connect_from(&s.client, target)?;
            std::io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\n")?;
            slow.push(stream);
        }
    }
    for _ in 0..3 {
        for stream in &mut slow {
            let _ = std::io::Write::write_all(stream, b"X");
        }
        let livez = http_get(
            &s.client.netns,
            &format!("http://{}:10256/livez", s.node.ip),
        )?;
        assert_eq!(livez.0, 200, "{}", livez.1);
        let (status, body) = http_get(&s.client.netns, &url)?;
        assert_eq!(status, 200, "{body}");
        thread::sleep(Duration::from_millis(700));
    }
    drop(slow);
    let (status, body) = http_get(&s.client.netns, &url)?;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(json["service"]["namespace"], "default");
    assert_eq!(json["service"]["name"], "web");
    assert_eq!(json["localEndpoints"], 1);
    assert_eq!(json["serviceProxyHealthy"], true);

    s.agent
        .write_manifest("web.yaml", &as_lb(&[Endpoint::ready(s.ip(1)).on("node2")]))?;
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = http_get(&s.client.netns, &url)?;
        if last.0 == 503 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("\"localEndpoints\":0"), "{}", last.1);
    Ok(())
}

/// SIGKILL of the agent under a connection load fails no connection; the
/// restarted agent adopts the pinned state, removes what was deleted while it
/// was down, adds what was created, and leaves unchanged entries alone.
#[test]
fn sigkill_under_load_fails_no_connection_and_restart_reconciles() -> Result<()> {
    let mut s = Scenario::new(2, &[])?;
    let (ip1, ip2) = (s.ip(1).to_owned(), s.ip(2).to_owned());
    let eps = [Endpoint::ready(&ip1), Endpoint::ready(&ip2)];
    s.apply("web.yaml", &web_yaml("web", VIP, "", &eps), |t| {
        t.contains("default/web:http")
    })?;
    s.apply("old.yaml", &web_yaml("old", "10.96.0.20", "", &eps), |t| {
        t.contains("default/old:http")
    })?;
    let id_of = |table: &str, name: &str| -> Option<String> {
        table
            .lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
    };
    let before = s.agent.service_list()?;

    let load = s
        .lab
        .command_in(&s.client, &s.bins.labpod)?
        .args([
            "connect",
            "--target",
            &format!("{VIP}:80"),
            "--count",
            "1500",
            "--interval-ms",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    thread::sleep(Duration::from_millis(500));
    s.agent.kill();
    std::fs::remove_file(s.agent.manifests.join("old.yaml"))?;
    s.agent
        .write_manifest("new.yaml", &web_yaml("new", "10.96.0.30", "", &eps))?;
    thread::sleep(Duration::from_millis(500));
    s.agent = Agent::start(&s.lab, &s.bins, &s.node)?;
    let after = s.agent.wait_for_services(Duration::from_secs(10), |t| {
        t.contains("default/new:http") && !t.contains("default/old:http")
    })?;
    let attempts: Vec<Attempt> = parse_attempts(&load.wait_with_output()?.stdout)?;
    assert_eq!(attempts.len(), 1500);
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{} failed connections: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(
        id_of(&before, "default/web:http"),
        id_of(&after, "default/web:http")
    );
    // Deleting `old` is 5 writes (frontend, 2 slots, reverse NAT, name) and
    // adding `new` 5 more (2 slots, reverse NAT, name, frontend; the backends
    // are shared): `web` is not touched.
    s.agent
        .wait_for_log("reconciled frontends=2 writes=10 ", Duration::from_secs(5))?;
    let connected = s.connect("10.96.0.30:80", 5, &[])?;
    assert!(connected.iter().all(|a| a.ok), "{connected:?}");
    Ok(())
}

/// Runs the agent with `prefix` before it and `args` after it; it must exit
/// with an error within 10 s. Returns its stderr.
fn failed_start(prefix: &[&str], args: &[&str]) -> Result<String> {
    let bins = lb_e2e::agent::Binaries::locate()?;
    let scratch = std::env::temp_dir().join(format!("lb-start-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut command = std::process::Command::new(program);
            command.args(rest).arg(&bins.agent);
            command
        }
        None => std::process::Command::new(&bins.agent),
    };
    let mut child = command
        .arg("--manifests")
        .arg(&scratch)
        .args([
            "--metrics-address",
            "0.0.0.0:0",
            "--healthz-address",
            "0.0.0.0:0",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the agent did not stop on a bad start");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output()?;
    assert!(!output.status.success());
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A start that cannot work says what is wrong and how to fix it, rather
/// than a bare "No such file or directory": under `ip netns exec` (which
/// mounts a fresh /sys, hiding bpffs and the cgroup v2 mount), with pins
/// outside bpffs, and with a --cgroup that is not a cgroup v2 directory.
#[test]
fn a_start_that_cannot_work_says_why_and_how_to_fix_it() -> Result<()> {
    lb_e2e::scenario::require_root();
    let netns = format!("lb-start-{}", std::process::id());
    let created = std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()?;
    anyhow::ensure!(created.success(), "ip netns add {netns}");
    let pins = format!("/sys/fs/bpf/lb-start-{}", std::process::id());
    let under_netns_exec = failed_start(&["ip", "netns", "exec", &netns], &["--bpffs-dir", &pins]);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &netns])
        .status();
    let stderr = under_netns_exec?;
    assert!(stderr.contains("nsenter --net="), "{stderr}");
    assert!(!stderr.contains("No such file or directory"), "{stderr}");

    let not_bpffs = std::env::temp_dir().join(format!("lb-start-pins-{}", std::process::id()));
    let stderr = failed_start(&[], &["--bpffs-dir", &not_bpffs.display().to_string()])?;
    let _ = std::fs::remove_dir_all(&not_bpffs);
    assert!(
        stderr.contains("is not on a bpffs mount") && stderr.contains("mount -t bpf"),
        "{stderr}"
    );

    let not_a_cgroup = std::env::temp_dir();
    let stderr = failed_start(
        &[],
        &[
            "--cgroup",
            &not_a_cgroup.display().to_string(),
            "--bpffs-dir",
            &pins,
        ],
    )?;
    let _ = std::fs::remove_dir_all(&pins);
    assert!(stderr.contains("is not a cgroup v2 directory"), "{stderr}");
    Ok(())
}

/// The status code of `GET path` on `address`, from the test's own
/// network namespace.
fn status_of(address: &str, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {response:?}"))?;
    Ok(code)
}

/// kube-proxy's health semantics: with the API server unreachable at start,
/// the agent is alive (`/livez` 200: restarting it would not help) but not
/// ready (`/healthz` 503: nothing is programmed yet).
#[test]
fn an_agent_started_without_its_api_server_is_alive_but_not_ready() -> Result<()> {
    lb_e2e::scenario::require_root();
    let bins = lb_e2e::agent::Binaries::locate()?;
    let id = std::process::id();
    let scratch = std::env::temp_dir().join(format!("lb-livez-{id}"));
    std::fs::create_dir_all(&scratch)?;
    let kubeconfig = scratch.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )?;
    // A port free right now (the kernel's pick), for the agent to bind.
    let healthz = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let pins = format!("/sys/fs/bpf/lb-livez-{id}");
    let mut agent = std::process::Command::new(&bins.agent)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", "node1", "--metrics-address", "127.0.0.1:0"])
        .args(["--healthz-address", &healthz, "--bpffs-dir", &pins])
        .args(["--network-policy", "false"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.join("agent.log"))?)
        .spawn()?;
    let result = (|| -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match (
                status_of(&healthz, "/livez"),
                status_of(&healthz, "/healthz"),
            ) {
                (Ok(200), Ok(503)) => return Ok(()),
                other if std::time::Instant::now() > deadline => anyhow::bail!(
                    "/livez and /healthz answered {other:?}; agent log:\n{}",
                    std::fs::read_to_string(scratch.join("agent.log")).unwrap_or_default()
                ),
                _ => thread::sleep(Duration::from_millis(200)),
            }
        }
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Map capacities are settings (issue 22, item 5): with room for two
/// frontends, a third Service is reported per frontend and not programmed,
/// the first two serve, and the third is programmed once another Service
/// goes.
#[test]
fn a_full_service_map_refuses_the_frontend_that_does_not_fit() -> Result<()> {
    let s = Scenario::new(1, &["--node-name", "node1", "--service-capacity", "2"])?;
    let eps = [Endpoint::ready(s.ip(1))];
    let services = |names: &[(&str, &str)]| {
        names
            .iter()
            .map(|(name, vip)| web_yaml(name, vip, "", &eps))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    s.apply(
        "web.yaml",
        &services(&[
            ("a", "10.96.0.11"),
            ("b", "10.96.0.12"),
            ("c", "10.96.0.13"),
        ]),
        |t| t.contains("default/a:http") && t.contains("default/b:http"),
    )?;
    let refused = "lb_frontend_not_programmed{frontend=\"default/c:http\",map=\"service\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.metric(refused).is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "c was not reported");
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.metric("lb_map_capacity{map=\"services\"}")?, 2.0);
    assert!(!s.agent.service_list()?.contains("default/c:http"));
    let served = s.connect("10.96.0.11:80", 3, &[])?;
    assert!(served.iter().all(|a| a.ok), "{served:?}");

    s.apply(
        "web.yaml",
        &services(&[("b", "10.96.0.12"), ("c", "10.96.0.13")]),
        |t| t.contains("default/c:http"),
    )?;
    let served = s.connect("10.96.0.13:80", 3, &[])?;
    assert!(served.iter().all(|a| a.ok), "{served:?}");
    Ok(())
}
