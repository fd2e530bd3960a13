//! The XDP prefilter (`lb_xdp_prefilter`, in the tc object so it shares the
//! frontend and source range maps): attached to the uplinks in native mode
//! where the driver supports it, generic (skb) mode otherwise, with a link
//! pinned in bpffs like the tc programs' (a new agent updates it in place),
//! and its deny list kept equal to the configured CIDRs.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        MapData,
    },
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf,
};
use ipnetwork::IpNetwork;
use lb_common::{maps, net::Addr};
use lb_core::addr::addr_from_ip;

use super::{pins, service_maps::MapSource, KernelError, OnMap};

/// The prefilter program's name in the tc object.
pub const PROGRAM: &str = "lb_xdp_prefilter";

/// How the prefilter runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// In the driver, before an skb exists.
    Native,
    /// In the stack, on the skb (drivers without XDP support).
    Generic,
    /// A previous agent's link, updated to this program (its mode kept).
    Updated,
}

/// Loads (verifies) the prefilter program of a loaded tc object.
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    program(ebpf)?
        .load()
        .map_err(|source| KernelError::Program {
            name: PROGRAM,
            source,
        })
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, KernelError> {
    ebpf.program_mut(PROGRAM)
        .ok_or(KernelError::MissingProgram(PROGRAM))?
        .try_into()
        .map_err(|source| KernelError::Program {
            name: PROGRAM,
            source,
        })
}

/// Pin path of the prefilter's link on `interface`.
pub fn link_pin(pin_dir: &Path, interface: &str) -> PathBuf {
    pins::link_path(pin_dir, &format!("xdp_{interface}"))
}

/// Attaches the prefilter to `interface`, or updates the link a previous
/// agent pinned there.
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
) -> Result<Attachment, KernelError> {
    let pin = link_pin(pin_dir, interface);
    let program_err = |source| KernelError::Program {
        name: PROGRAM,
        source,
    };
    let link_err = |source| KernelError::Link {
        path: pin.clone(),
        source,
    };
    let program = program(ebpf)?;
    match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = XdpLink::try_from(FdLink::from(old)).map_err(link_err)?;
            let id = program.attach_to_link(link).map_err(program_err)?;
            // The pin keeps the updated link.
            drop(program.take_link(id).map_err(program_err)?);
            return Ok(Attachment::Updated);
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(link_err(source)),
    }
    let (id, attachment) = match program.attach(interface, XdpMode::Driver) {
        Ok(id) => (id, Attachment::Native),
        Err(_) => (
            program
                .attach(interface, XdpMode::Skb)
                .map_err(program_err)?,
            Attachment::Generic,
        ),
    };
    let link = program.take_link(id).map_err(program_err)?;
    let link = FdLink::try_from(link).map_err(link_err)?;
    link.pin(&pin).map_err(|source| KernelError::Pin {
        path: pin.clone(),
        source,
    })?;
    Ok(attachment)
}

/// Detaches the prefilter from `interface` (removes its link pin).
pub fn detach(pin_dir: &Path, interface: &str) -> Result<(), KernelError> {
    pins::remove(&link_pin(pin_dir, interface))
}

/// The deny list in the kernel.
pub struct DenyList {
    map: LpmTrie<MapData, Addr, u32>,
}

/// The trie key of a prefix: IPv4 as IPv4-mapped, a `/n` a `/96+n`.
fn key(prefix: &IpNetwork) -> Key<Addr> {
    let extra = if prefix.is_ipv4() { 96 } else { 0 };
    Key::new(
        u32::from(prefix.prefix()) + extra,
        addr_from_ip(prefix.network()),
    )
}

impl DenyList {
    pub(crate) fn take(from: &mut impl MapSource) -> Result<Self, KernelError> {
        Ok(Self {
            map: LpmTrie::try_from(from.open(maps::XDP_DENY)?).on(maps::XDP_DENY)?,
        })
    }

    /// Makes the list exactly `prefixes`: adds the missing, then removes
    /// the others (a prefix listed before and now is never absent).
    pub fn set(&mut self, prefixes: &[IpNetwork]) -> Result<(), KernelError> {
        let wanted: BTreeSet<(u32, Addr)> = prefixes
            .iter()
            .map(|p| {
                let k = key(p);
                (k.prefix_len(), k.data())
            })
            .collect();
        for (len, data) in &wanted {
            self.map
                .insert(&Key::new(*len, *data), 1, 0)
                .on(maps::XDP_DENY)?;
        }
        let present: Vec<Key<Addr>> = self
            .map
            .keys()
            .collect::<Result<_, _>>()
            .on(maps::XDP_DENY)?;
        for old in present {
            if !wanted.contains(&(old.prefix_len(), old.data())) {
                self.map.remove(&old).on(maps::XDP_DENY)?;
            }
        }
        Ok(())
    }

    /// The prefixes in the list, as (prefix length, address) keys.
    pub fn entries(&self) -> Result<Vec<(u32, Addr)>, KernelError> {
        self.map
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, _>>()
            .on(maps::XDP_DENY)
    }
}
