//! Pod interfaces as they come and go: those whose name starts with one of
//! the `podInterfaces` prefixes, and the host ends of this node's pods that
//! policy found from their addresses. The pod programs are attached to each
//! new one (both hooks: the pod's packets and the packets to it), each is
//! registered with what the programs need to know of it (a veth or netkit
//! host end, a known pod's), and the pins of those that went away are
//! removed. When pods' connected UDP sockets are translated per datagram,
//! the network namespace of each attached pair interface's peer is found
//! too: the socket programs leave such sockets untranslated only in those
//! namespaces, whose datagrams the pod programs are known to see.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_common::config::{POD_INTERFACE_ENDPOINT, POD_INTERFACE_PEER};
use tracing::{error, info, warn};

use crate::{
    kernel::tc_programs::{TcHook, TcPrograms},
    node::{interfaces, netlink, netns},
};

/// How long pod interfaces whose peer's namespace was not found wait before
/// the node's namespaces are looked through again.
const NETNS_RETRY: Duration = Duration::from_secs(10);

/// A pod interface the pod programs are attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attached {
    /// Its index, once registered.
    ifindex: Option<u32>,
    /// The `POD_INTERFACE_*` bits registered.
    flags: u32,
    /// The id of its peer's network namespace, for a veth or netkit host
    /// end whose peer is in another namespace (asked once, at attach).
    peer_nsid: Option<i32>,
    /// The cookie of its peer's network namespace, once found.
    netns: Option<u64>,
    /// Whether its peer's namespace was looked for.
    looked: bool,
}

/// Pod interfaces the pod programs are attached to, by name.
pub struct PodInterfaces {
    attached: BTreeMap<String, Attached>,
    /// Whether the peers' namespaces are wanted (pods' connected UDP
    /// translated per datagram).
    find_netns: bool,
    /// When the node's namespaces were last looked through.
    last_netns_lookup: Option<Instant>,
    /// The namespaces last given to the socket programs.
    netns_written: Option<BTreeSet<u64>>,
}

impl PodInterfaces {
    /// No interface yet; `find_netns`: find their peers' namespaces.
    pub fn new(find_netns: bool) -> Self {
        Self {
            attached: BTreeMap::new(),
            find_netns,
            last_netns_lookup: None,
            netns_written: None,
        }
    }

    /// The namespaces (cookies) of the attached interfaces' peers, when
    /// they differ from those last returned (always on the first call,
    /// so that a previous agent's set is replaced; empty while they are not
    /// wanted). Interfaces attached since are looked for first.
    pub fn pod_netns_change(&mut self) -> Option<BTreeSet<u64>> {
        if self.find_netns {
            self.find_peer_netns();
        }
        let now: BTreeSet<u64> = self.attached.values().filter_map(|a| a.netns).collect();
        if self.netns_written.as_ref() == Some(&now) {
            return None;
        }
        self.netns_written = Some(now.clone());
        Some(now)
    }

    /// Makes the next [`Self::pod_netns_change`] return the set again (its
    /// write failed).
    pub fn netns_not_written(&mut self) {
        self.netns_written = None;
    }

    /// Looks for the peer namespaces of registered interfaces not looked
    /// for yet, and of those not found, every [`NETNS_RETRY`].
    fn find_peer_netns(&mut self) {
        let unknown = |a: &Attached| a.peer_nsid.is_some() && a.netns.is_none();
        let fresh = self.attached.values().any(|a| unknown(a) && !a.looked);
        let retry = self.attached.values().any(unknown)
            && self
                .last_netns_lookup
                .is_none_or(|at| at.elapsed() >= NETNS_RETRY);
        if !fresh && !retry {
            return;
        }
        self.last_netns_lookup = Some(Instant::now());
        let by_nsid = match namespaces_by_nsid() {
            Ok(found) => found,
            Err(err) => {
                error!(error = %err, "listing the node's network namespaces");
                return;
            }
        };
        for (name, attached) in &mut self.attached {
            let Some(nsid) = attached.peer_nsid.filter(|_| attached.netns.is_none()) else {
                continue;
            };
            // Said once per interface; the retries are quiet.
            let first = !attached.looked;
            attached.looked = true;
            let Some(path) = by_nsid.get(&nsid) else {
                if first {
                    warn!(interface = %name, "the pod's network namespace was not found (looked for again every 10 s); its connected UDP sockets are translated at connect()");
                }
                continue;
            };
            match netns::cookie_of(path) {
                Ok(cookie) => {
                    info!(interface = %name, netns = %path.display(), "pod's connected UDP translated per datagram");
                    attached.netns = Some(cookie);
                }
                Err(err) => {
                    warn!(interface = %name, netns = %path.display(), error = %err, "naming the pod's network namespace")
                }
            }
        }
    }

    /// Attaches the pod programs to the interfaces that `prefixes` name or
    /// that are the known pods' (`endpoints`) and are not attached yet,
    /// registers them, and detaches those that went away or are no longer
    /// wanted.
    pub fn sync(&mut self, tc: &mut TcPrograms, prefixes: &[String], endpoints: &BTreeSet<String>) {
        let mut wanted = endpoints.clone();
        if !prefixes.is_empty() {
            match interfaces::named(prefixes) {
                Ok(named) => wanted.extend(named),
                Err(err) => {
                    error!(error = %err, "listing pod interfaces");
                    return;
                }
            }
        }
        self.attached.retain(|name, attached| {
            let keep = wanted.contains(name);
            if !keep {
                if let Some(ifindex) = attached.ifindex {
                    if let Err(err) = tc.remove_pod_interface(ifindex) {
                        error!(interface = %name, error = %err, "forgetting pod interface");
                    }
                }
                if let Err(err) = tc.detach(name) {
                    warn!(interface = %name, error = %err, "removing the pod programs' links");
                }
            }
            keep
        });
        for name in wanted {
            let endpoint = if endpoints.contains(&name) {
                POD_INTERFACE_ENDPOINT
            } else {
                0
            };
            match self.attached.get(&name).copied() {
                Some(attached) if attached.flags & POD_INTERFACE_ENDPOINT == endpoint => {}
                Some(attached) => {
                    let flags = (attached.flags & !POD_INTERFACE_ENDPOINT) | endpoint;
                    let registered = match attached.ifindex {
                        Some(ifindex) => register(tc, &name, ifindex, flags),
                        None => newly_attached(tc, &name, endpoint),
                    };
                    self.attached.insert(name, registered.keeping(&attached));
                }
                None => match tc.attach(&name, &TcHook::POD) {
                    Ok(()) => {
                        info!(interface = %name, "pod programs attached");
                        let registered = newly_attached(tc, &name, endpoint);
                        self.attached.insert(name, registered);
                    }
                    Err(err) => {
                        error!(interface = %name, error = %err, "attaching the pod programs")
                    }
                },
            }
        }
    }
}

impl Attached {
    /// This registration, with what was found of the same interface
    /// before (its peer's namespace).
    fn keeping(self, before: &Attached) -> Attached {
        if self.ifindex != before.ifindex || self.ifindex.is_none() {
            return self;
        }
        Attached {
            peer_nsid: before.peer_nsid,
            netns: before.netns,
            looked: before.looked,
            ..self
        }
    }
}

/// Registers an interface the pod programs were just attached to, asking
/// the kernel once what it is: the host end of a veth or netkit pair gets
/// [`POD_INTERFACE_PEER`] (packets to it are handed to its peer; others
/// keep the plain redirect) and remembers its peer's namespace id.
fn newly_attached(tc: &mut TcPrograms, name: &str, endpoint: u32) -> Attached {
    let Some(ifindex) = interfaces::index_of(name) else {
        return UNREGISTERED;
    };
    let link = match netlink::link(ifindex) {
        Ok(link) => link,
        Err(err) => {
            warn!(interface = %name, error = %err, "interface kind unknown; no peer redirect to it");
            netlink::Link::default()
        }
    };
    let kind = link.kind.as_deref().unwrap_or_default();
    let pair = kind == "veth" || kind == "netkit";
    let mut flags = endpoint;
    if pair {
        info!(interface = %name, kind = %kind, "packets to the pod interface are handed to its peer");
        flags |= POD_INTERFACE_PEER;
    }
    Attached {
        peer_nsid: link.peer_netnsid.filter(|_| pair),
        ..register(tc, name, ifindex, flags)
    }
}

/// Registers interface `ifindex` (`name`) with `flags`; what was
/// registered.
fn register(tc: &mut TcPrograms, name: &str, ifindex: u32, flags: u32) -> Attached {
    match tc.add_pod_interface(ifindex, flags) {
        Ok(()) => Attached {
            ifindex: Some(ifindex),
            flags,
            peer_nsid: None,
            netns: None,
            looked: false,
        },
        Err(err) => {
            error!(interface = %name, error = %err, "registering pod interface");
            UNREGISTERED
        }
    }
}

/// An interface attached but not registered.
const UNREGISTERED: Attached = Attached {
    ifindex: None,
    flags: 0,
    peer_nsid: None,
    netns: None,
    looked: false,
};

/// The node's network namespaces by the id the agent's namespace knows
/// them by (those it knows no id for are no pair interface's peer).
fn namespaces_by_nsid() -> std::io::Result<BTreeMap<i32, PathBuf>> {
    let mut by_nsid = BTreeMap::new();
    for path in netns::all()? {
        // A namespace may go while we look.
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        if let Some(nsid) = netlink::nsid_of(&file)? {
            by_nsid.entry(nsid).or_insert(path);
        }
    }
    Ok(by_nsid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_set_is_given_once_and_then_only_when_it_changes() {
        let mut off = PodInterfaces::new(false);
        assert_eq!(off.pod_netns_change(), Some(BTreeSet::new()));
        assert_eq!(off.pod_netns_change(), None);
        off.netns_not_written();
        assert_eq!(off.pod_netns_change(), Some(BTreeSet::new()));

        let mut on = PodInterfaces::new(true);
        on.attached.insert(
            "p1".into(),
            Attached {
                ifindex: Some(7),
                flags: 0,
                peer_nsid: Some(3),
                netns: Some(42),
                looked: true,
            },
        );
        assert_eq!(on.pod_netns_change(), Some([42].into()));
        assert_eq!(on.pod_netns_change(), None);
        on.attached.clear();
        assert_eq!(on.pod_netns_change(), Some(BTreeSet::new()));
    }
}
