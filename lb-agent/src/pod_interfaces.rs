//! Pod interfaces (`podInterfaces` name prefixes) as they come and go: the
//! tc programs are attached to each new one, and veth and netkit host ends
//! are registered so translated packets are handed straight to the pod.

use std::collections::BTreeMap;

use tracing::{error, info, warn};

use crate::{
    kernel::tc_programs::{TcHook, TcPrograms},
    node::{interfaces, netlink},
};

/// Pod interfaces the tc programs are attached to, by name, with the
/// ifindex of those registered for peer redirects.
#[derive(Default)]
pub struct PodInterfaces {
    attached: BTreeMap<String, Option<u32>>,
}

impl PodInterfaces {
    /// Attaches `hooks` to interfaces whose name starts with one of
    /// `prefixes` and that appeared since the last call, registering veth and
    /// netkit ones for peer redirects; forgets the ones that went away.
    pub fn attach_new(&mut self, tc: &mut TcPrograms, prefixes: &[String], hooks: &[TcHook]) {
        if prefixes.is_empty() {
            return;
        }
        let present = match interfaces::named(prefixes) {
            Ok(present) => present,
            Err(err) => {
                error!(error = %err, "listing pod interfaces");
                return;
            }
        };
        self.attached.retain(|name, ifindex| {
            let keep = present.contains(name);
            if let (false, Some(ifindex)) = (keep, *ifindex) {
                if let Err(err) = tc.remove_pod_interface(ifindex) {
                    error!(interface = %name, error = %err, "forgetting pod interface");
                }
            }
            keep
        });
        for name in present {
            if self.attached.contains_key(&name) {
                continue;
            }
            match tc.attach(&name, hooks) {
                Ok(()) => {
                    info!(interface = %name, "tc programs attached to pod interface");
                    let peer = peer_redirect_target(tc, &name);
                    self.attached.insert(name, peer);
                }
                Err(err) => error!(interface = %name, error = %err, "attaching tc programs"),
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
