//! Pod interfaces as they come and go: those whose name starts with one of
//! the `podInterfaces` prefixes, and the host ends of this node's pods that
//! policy found from their addresses. The pod programs are attached to each
//! new one (both hooks: the pod's packets and the packets to it), veth and
//! netkit host ends are registered so translated packets are handed straight
//! to the pod, and the pins of those that went away are removed.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{error, info, warn};

use crate::{
    kernel::tc_programs::{TcHook, TcPrograms},
    node::{interfaces, netlink},
};

/// Pod interfaces the pod programs are attached to, by name, with the
/// ifindex of those registered for peer redirects.
#[derive(Default)]
pub struct PodInterfaces {
    attached: BTreeMap<String, Option<u32>>,
}

impl PodInterfaces {
    /// Attaches the pod programs to the interfaces that `prefixes` name or
    /// that are in `found` and are not attached yet; detaches those that
    /// went away or are no longer wanted.
    pub fn sync(&mut self, tc: &mut TcPrograms, prefixes: &[String], found: &BTreeSet<String>) {
        let mut wanted = found.clone();
        if !prefixes.is_empty() {
            match interfaces::named(prefixes) {
                Ok(named) => wanted.extend(named),
                Err(err) => {
                    error!(error = %err, "listing pod interfaces");
                    return;
                }
            }
        }
        self.attached.retain(|name, ifindex| {
            let keep = wanted.contains(name);
            if !keep {
                if let Some(ifindex) = *ifindex {
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
            if self.attached.contains_key(&name) {
                continue;
            }
            match tc.attach(&name, &TcHook::POD) {
                Ok(()) => {
                    info!(interface = %name, "pod programs attached");
                    let peer = peer_redirect_target(tc, &name);
                    self.attached.insert(name, peer);
                }
                Err(err) => error!(interface = %name, error = %err, "attaching the pod programs"),
            }
        }
    }
}

/// Registers `name` for peer redirects if it is the host end of a veth or
/// netkit pair, returning its ifindex; packets to other interfaces keep the
/// plain redirect.
fn peer_redirect_target(tc: &mut TcPrograms, name: &str) -> Option<u32> {
    let ifindex = interfaces::index_of(name)?;
    let kind = match netlink::link_kind(ifindex) {
        Ok(Some(kind)) if kind == "veth" || kind == "netkit" => kind,
        Ok(_) => return None,
        Err(err) => {
            warn!(interface = %name, error = %err, "interface kind unknown; no peer redirect to it");
            return None;
        }
    };
    match tc.add_pod_interface(ifindex) {
        Ok(()) => {
            info!(interface = %name, kind = %kind, "packets to the pod interface are handed to its peer");
            Some(ifindex)
        }
        Err(err) => {
            error!(interface = %name, error = %err, "registering pod interface");
            None
        }
    }
}
