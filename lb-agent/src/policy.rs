//! Network policy in the agent: every snapshot's Pods, Namespaces, Nodes
//! and NetworkPolicies are compiled by `lb-policy`, each local pod's
//! host-side interface is found from its address, and the policy maps are
//! reconciled (see [`crate::policy_reconcile`]).
//!
//! A pod's interface is the device of the host route to its address: a /32
//! (or /128) route through a veth or netkit device, as Calico, Cilium's
//! native routing and this project's lab set pods up. A pod behind a bridge
//! (one subnet route for every pod) has no interface of its own: it is
//! still an endpoint (its ingress is checked where other pods' packets
//! leave them), but its own packets are not checked where they leave it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::Path,
    time::Instant,
};

use lb_common::{net::Addr, policy::POLICY_STATE_AT_CONNECT};

use lb_core::intent::{ObjectError, Objects};
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig},
    desired::reserved_identity_name,
    plan::PolicyCapacity,
    tables::{addr_of, PolicyTables, PolicyTarget},
};
use tracing::{error, info, warn};

use crate::{
    kernel::{socket_programs::SocketPrograms, AyaPolicyMaps, KernelError},
    node::{cgroups, netlink},
    policy_reconcile::PolicyReconciler,
    serve::metrics::Metrics,
};

/// The host end of a pod's interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    /// Its index.
    pub ifindex: u32,
    /// Its name.
    pub name: String,
}

/// Why a pod has no interface of its own.
#[derive(Debug, thiserror::Error)]
pub enum NoInterface {
    /// The route to the pod is not a host route.
    #[error("the route to the pod is a /{0}, not a host route")]
    NotHostRoute(u8),
    /// The route names no device.
    #[error("the route to the pod names no device")]
    NoDevice,
    /// The device is not a veth or netkit host end (or is an uplink).
    #[error("the route to the pod leaves by {name} ({kind}), not a veth or netkit device")]
    NotPodDevice {
        /// The device.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// rtnetlink failed.
    #[error("asking the kernel: {0}")]
    Netlink(#[from] io::Error),
}

/// The host end of the interface of the pod at `ip`: the device of a host
/// route to it, if that is a veth or netkit device and not an uplink.
pub fn host_interface(ip: IpAddr, uplinks: &[String]) -> Result<HostInterface, NoInterface> {
    let route = netlink::route_to(ip)?;
    let host_route = if ip.is_ipv4() { 32 } else { 128 };
    if route.prefix_len != host_route {
        return Err(NoInterface::NotHostRoute(route.prefix_len));
    }
    let ifindex = route.ifindex.ok_or(NoInterface::NoDevice)?;
    let link = netlink::link(ifindex)?;
    let kind = link.kind.unwrap_or_default();
    if !matches!(kind.as_str(), "veth" | "netkit") || uplinks.contains(&link.name) {
        return Err(NoInterface::NotPodDevice {
            name: link.name,
            kind,
        });
    }
    Ok(HostInterface {
        ifindex,
        name: link.name,
    })
}

/// Compiles policy and keeps the policy maps at the compiler's state.
pub struct PolicyAgent {
    compiler: PolicyCompiler,
    reconciler: PolicyReconciler<AyaPolicyMaps>,
    capacity: PolicyCapacity,
    /// Interfaces found, by endpoint address and pod UID (a new pod at the
    /// same address is looked up again).
    interfaces: BTreeMap<(IpAddr, String), HostInterface>,
    /// Endpoints without one, already warned about.
    warned: BTreeSet<(IpAddr, String)>,
    uplinks: Vec<String>,
    enforcing: bool,
    at_connect: bool,
    /// The objects last compiled, for the follow-up update that releases
    /// what an update retired.
    last: Objects,
    /// The compiler retired identities or CIDRs: a follow-up update
    /// releases them once the kernel no longer uses them.
    follow_up: bool,
    /// The last pass could not program everything.
    incomplete: bool,
    /// The cgroup map is known to be empty.
    cgroups_empty: bool,
}

impl PolicyAgent {
    /// Adopts what the policy maps hold: identities, sets and rules keep
    /// their numbers, and nothing that did not change is rewritten.
    /// `enforcing` turns enforcement on the pod interfaces on or off.
    pub fn adopt(
        maps: AyaPolicyMaps,
        config: PolicyConfig,
        uplinks: Vec<String>,
        enforcing: bool,
        at_connect: bool,
    ) -> Result<Self, KernelError> {
        let capacity = maps.capacity()?;
        let reconciler = PolicyReconciler::adopt(maps, capacity)?;
        let tables = reconciler.applied();
        let adopted = Adopted {
            identities: tables
                .identities
                .iter()
                .map(|(id, info)| (*id, info.digest))
                .collect(),
            sets: tables.complete_sets().into_iter().collect(),
            rules: tables
                .rules
                .iter()
                .map(|(id, name)| (*id, name.clone()))
                .collect(),
        };
        info!(
            identities = adopted.identities.len(),
            sets = adopted.sets.len(),
            endpoints = tables.endpoints.len(),
            revision = tables.state.revision,
            "adopted the policy maps a previous agent left"
        );
        Ok(Self {
            compiler: PolicyCompiler::new(config, &adopted),
            reconciler,
            capacity,
            interfaces: BTreeMap::new(),
            warned: BTreeSet::new(),
            uplinks,
            enforcing,
            at_connect,
            last: Objects::default(),
            follow_up: false,
            incomplete: false,
            cgroups_empty: false,
        })
    }

    /// Compiles `objects`; returns what was invalid (the rest is compiled).
    pub fn compile(&mut self, objects: &Objects) -> Vec<ObjectError> {
        self.last = objects.clone();
        let update = self.compiler.update(objects);
        self.follow_up = update.follow_up;
        update.errors
    }

    /// Whether a pass is due without a new snapshot: the last one could not
    /// program everything.
    pub fn needs_retry(&self) -> bool {
        self.incomplete
    }

    /// Finds the interfaces of new endpoints; forgets those of endpoints
    /// that left.
    fn find_interfaces(&mut self) {
        let endpoints: BTreeSet<(IpAddr, String)> = self
            .compiler
            .desired()
            .endpoints
            .iter()
            .map(|(ip, ep)| (*ip, ep.uid.clone()))
            .collect();
        self.interfaces.retain(|key, _| endpoints.contains(key));
        self.warned.retain(|key| endpoints.contains(key));
        for key in endpoints {
            if self.interfaces.contains_key(&key) {
                continue;
            }
            match host_interface(key.0, &self.uplinks) {
                Ok(interface) => {
                    self.interfaces.insert(key, interface);
                }
                Err(why) => {
                    if self.warned.insert(key.clone()) {
                        warn!(
                            pod_ip = %key.0,
                            reason = %why,
                            "no interface of its own for a local pod: its packets are not \
                             checked where they leave it"
                        );
                    }
                }
            }
        }
    }

    /// Programs the compiled state, then the follow-up update if the
    /// compiler asked for one. Returns whether everything was programmed.
    pub fn reconcile(&mut self, metrics: &Metrics) -> bool {
        let mut complete = self.program(metrics);
        if complete && std::mem::take(&mut self.follow_up) {
            let last = std::mem::take(&mut self.last);
            self.compile(&last);
            complete = self.program(metrics);
        }
        self.incomplete = !complete;
        complete
    }

    /// One plan and its writes.
    fn program(&mut self, metrics: &Metrics) -> bool {
        let started = Instant::now();
        self.find_interfaces();
        let by_ip: BTreeMap<IpAddr, u32> = self
            .interfaces
            .iter()
            .map(|((ip, _), interface)| (*ip, interface.ifindex))
            .collect();
        // Enforced once a policy exists: until then every flow is allowed,
        // and nothing (not even a borrowed address) gains a pod anything.
        let desired = self.compiler.desired();
        let target = PolicyTarget::new(
            desired,
            |ip| by_ip.get(&ip).copied(),
            self.enforcing && desired.enforcing,
            self.at_connect,
        );
        let done = self.reconciler.reconcile(&target);
        for err in &done.errors {
            metrics.policy_write_errors.inc();
            error!(error = %err, "writing the policy maps");
        }
        if !done.unfit_sets.is_empty() {
            error!(
                sets = done.unfit_sets.len(),
                endpoints = ?done.fail_closed,
                "policy does not fit the policy map: these pods refuse new flows until it \
                 does (lb_policy_endpoints_fail_closed; drop reason policy_fail_closed)"
            );
        }
        if done.left_out > 0 {
            error!(
                left_out = done.left_out,
                "no room in the ipcache or endpoint map: some addresses count as the world"
            );
        }
        let elapsed = started.elapsed();
        metrics
            .policy_reconcile_seconds
            .observe(elapsed.as_secs_f64());
        metrics.observe_policy(self.reconciler.applied(), &self.capacity);
        let tables = self.reconciler.applied();
        info!(
            identities = tables.identities.len(),
            endpoints = tables.endpoints.len(),
            entries = tables.entry_count(),
            writes = done.writes,
            revision = tables.state.revision,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "policy reconciled"
        );
        let found_all = by_ip.len() == self.compiler.desired().endpoints.len();
        done.complete() && found_all
    }

    /// Writes which pod each cgroup of this node's pods (below `root`)
    /// belongs to, for the refusal at `connect()`; only while some pod is
    /// isolated for egress and that refusal is on. Containers start after
    /// their pod's snapshot, so this runs on every pass of the main loop.
    pub fn refresh_cgroups(&mut self, root: &Path, socket: &mut SocketPrograms) {
        let tables = self.reconciler.applied();
        let wanted = tables.state.flags & POLICY_STATE_AT_CONNECT != 0;
        if !wanted && self.cgroups_empty {
            return;
        }
        let mut addresses: BTreeMap<String, Addr> = BTreeMap::new();
        if wanted {
            for (ip, endpoint) in &self.compiler.desired().endpoints {
                // One address per pod is enough: both carry its policy.
                let keep = addresses.get(&endpoint.uid).is_some_and(|_| ip.is_ipv6());
                if !keep {
                    addresses.insert(endpoint.uid.clone(), addr_of(*ip));
                }
            }
        }
        let uids: BTreeSet<String> = addresses.keys().cloned().collect();
        let cgroups = match cgroups::pod_cgroups(root, &uids) {
            Ok(cgroups) => cgroups,
            Err(err) => {
                error!(error = %err, "finding the cgroups of this node's pods");
                return;
            }
        };
        let by_cgroup: BTreeMap<u64, Addr> = cgroups
            .into_iter()
            .filter_map(|(id, uid)| Some((id, *addresses.get(&uid)?)))
            .collect();
        match socket.set_cgroup_endpoints(&by_cgroup) {
            Ok(changed) => {
                if changed {
                    info!(
                        cgroups = by_cgroup.len(),
                        "cgroups of this node's pods written for the refusal at connect()"
                    );
                }
                self.cgroups_empty = by_cgroup.is_empty();
            }
            Err(err) => error!(error = %err, "writing the cgroups of this node's pods"),
        }
    }

    /// The interfaces of this node's pods, to attach the pod programs to.
    pub fn interface_names(&self) -> BTreeSet<String> {
        self.interfaces.values().map(|i| i.name.clone()).collect()
    }

    /// What the policy maps hold.
    pub fn applied(&self) -> &PolicyTables {
        self.reconciler.applied()
    }

    /// An identity in words, for drop reports: its number and labels.
    pub fn identity_text(&self, identity: u32) -> String {
        match self.reconciler.applied().identities.get(&identity) {
            Some(info) => format!("{identity} ({})", info.text),
            None => reserved_identity_name(identity).map_or_else(
                || identity.to_string(),
                |name| format!("{identity} ({name})"),
            ),
        }
    }
}
