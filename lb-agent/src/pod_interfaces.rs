//! Pod interfaces as they come and go: those whose name starts with one of
//! the `podInterfaces` prefixes, and the host ends of this node's pods that
//! policy found from their addresses. The pod programs are attached to each
//! new one (both hooks: the pod's packets and the packets to it), each is
//! registered with what the programs need to know of it (a veth or netkit
//! host end, a known pod's), and the pins of those that went away are
//! removed.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::config::{POD_INTERFACE_ENDPOINT, POD_INTERFACE_PEER};
use tracing::{error, info, warn};

use crate::{
    kernel::tc_programs::{TcHook, TcPrograms},
    node::{interfaces, netlink},
};

/// A pod interface the pod programs are attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attached {
    /// Its index, once registered.
    ifindex: Option<u32>,
    /// The `POD_INTERFACE_*` bits registered.
    flags: u32,
}

/// Pod interfaces the pod programs are attached to, by name.
#[derive(Default)]
pub struct PodInterfaces {
    attached: BTreeMap<String, Attached>,
}

impl PodInterfaces {
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
                    let registered = register(tc, &name, flags);
                    self.attached.insert(name, registered);
                }
                None => match tc.attach(&name, &TcHook::POD) {
                    Ok(()) => {
                        info!(interface = %name, "pod programs attached");
                        let flags = endpoint | peer_flag(&name);
                        let registered = register(tc, &name, flags);
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

/// [`POD_INTERFACE_PEER`] if `name` is the host end of a veth or netkit
/// pair; packets to other interfaces keep the plain redirect.
fn peer_flag(name: &str) -> u32 {
    let Some(ifindex) = interfaces::index_of(name) else {
        return 0;
    };
    match netlink::link_kind(ifindex) {
        Ok(Some(kind)) if kind == "veth" || kind == "netkit" => {
            info!(interface = %name, kind = %kind, "packets to the pod interface are handed to its peer");
            POD_INTERFACE_PEER
        }
        Ok(_) => 0,
        Err(err) => {
            warn!(interface = %name, error = %err, "interface kind unknown; no peer redirect to it");
            0
        }
    }
}

/// Registers `name` with `flags`; what was registered.
fn register(tc: &mut TcPrograms, name: &str, flags: u32) -> Attached {
    let Some(ifindex) = interfaces::index_of(name) else {
        return Attached {
            ifindex: None,
            flags: 0,
        };
    };
    match tc.add_pod_interface(ifindex, flags) {
        Ok(()) => Attached {
            ifindex: Some(ifindex),
            flags,
        },
        Err(err) => {
            error!(interface = %name, error = %err, "registering pod interface");
            Attached {
                ifindex: None,
                flags: 0,
            }
        }
    }
}
