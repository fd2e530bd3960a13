//! Generators for the rules kube-proxy itself would program, so the benchmark
//! can measure the incumbent without a kube-proxy binary.
//!
//! * [`iptables_restore`] renders the `iptables-restore` input of kube-proxy's
//!   iptables mode (first full sync): the `filter` and `nat` tables with
//!   `KUBE-SERVICES` -> `KUBE-SVC-<hash>` -> `KUBE-SEP-<hash>`, the
//!   `statistic --mode random --probability 1/(n-i)` endpoint selection,
//!   `KUBE-MARK-MASQ`, `KUBE-POSTROUTING` and the DNAT rules, plus the jumps
//!   from the built-in chains that kube-proxy installs with `iptables -I`.
//! * [`nft_script`] renders the `nft -f` input of kube-proxy's nftables mode
//!   (first full sync): the `ip kube-proxy` table, its base chains, the
//!   `service-ips` verdict map and per-service chains that pick an endpoint
//!   chain with `numgen random mod N vmap`.
//!
//! Chain names are hashed exactly as kube-proxy hashes them (see
//! [`service_chain_name`], [`endpoint_chain_name`], [`nft_service_chain_name`],
//! [`nft_endpoint_chain_name`]), the text follows kube-proxy's argument order
//! and formatting (probabilities as `%0.10f`, the masquerade mark as `%#08x`,
//! comments dropped from per-endpoint rules above 1,000 endpoints), and
//! services come out in the order given, except that
//! [`IptablesOptions::last_service`] can move the measured service to the end
//! of `KUBE-SERVICES`, where every new connection walks the whole chain first.
//!
//! Only IPv4 ClusterIP services are modelled (no NodePorts, external or
//! load-balancer IPs, session affinity or `Local` traffic policies); a service
//! with no endpoints gets kube-proxy's reject rule.
//!
//! Loading: the iptables text replaces the whole `filter` and `nat` tables
//! (`iptables-restore` without `--noflush`), so it is meant for a dedicated
//! network namespace; [`IPTABLES_FLUSH`] and [`NFT_DELETE`] undo each mode.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lower-case name kube-proxy uses in hashes and rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One port of one ClusterIP service with its ready endpoints: what
/// kube-proxy calls a service port (`ServicePortName` + its endpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port in the Service spec (may be empty).
    pub port_name: String,
    /// Protocol of the port.
    pub protocol: Protocol,
    /// ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// Service port.
    pub port: u16,
    /// Ready endpoints (pod IP and target port), in kube-proxy's order.
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port`, or
    /// `namespace/name` when the port has no name.
    pub fn service_port_name(&self) -> String {
        service_port_name(&self.namespace, &self.name, &self.port_name)
    }

    /// Name of the iptables `KUBE-SVC-` chain of this service port.
    pub fn iptables_chain(&self) -> String {
        service_chain_name(&self.service_port_name(), self.protocol.as_str())
    }

    /// Name of the iptables `KUBE-SEP-` chain of one endpoint.
    pub fn iptables_endpoint_chain(&self, endpoint: SocketAddrV4) -> String {
        endpoint_chain_name(
            &self.service_port_name(),
            self.protocol.as_str(),
            &endpoint.to_string(),
        )
    }

    /// Name of the nftables `service-` chain of this service port.
    pub fn nft_chain(&self) -> String {
        nft_service_chain_name(&self.namespace, &self.name, self.protocol, &self.port_name)
    }

    /// Name of the nftables `endpoint-` chain of one endpoint.
    pub fn nft_endpoint_chain(&self, endpoint: SocketAddrV4) -> String {
        nft_endpoint_chain_name(
            &self.namespace,
            &self.name,
            self.protocol,
            &self.port_name,
            endpoint,
        )
    }
}

/// kube-proxy's service port name: `namespace/name` followed by `:port_name`
/// when the port is named.
pub fn service_port_name(namespace: &str, name: &str, port_name: &str) -> String {
    if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    }
}

/// First `chars` characters (a multiple of 8) of the standard base32 encoding
/// of the SHA-256 of `input`.
fn hash_prefix(input: &str, chars: usize) -> String {
    debug_assert!(chars.is_multiple_of(8) && chars <= 48);
    let digest = Sha256::digest(input.as_bytes());
    // Every 5 input bytes encode to 8 characters without padding.
    BASE32.encode(&digest[..chars / 8 * 5])
}

/// kube-proxy's `portProtoHash`: the first 16 characters of
/// base32(sha256(service port name + protocol)).
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    let mut input = String::with_capacity(service_port_name.len() + protocol.len());
    input.push_str(service_port_name);
    input.push_str(protocol);
    hash_prefix(&input, 16)
}

/// `KUBE-SVC-` + [`port_proto_hash`]: the iptables chain that picks one
/// endpoint of a service port (`servicePortPolicyClusterChain`).
pub fn service_chain_name(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-SEP-` + the first 16 characters of
/// base32(sha256(service port name, protocol and endpoint concatenated)),
/// with the endpoint written `ip:port` (`servicePortEndpointChainName`).
pub fn endpoint_chain_name(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let mut input = String::with_capacity(service_port_name.len() + protocol.len() + 24);
    input.push_str(service_port_name);
    input.push_str(protocol);
    input.push_str(endpoint);
    format!("KUBE-SEP-{}", hash_prefix(&input, 16))
}

/// Longest nftables chain name kube-proxy generates a base for: knftables'
/// 256-byte name limit less 16 bytes reserved for the prefix.
const NFT_CHAIN_BASE_MAX: usize = 256 - 16;

/// kube-proxy's nftables `hashAndTruncate`: 8 characters of
/// base32(sha256(name)), `-`, then `name`, cut to 240 bytes with `...`.
fn nft_hash_and_truncate(name: &str) -> String {
    let mut out = hash_prefix(name, 8);
    out.push('-');
    out.push_str(name);
    if out.len() > NFT_CHAIN_BASE_MAX {
        out.truncate(NFT_CHAIN_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

/// `service-` + hash + `-namespace/name/protocol/port_name`: kube-proxy's
/// nftables chain for a service port, e.g.
/// `service-ULMVA6XW-ns1/svc1/tcp/p80`.
pub fn nft_service_chain_name(
    namespace: &str,
    name: &str,
    protocol: Protocol,
    port_name: &str,
) -> String {
    let base = format!("{namespace}/{name}/{}/{port_name}", protocol.as_str());
    format!("service-{}", nft_hash_and_truncate(&base))
}

/// `endpoint-` + hash + `-namespace/name/protocol/port_name__ip/port`:
/// kube-proxy's nftables chain for one endpoint, e.g.
/// `endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80`.
pub fn nft_endpoint_chain_name(
    namespace: &str,
    name: &str,
    protocol: Protocol,
    port_name: &str,
    endpoint: SocketAddrV4,
) -> String {
    let base = format!(
        "{namespace}/{name}/{}/{port_name}__{}/{}",
        protocol.as_str(),
        endpoint.ip(),
        endpoint.port()
    );
    format!("endpoint-{}", nft_hash_and_truncate(&base))
}

/// The probability kube-proxy gives the rule that picks one of `n`
/// remaining endpoints: `1/n` formatted like Go's `%0.10f`
/// (e.g. `0.3333333333`).
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// kube-proxy's masquerade mark for `--iptables-masquerade-bit`
/// (default 14), formatted like Go's `%#08x`: `0x00004000`.
pub fn masquerade_mark(bit: u32) -> String {
    format!("0x{:08x}", 1u64 << bit)
}

/// Above this many endpoints in total kube-proxy's iptables mode drops the
/// comments from per-endpoint rules (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// `iptables-restore` input that empties the `filter` and `nat` tables
/// (removing every kube-proxy chain) when loaded without `--noflush`.
pub const IPTABLES_FLUSH: &str = "*filter\nCOMMIT\n*nat\nCOMMIT\n";

/// `nft -f` input that removes kube-proxy's nftables table.
pub const NFT_DELETE: &str = "delete table ip kube-proxy\n";

/// Settings of the iptables generator; the defaults are kube-proxy's
/// defaults with a cluster CIDR set (as kubeadm clusters have).
#[derive(Clone, Debug)]
pub struct IptablesOptions {
    /// Mark for SNAT, as kube-proxy formats it (see [`masquerade_mark`]).
    pub masquerade_mark: String,
    /// Pod CIDR for the "masquerade traffic from outside the cluster" rule
    /// (`--cluster-cidr`, detect-local-mode `ClusterCIDR`); `None` omits it,
    /// as kube-proxy does when local traffic detection is off.
    pub cluster_cidr: Option<String>,
    /// `--masquerade-all`: mark every ClusterIP connection for SNAT.
    pub masquerade_all: bool,
    /// Add `--random-fully` to MASQUERADE (iptables >= 1.6.2 has it).
    pub random_fully: bool,
    /// `--iptables-localhost-nodeports` (default on): adds kubelet's
    /// `KUBE-FIREWALL` localnet rule instead of excluding 127.0.0.0/8 from
    /// the NodePort jump.
    pub localhost_nodeports: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: omit the INVALID drop rule.
    pub conntrack_tcp_liberal: bool,
    /// Include the jumps from the built-in chains (`PREROUTING`, `OUTPUT`,
    /// `INPUT`, ...) that kube-proxy installs with `iptables -I`, in the
    /// order they end up in.
    pub jump_rules: bool,
    /// Index (into the services slice) of a service to write last in
    /// `KUBE-SERVICES`, right before the NodePort catch-all.
    pub last_service: Option<usize>,
}

impl Default for IptablesOptions {
    fn default() -> Self {
        IptablesOptions {
            masquerade_mark: masquerade_mark(14),
            cluster_cidr: Some("10.244.0.0/16".into()),
            masquerade_all: false,
            random_fully: true,
            localhost_nodeports: true,
            conntrack_tcp_liberal: false,
            jump_rules: true,
            last_service: None,
        }
    }
}

/// Settings of the nftables generator; the defaults are kube-proxy's
/// defaults with a cluster CIDR and service CIDR set.
#[derive(Clone, Debug)]
pub struct NftablesOptions {
    /// Mark for SNAT, as kube-proxy formats it (see [`masquerade_mark`]).
    pub masquerade_mark: String,
    /// Pod CIDR for the "masquerade traffic from outside the cluster" rule;
    /// `None` omits it.
    pub cluster_cidr: Option<String>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Service CIDRs (comma-separated) for the rule dropping traffic to
    /// unallocated ClusterIPs; `None` omits the rule.
    pub service_cidrs: Option<String>,
    /// Emit the add-then-delete of every base chain that kube-proxy's first
    /// sync does to reset them.
    pub first_sync: bool,
}

impl Default for NftablesOptions {
    fn default() -> Self {
        NftablesOptions {
            masquerade_mark: masquerade_mark(14),
            cluster_cidr: Some("10.244.0.0/16".into()),
            masquerade_all: false,
            service_cidrs: Some("10.96.0.0/12".into()),
            first_sync: true,
        }
    }
}

/// Service indices in output order: as given, with `last` moved to the end.
fn ordered(len: usize, last: Option<usize>) -> impl Iterator<Item = usize> {
    let last = last.filter(|&l| l < len);
    (0..len).filter(move |&i| Some(i) != last).chain(last)
}

/// Cache of [`probability`] strings (kube-proxy precomputes them too).
struct Probabilities(Vec<String>);

impl Probabilities {
    fn get(&mut self, n: usize) -> &str {
        while self.0.len() <= n {
            let k = self.0.len();
            self.0.push(if k == 0 {
                String::new()
            } else {
                probability(k)
            });
        }
        &self.0[n]
    }
}

/// Renders the `iptables-restore` input kube-proxy's iptables mode writes on
/// a full sync for `services` (`*filter` then `*nat`, each ending in
/// `COMMIT`). See the module documentation for what is modelled.
pub fn iptables_restore(services: &[ServicePort], opts: &IptablesOptions) -> String {
    let total_endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mark = &opts.masquerade_mark;

    // Rough size: ~600 bytes per service plus ~250 per endpoint.
    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::with_capacity(services.len() * 40 + total_endpoints * 30);
    let mut nat_rules = String::with_capacity(services.len() * 500 + total_endpoints * 250);

    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(filter_chains, ":{chain} - [0:0]");
    }
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
    }

    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}");
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE{}",
        if opts.random_fully {
            " --random-fully"
        } else {
            ""
        }
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");

    if opts.localhost_nodeports || opts.jump_rules {
        let _ = writeln!(filter_chains, ":KUBE-FIREWALL - [0:0]");
    }
    if opts.localhost_nodeports {
        filter_rules.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
             -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT \
             -j DROP\n",
        );
    }

    let mut probs = Probabilities(Vec::new());
    for idx in ordered(services.len(), opts.last_service) {
        let svc = &services[idx];
        let spn = svc.service_port_name();
        let proto = svc.protocol.as_str();
        let ip = svc.cluster_ip;
        let port = svc.port;

        if svc.endpoints.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" \
                 -m {proto} -p {proto} -d {ip} --dport {port} -j REJECT"
            );
            continue;
        }

        let svc_chain = service_chain_name(&spn, proto);
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" \
             -m {proto} -p {proto} -d {ip} --dport {port} -j {svc_chain}"
        );
        if opts.masquerade_all || opts.cluster_cidr.is_some() {
            let _ = write!(
                nat_rules,
                "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" \
                 -m {proto} -p {proto} -d {ip} --dport {port}"
            );
            if !opts.masquerade_all {
                if let Some(cidr) = &opts.cluster_cidr {
                    let _ = write!(nat_rules, " ! -s {cidr}");
                }
            }
            nat_rules.push_str(" -j KUBE-MARK-MASQ\n");
        }
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");

        let n = svc.endpoints.len();
        let sep_chains: Vec<String> = svc
            .endpoints
            .iter()
            .map(|ep| endpoint_chain_name(&spn, proto, &ep.to_string()))
            .collect();
        for (i, (ep, sep)) in svc.endpoints.iter().zip(&sep_chains).enumerate() {
            let _ = write!(nat_rules, "-A {svc_chain}");
            if !large {
                let _ = write!(nat_rules, " -m comment --comment \"{spn} -> {ep}\"");
            }
            if i < n - 1 {
                let _ = write!(
                    nat_rules,
                    " -m statistic --mode random --probability {}",
                    probs.get(n - i)
                );
            }
            let _ = writeln!(nat_rules, " -j {sep}");
        }
        for (ep, sep) in svc.endpoints.iter().zip(&sep_chains) {
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            let comment = if large {
                String::new()
            } else {
                format!(" -m comment --comment {spn}")
            };
            let _ = writeln!(
                nat_rules,
                "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                nat_rules,
                "-A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {ep}"
            );
        }
    }

    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must \
         be the last rule in this chain\" -m addrtype --dst-type LOCAL{} -j KUBE-NODEPORTS",
        if opts.localhost_nodeports {
            ""
        } else {
            " ! -d 127.0.0.0/8"
        }
    );

    if !opts.conntrack_tcp_liberal {
        filter_rules.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    }
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    filter_rules.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );

    let mut out = String::with_capacity(
        filter_chains.len() + filter_rules.len() + nat_chains.len() + nat_rules.len() + 2048,
    );
    out.push_str("*filter\n");
    out.push_str(&filter_chains);
    if opts.jump_rules {
        out.push_str(FILTER_JUMPS);
    }
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    if opts.jump_rules {
        out.push_str(NAT_JUMPS);
    }
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

/// Jumps kube-proxy (and kubelet, for `KUBE-FIREWALL`) put at the top of the
/// built-in filter chains. They are each inserted at position 1, so every
/// chain ends up with them in the reverse of kube-proxy's insertion order.
const FILTER_JUMPS: &str = "\
-A INPUT -j KUBE-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
";

/// Jumps kube-proxy puts at the top of the built-in nat chains.
const NAT_JUMPS: &str = "\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
";

/// nftables base chains of kube-proxy: name, type, hook, numeric priority
/// (knftables writes `dstnat` as -100, `srcnat` as 100, `dstnat-10` as -110).
const NFT_BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// Regular chains jumped to from base chains: destination, source, match.
const NFT_JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new",
    ),
];

/// Prefix of every nftables command: kube-proxy's IPv4 table.
const NFT_TABLE: &str = "ip kube-proxy";

/// Writes kube-proxy's `ensureChain`: add, then flush, each chain once.
fn nft_ensure_chain(out: &mut String, created: &mut Vec<&'static str>, chain: &'static str) {
    if created.contains(&chain) {
        return;
    }
    created.push(chain);
    let _ = writeln!(out, "add chain {NFT_TABLE} {chain}");
    let _ = writeln!(out, "flush chain {NFT_TABLE} {chain}");
}

/// Renders the `nft -f` input kube-proxy's nftables mode sends on its first
/// full sync for `services`. See the module documentation for what is
/// modelled.
pub fn nft_script(services: &[ServicePort], opts: &NftablesOptions) -> String {
    let total_endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let mut out = String::with_capacity(8192 + services.len() * 700 + total_endpoints * 450);
    let t = NFT_TABLE;
    let mark = &opts.masquerade_mark;

    // setupNFTables
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    if opts.first_sync {
        for (name, ..) in NFT_BASE_CHAINS {
            let _ = writeln!(out, "add chain {t} {name}");
            let _ = writeln!(out, "delete chain {t} {name}");
        }
    }
    for (name, kind, hook, prio) in NFT_BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    let mut created: Vec<&'static str> = Vec::new();
    for (dst, src, extra) in NFT_JUMP_CHAINS {
        nft_ensure_chain(&mut out, &mut created, dst);
        let sep = if extra.is_empty() { "" } else { " " };
        let _ = writeln!(out, "add rule {t} {src} {extra}{sep}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        nft_ensure_chain(&mut out, &mut created, chain);
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {mark}"
    );
    let _ = writeln!(out, "add rule {t} masquerading mark and {mark} == 0 return");
    let _ = writeln!(out, "add rule {t} masquerading mark set mark xor {mark}");
    let _ = writeln!(out, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject \
         comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if let Some(cidrs) = &opts.service_cidrs {
        let _ = writeln!(
            out,
            "add rule {t} cluster-ips-check ip daddr {{ {cidrs} }} drop \
             comment \"Drop traffic to unallocated ClusterIPs\""
        );
    }
    // --nodeport-addresses unset: the nodeport-ips set is created and removed.
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "delete set {t} nodeport-ips");
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {t} reject-chain");
    let _ = writeln!(out, "add rule {t} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport \
         vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 \
         meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(out, "flush set {t} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(out, "flush map {t} {map}");
    }

    // syncProxyRules, per service port
    for svc in services {
        let spn = svc.service_port_name();
        let proto = svc.protocol.as_str();
        let ip = svc.cluster_ip;
        let port = svc.port;

        if svc.endpoints.is_empty() {
            let _ = writeln!(out, "add element {t} cluster-ips {{ {ip} }}");
            let _ = writeln!(
                out,
                "add element {t} no-endpoint-services {{ {ip} . {proto} . {port} \
                 comment \"{spn}\" : goto reject-chain }}"
            );
            continue;
        }

        let svc_chain = svc.nft_chain();
        let ep_chains: Vec<String> = svc
            .endpoints
            .iter()
            .map(|&ep| svc.nft_endpoint_chain(ep))
            .collect();
        for chain in &ep_chains {
            let _ = writeln!(out, "add chain {t} {chain}");
            let _ = writeln!(out, "flush chain {t} {chain}");
        }
        let _ = writeln!(out, "add chain {t} {svc_chain}");
        let _ = writeln!(out, "flush chain {t} {svc_chain}");
        let _ = writeln!(out, "add element {t} cluster-ips {{ {ip} }}");
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {ip} . {proto} . {port} : goto {svc_chain} }}"
        );
        if opts.masquerade_all {
            let _ = writeln!(
                out,
                "add rule {t} {svc_chain} ip daddr {ip} {proto} dport {port} jump mark-for-masquerade"
            );
        } else if let Some(cidr) = &opts.cluster_cidr {
            let _ = writeln!(
                out,
                "add rule {t} {svc_chain} ip daddr {ip} {proto} dport {port} ip saddr != {cidr} \
                 jump mark-for-masquerade"
            );
        }
        let _ = write!(
            out,
            "add rule {t} {svc_chain} numgen random mod {} vmap {{",
            ep_chains.len()
        );
        for (i, chain) in ep_chains.iter().enumerate() {
            let sep = if i + 1 < ep_chains.len() { " ," } else { "" };
            let _ = write!(out, " {i} : goto {chain}{sep}");
        }
        out.push_str(" }\n");
        for (ep, chain) in svc.endpoints.iter().zip(&ep_chains) {
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {} jump mark-for-masquerade",
                ep.ip()
            );
            let _ = writeln!(
                out,
                "add rule {t} {chain} meta l4proto {proto} dnat to {ep}"
            );
        }
    }
    out
}

/// Shape of a synthetic service set for the service-count sweeps.
#[derive(Clone, Debug)]
pub struct SyntheticServices {
    /// Number of services (one TCP port each).
    pub count: usize,
    /// Endpoints per service.
    pub endpoints_per_service: usize,
    /// Namespace of every service; services are named `svc-<i>`.
    pub namespace: String,
    /// Name of the service port.
    pub port_name: String,
    /// ClusterIP of service 0; service `i` gets this address + `i`.
    pub first_cluster_ip: Ipv4Addr,
    /// Service port.
    pub port: u16,
    /// Address of the first endpoint; endpoints are numbered consecutively
    /// across services.
    pub first_endpoint_ip: Ipv4Addr,
    /// Endpoint (target) port.
    pub target_port: u16,
}

impl Default for SyntheticServices {
    fn default() -> Self {
        SyntheticServices {
            count: 1,
            endpoints_per_service: 3,
            namespace: "bench".into(),
            port_name: "http".into(),
            first_cluster_ip: Ipv4Addr::new(10, 96, 1, 1),
            port: 80,
            first_endpoint_ip: Ipv4Addr::new(10, 244, 1, 1),
            target_port: 8080,
        }
    }
}

impl SyntheticServices {
    /// The services described, in order.
    pub fn build(&self) -> Vec<ServicePort> {
        let vip0 = u32::from(self.first_cluster_ip);
        let ep0 = u32::from(self.first_endpoint_ip);
        (0..self.count)
            .map(|i| {
                let endpoints = (0..self.endpoints_per_service)
                    .map(|k| {
                        let n = (i * self.endpoints_per_service + k) as u32;
                        SocketAddrV4::new(Ipv4Addr::from(ep0.wrapping_add(n)), self.target_port)
                    })
                    .collect();
                ServicePort {
                    namespace: self.namespace.clone(),
                    name: format!("svc-{i}"),
                    port_name: self.port_name.clone(),
                    protocol: Protocol::Tcp,
                    cluster_ip: Ipv4Addr::from(vip0.wrapping_add(i as u32)),
                    port: self.port,
                    endpoints,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn svc(
        ns: &str,
        name: &str,
        port_name: &str,
        ip: &str,
        port: u16,
        eps: &[&str],
    ) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol: Protocol::Tcp,
            cluster_ip: ip.parse().unwrap(),
            port,
            endpoints: eps.iter().map(|e| ep(e)).collect(),
        }
    }

    /// Names published in kube-proxy's own unit tests.
    #[test]
    fn iptables_chain_names_match_kube_proxy() {
        assert_eq!(service_port_name("ns1", "svc1", "p80"), "ns1/svc1:p80");
        assert_eq!(service_port_name("ns1", "svc1", ""), "ns1/svc1");
        assert_eq!(port_proto_hash("ns1/svc1:p80", "tcp"), "XPGD46QRK7WJZT7O");
        assert_eq!(
            service_chain_name("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.2.1:80"),
            "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
        );
        assert_eq!(
            service_chain_name("ns2/svc2:p8080", "tcp"),
            "KUBE-SVC-2VJB64SDSIJUP5T6"
        );
        assert_eq!(
            endpoint_chain_name("ns2/svc2:p8080", "tcp", "10.0.2.1:8080"),
            "KUBE-SEP-UHEGFW77JX3KXTOV"
        );
        assert_eq!(
            service_chain_name("ns3/svc3:p80", "tcp"),
            "KUBE-SVC-X27LE4BHSL4DOUIK"
        );
        assert_eq!(
            service_chain_name("ns5/svc5:p80", "tcp"),
            "KUBE-SVC-NUKIZ6OKUXPJNT4C"
        );
        let s = svc("ns1", "svc1", "p80", "172.30.0.41", 80, &["10.180.0.1:80"]);
        assert_eq!(s.iptables_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            s.iptables_endpoint_chain(ep("10.180.0.1:80")),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    /// Names published in kube-proxy's nftables unit tests.
    #[test]
    fn nft_chain_names_match_kube_proxy() {
        let n = |ns: &str, name: &str| nft_service_chain_name(ns, name, Protocol::Tcp, "p80");
        assert_eq!(n("ns1", "svc1"), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(n("ns2", "svc2"), "service-42NFTM6N-ns2/svc2/tcp/p80");
        assert_eq!(n("ns4", "svc4"), "service-LAUZTJTB-ns4/svc4/tcp/p80");
        let e = |ns: &str, name: &str, addr: &str| {
            nft_endpoint_chain_name(ns, name, Protocol::Tcp, "p80", ep(addr))
        };
        assert_eq!(
            e("ns1", "svc1", "10.180.0.1:80"),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            e("ns2", "svc2", "10.180.0.2:80"),
            "endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80"
        );
        assert_eq!(
            e("ns4", "svc4", "10.180.0.4:80"),
            "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"
        );
        assert_eq!(
            e("ns4", "svc4", "10.180.0.5:80"),
            "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
        );
        // Over-long names are cut to 240 bytes after the prefix, ending "...".
        let long = "x".repeat(300);
        let name = nft_service_chain_name(&long, "svc", Protocol::Udp, "");
        assert_eq!(name.len(), "service-".len() + NFT_CHAIN_BASE_MAX);
        assert!(name.ends_with("..."));
    }

    #[test]
    fn probabilities_are_formatted_like_go() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(6), "0.1666666667");
        assert_eq!(probability(7), "0.1428571429");
        // An exact decimal tie rounds to even, as Go's strconv does.
        assert_eq!(probability(2048), "0.0004882812");
        assert_eq!(masquerade_mark(14), "0x00004000");
        assert_eq!(masquerade_mark(0), "0x00000001");
    }

    /// The nat table for one service with one endpoint, compared line by
    /// line with the expectation in kube-proxy's own test (mark and CIDR as
    /// that test sets them).
    #[test]
    fn iptables_one_service_matches_kube_proxy_fixture() {
        let services = [svc(
            "ns1",
            "svc1",
            "p80",
            "10.20.30.41",
            80,
            &["10.180.0.1:80"],
        )];
        let opts = IptablesOptions {
            masquerade_mark: "0x4000".into(),
            cluster_cidr: Some("10.0.0.0/24".into()),
            random_fully: false,
            jump_rules: false,
            ..IptablesOptions::default()
        };
        let text = iptables_restore(&services, &opts);
        let nat = text.split("*nat\n").nth(1).unwrap();
        let expected = "\
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 10.20.30.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 10.20.30.41 --dport 80 ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_eq!(nat, expected);
        assert!(text.starts_with("*filter\n:KUBE-SERVICES - [0:0]\n"));
    }

    #[test]
    fn iptables_endpoint_selection_uses_decreasing_probabilities() {
        let services = [svc(
            "ns1",
            "svc1",
            "p80",
            "172.30.0.41",
            80,
            &["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"],
        )];
        let text = iptables_restore(&services, &IptablesOptions::default());
        let svc_chain = "KUBE-SVC-XPGD46QRK7WJZT7O";
        let lb: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc_chain}")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(lb.len(), 3);
        assert!(lb[0].contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(lb[1].contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(!lb[2].contains("statistic"));
        assert!(lb[0].contains("--comment \"ns1/svc1:p80 -> 10.180.0.1:80\""));
        for (line, e) in lb.iter().zip(&services[0].endpoints) {
            assert!(line.ends_with(&services[0].iptables_endpoint_chain(*e)));
        }
        // Default mark, random-fully, masquerade rule from outside the pod CIDR.
        assert!(text.contains("-j MARK --or-mark 0x00004000\n"));
        assert!(text.contains("-j MASQUERADE --random-fully\n"));
        assert!(text.contains("--dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ\n"));
        assert!(text.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert!(text.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert!(text.contains("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n"));
    }

    fn count(text: &str, prefix: &str) -> usize {
        text.lines().filter(|l| l.starts_with(prefix)).count()
    }

    #[test]
    fn iptables_rule_counts_scale_with_services() {
        for (n, e) in [(1usize, 1usize), (10, 3), (400, 3)] {
            let services = SyntheticServices {
                count: n,
                endpoints_per_service: e,
                ..SyntheticServices::default()
            }
            .build();
            let text = iptables_restore(&services, &IptablesOptions::default());
            let nat = text.split("*nat\n").nth(1).unwrap();
            // 3 KUBE-POSTROUTING + 1 KUBE-MARK-MASQ + 1 nodeport catch-all
            // + 3 jumps; per service 1 KUBE-SERVICES + 1 masquerade + e
            // selection + 2e endpoint rules.
            assert_eq!(count(nat, "-A "), 8 + n * (2 + 3 * e), "n={n} e={e}");
            assert_eq!(count(nat, ":"), 4 + n * (1 + e));
            assert_eq!(count(nat, "-A KUBE-SERVICES "), n + 1);
            assert_eq!(count(&text, "-A KUBE-SVC-"), n * (1 + e));
            assert_eq!(count(&text, "-A KUBE-SEP-"), n * 2 * e);
            assert_eq!(nat.matches("--probability").count(), n * (e - 1));
            assert_eq!(text.matches("COMMIT\n").count(), 2);
            // Comments on endpoint rules go away above 1,000 endpoints.
            let large = n * e > LARGE_CLUSTER_ENDPOINTS;
            let sep_comment = nat
                .lines()
                .any(|l| l.starts_with("-A KUBE-SEP-") && l.contains("--comment"));
            assert_eq!(sep_comment, !large, "n={n} e={e}");
        }
    }

    #[test]
    fn iptables_last_service_is_last_in_kube_services() {
        let services = SyntheticServices {
            count: 5,
            ..SyntheticServices::default()
        }
        .build();
        let opts = IptablesOptions {
            last_service: Some(1),
            ..IptablesOptions::default()
        };
        let text = iptables_restore(&services, &opts);
        let dispatch: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(dispatch.len(), 6);
        assert!(dispatch[4].ends_with(&format!("-j {}", services[1].iptables_chain())));
        assert!(dispatch[5].ends_with("-j KUBE-NODEPORTS"));
        assert!(dispatch[0].contains("bench/svc-0:http"));
        assert!(dispatch[1].contains("bench/svc-2:http"));
        // An out-of-range index changes nothing.
        let plain = iptables_restore(&services, &IptablesOptions::default());
        let opts = IptablesOptions {
            last_service: Some(99),
            ..IptablesOptions::default()
        };
        assert_eq!(iptables_restore(&services, &opts), plain);
    }

    #[test]
    fn iptables_service_without_endpoints_is_rejected_in_filter() {
        let services = [svc("ns6", "svc6", "p80", "172.30.0.46", 80, &[])];
        let text = iptables_restore(&services, &IptablesOptions::default());
        assert!(text.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns6/svc6:p80 has no endpoints\" \
             -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT\n"
        ));
        assert_eq!(count(&text, "-A KUBE-SVC-"), 0);
    }

    #[test]
    fn nft_script_has_kube_proxy_structure() {
        let services = [
            svc(
                "ns4",
                "svc4",
                "p80",
                "172.30.0.44",
                80,
                &["10.180.0.4:80", "10.180.0.5:80"],
            ),
            svc("ns6", "svc6", "p80", "172.30.0.46", 80, &[]),
        ];
        let opts = NftablesOptions {
            cluster_cidr: Some("10.0.0.0/8".into()),
            ..NftablesOptions::default()
        };
        let text = nft_script(&services, &opts);
        let sc = "service-LAUZTJTB-ns4/svc4/tcp/p80";
        let e4 = "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80";
        let e5 = "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80";
        for line in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }".to_string(),
            "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }".into(),
            "add rule ip kube-proxy nat-output jump services".into(),
            "add rule ip kube-proxy nat-prerouting jump services".into(),
            "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check".into(),
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
                .into(),
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000".into(),
            format!(
                "add element ip kube-proxy service-ips {{ 172.30.0.44 . tcp . 80 : goto {sc} }}"
            ),
            format!(
                "add rule ip kube-proxy {sc} ip daddr 172.30.0.44 tcp dport 80 \
                 ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
            ),
            format!(
                "add rule ip kube-proxy {sc} numgen random mod 2 vmap \
                 {{ 0 : goto {e4} , 1 : goto {e5} }}"
            ),
            format!("add rule ip kube-proxy {e4} ip saddr 10.180.0.4 jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {e5} meta l4proto tcp dnat to 10.180.0.5:80"),
            "add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 \
             comment \"ns6/svc6:p80\" : goto reject-chain }"
                .into(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        // Chains exist before the map element and rules that use them.
        let pos = |needle: &str| text.find(needle).unwrap();
        assert!(pos(&format!("add chain ip kube-proxy {e4}\n")) < pos("numgen"));
        assert!(
            pos(&format!("add chain ip kube-proxy {sc}\n"))
                < pos("add element ip kube-proxy service-ips")
        );
    }

    #[test]
    fn nft_rule_counts_scale_with_services() {
        let base = nft_script(&[], &NftablesOptions::default());
        let base_rules = count(&base, "add rule ");
        for (n, e) in [(1usize, 1usize), (10, 3), (400, 3)] {
            let services = SyntheticServices {
                count: n,
                endpoints_per_service: e,
                ..SyntheticServices::default()
            }
            .build();
            let text = nft_script(&services, &NftablesOptions::default());
            // Per service: masquerade + numgen rules, 2 per endpoint.
            assert_eq!(count(&text, "add rule ") - base_rules, n * (2 + 2 * e));
            assert_eq!(count(&text, "add element ip kube-proxy service-ips "), n);
            assert_eq!(count(&text, "add element ip kube-proxy cluster-ips "), n);
            assert_eq!(
                count(&text, "add chain ip kube-proxy service-")
                    - count(&base, "add chain ip kube-proxy service-"),
                n
            );
            assert_eq!(count(&text, "add chain ip kube-proxy endpoint-"), n * e);
            assert_eq!(text.matches("numgen random mod ").count(), n);
        }
    }

    #[test]
    fn synthetic_services_are_distinct() {
        let services = SyntheticServices {
            count: 300,
            endpoints_per_service: 3,
            ..SyntheticServices::default()
        }
        .build();
        assert_eq!(services.len(), 300);
        assert_eq!(services[0].cluster_ip, Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(services[299].cluster_ip, Ipv4Addr::new(10, 96, 2, 44));
        assert_eq!(services[1].endpoints[0], ep("10.244.1.4:8080"));
        let mut chains: Vec<String> = services.iter().map(|s| s.iptables_chain()).collect();
        chains.sort();
        chains.dedup();
        assert_eq!(chains.len(), 300);
    }

    #[test]
    fn ten_thousand_services_generate_quickly() {
        let services = SyntheticServices {
            count: 10_000,
            endpoints_per_service: 3,
            ..SyntheticServices::default()
        }
        .build();
        let t = Instant::now();
        let ipt = iptables_restore(&services, &IptablesOptions::default());
        let ipt_time = t.elapsed();
        let t = Instant::now();
        let nft = nft_script(&services, &NftablesOptions::default());
        let nft_time = t.elapsed();
        eprintln!(
            "10,000 services x 3 endpoints: iptables {} lines {} bytes in {:?}; \
             nft {} lines {} bytes in {:?}",
            ipt.lines().count(),
            ipt.len(),
            ipt_time,
            nft.lines().count(),
            nft.len(),
            nft_time
        );
        let t = Instant::now();
        for s in &services {
            for e in &s.endpoints {
                std::hint::black_box(s.iptables_endpoint_chain(*e));
            }
        }
        eprintln!("of which hashing 30,000 endpoint names: {:?}", t.elapsed());
        assert_eq!(count(&ipt, "-A KUBE-SEP-"), 60_000);
        assert_eq!(nft.matches("numgen random mod 3 vmap").count(), 10_000);
    }

    /// Runs `cmd args` with `input` on stdin: whether it succeeded, and
    /// what it printed. Needs root and the tool (`make bootstrap` installs it).
    fn run_check(cmd: &str, args: &[&str], input: &str) -> (bool, String) {
        lb_e2e::scenario::require_root();
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd} (installed by make bootstrap): {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), msg)
    }

    fn sample_services() -> Vec<ServicePort> {
        let mut services = SyntheticServices {
            count: 50,
            endpoints_per_service: 3,
            ..SyntheticServices::default()
        }
        .build();
        services.push(svc("ns6", "svc6", "", "10.96.9.9", 53, &[]));
        services[3].protocol = Protocol::Udp;
        services
    }

    #[test]
    fn iptables_restore_accepts_generated_rules() {
        let text = iptables_restore(
            &sample_services(),
            &IptablesOptions {
                last_service: Some(0),
                ..IptablesOptions::default()
            },
        );
        let (ok, msg) = run_check("iptables-restore", &["--test"], &text);
        assert!(ok, "iptables-restore --test rejected the rules: {msg}");
        let (ok, msg) = run_check("iptables-restore", &["--test"], IPTABLES_FLUSH);
        assert!(ok, "iptables-restore --test rejected the flush: {msg}");
    }

    #[test]
    fn nft_accepts_generated_rules() {
        let text = nft_script(&sample_services(), &NftablesOptions::default());
        let (ok, msg) = run_check("nft", &["-c", "-f", "-"], &text);
        assert!(ok, "nft -c rejected the rules: {msg}");
    }
}
