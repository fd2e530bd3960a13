//! From settings to loaded, configured program sets: which sockets the
//! socket programs translate, and where the tc programs serve NodePorts.

use std::net::IpAddr;

use anyhow::{Context, Result};
use lb_common::config::{
    SockConfig, TcConfig, SOCK_CONFIG_NODE_NETNS_ONLY, SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET,
    TC_CONFIG_FIB_REDIRECT, TC_CONFIG_POD_LB, TC_CONFIG_POD_LB_UDP,
};
use lb_core::addr::addr_from_ip;
use tracing::{error, info};

use crate::{
    config::Settings,
    kernel::{service_maps::TcMaps, socket_programs::SocketPrograms, tc_programs::TcPrograms},
    node::{interfaces, netns},
    serve::metrics::Metrics,
};

/// Which sockets the socket programs translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketScope {
    /// Every socket of the cgroup (socketLb true).
    All,
    /// Those of the node's own network namespace (host processes,
    /// hostNetwork pods), which no pod interface carries; pods are translated
    /// per packet (socketLb false).
    NodeNetns,
    /// None: socketLb false on a kernel that cannot name the node's network
    /// namespace.
    Off,
}

/// The scope of the socket path for `socket_lb` on a node whose network
/// namespace cookie is `node_netns` (`None` when the kernel cannot name it).
pub fn socket_scope(socket_lb: bool, node_netns: Option<u64>) -> SocketScope {
    match (socket_lb, node_netns) {
        (true, _) => SocketScope::All,
        (false, Some(_)) => SocketScope::NodeNetns,
        (false, None) => SocketScope::Off,
    }
}

/// How the socket programs were configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPath {
    /// Which sockets they translate.
    pub scope: SocketScope,
    /// Whether they know the node's network namespace.
    pub node_netns_known: bool,
    /// Whether pods' connected UDP sockets are left to the pod programs,
    /// translated per datagram.
    pub pod_connected_udp_per_packet: bool,
}

/// Configures the socket programs before they are attached. A kernel that
/// cannot name the node's network namespace (`SO_NETNS_COOKIE` needs Linux
/// 5.14) costs NodePorts on 127.0.0.1, with socketLb false the node's own
/// processes' Service translation, and the per-datagram translation of
/// pods' connected UDP sockets (the programs could not tell a pod's socket
/// from a host process's): logged, and shown by `lb_socket_path_scope` and
/// `lb_localhost_node_ports`.
pub fn configure_socket_path(
    settings: &Settings,
    programs: &mut SocketPrograms,
    metrics: &Metrics,
) -> Result<SocketPath> {
    let socket_lb = settings.socket_lb;
    let node_netns = match netns::own_cookie() {
        Ok(cookie) => Some(cookie),
        Err(err) => {
            let lost = if socket_lb {
                "NodePorts will not answer on 127.0.0.1, and pods' connected UDP sockets are \
                 translated at connect()"
            } else {
                "the node's own processes will not reach Services"
            };
            error!(error = %err, consequence = %lost, "cannot name the node's network namespace (SO_NETNS_COOKIE)");
            None
        }
    };
    let scope = socket_scope(socket_lb, node_netns);
    let mut flags = 0;
    if scope == SocketScope::NodeNetns {
        info!("socket programs translate the node's own network namespace only (socketLb false)");
        flags |= SOCK_CONFIG_NODE_NETNS_ONLY;
    }
    let pod_connected_udp_per_packet = scope == SocketScope::All
        && node_netns.is_some()
        && settings.pods_connected_udp_per_packet();
    if pod_connected_udp_per_packet {
        info!("pods' connected UDP sockets are translated per datagram on their interfaces");
        flags |= SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET;
    }
    programs
        .configure(SockConfig {
            node_netns: node_netns.unwrap_or(0),
            flags,
            pad: 0,
        })
        .context("configuring the socket programs")?;
    metrics.socket_path_scope.set(match scope {
        SocketScope::Off => 0,
        SocketScope::NodeNetns => 1,
        SocketScope::All => 2,
    });
    Ok(SocketPath {
        scope,
        node_netns_known: node_netns.is_some(),
        pod_connected_udp_per_packet,
    })
}

/// The tc path, when interfaces are configured for it or policy is on.
pub struct TcPath {
    /// The programs.
    pub programs: TcPrograms,
    /// The maps plans write.
    pub maps: TcMaps,
    /// Addresses NodePorts answer on.
    pub node_port_addresses: Vec<IpAddr>,
}

/// Loads and configures the tc programs when uplinks or pod interfaces are
/// configured, or network policy is enforced.
pub fn load_tc_path(settings: &Settings) -> Result<Option<TcPath>> {
    // Pod interfaces serve pods without socket translation: the whole node's
    // (socketLb false) or annotated pods'.
    let per_packet_pods = !settings.socket_lb || !settings.pod_interfaces.is_empty();
    if settings.tc_interfaces.is_empty() && !per_packet_pods && !settings.network_policy {
        anyhow::ensure!(
            settings.socket_lb,
            "with socketLb false, set podInterfaces so ClusterIPs are still served"
        );
        return Ok(None);
    }
    let addresses = if settings.tc_interfaces.is_empty() {
        Vec::new()
    } else if settings.node_port_addresses.is_empty() {
        interfaces::addresses_of(&settings.tc_interfaces).context("listing interface addresses")?
    } else {
        settings.node_port_addresses.clone()
    };
    anyhow::ensure!(
        settings.tc_interfaces.is_empty() || !addresses.is_empty(),
        "no address on {:?} for NodePorts; set nodePortAddresses",
        settings.tc_interfaces
    );
    let (mut programs, maps) =
        TcPrograms::load(&settings.bpffs_dir, &settings.tc).context("loading the tc datapath")?;
    let snat = |v4: bool| {
        addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map_or([0; 4], |a| addr_from_ip(*a))
    };
    let pod_lb = if per_packet_pods {
        TC_CONFIG_POD_LB
    } else if settings.pods_connected_udp_per_packet() {
        TC_CONFIG_POD_LB_UDP
    } else {
        0
    };
    programs.set_config(&TcConfig {
        maglev_seed: settings.maglev.seed,
        snat_v4: snat(true),
        snat_v6: snat(false),
        flags: TC_CONFIG_FIB_REDIRECT | pod_lb,
        policy_mark: settings.policy_mark,
    })?;
    info!(
        interfaces = ?settings.tc_interfaces,
        node_port_addresses = ?addresses,
        "tc path loaded"
    );
    Ok(Some(TcPath {
        programs,
        maps,
        node_port_addresses: addresses,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_path_scope_follows_the_setting_and_the_kernel() {
        assert_eq!(socket_scope(true, None), SocketScope::All);
        assert_eq!(socket_scope(true, Some(7)), SocketScope::All);
        assert_eq!(socket_scope(false, Some(7)), SocketScope::NodeNetns);
        assert_eq!(socket_scope(false, None), SocketScope::Off);
    }
}
