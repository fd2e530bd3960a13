//! The maps in memory, with the kernel's capacities and errors: for the
//! reconciler's tests, golden tests and dry runs without a kernel.

use std::collections::BTreeMap;

use lb_common::{
    maps,
    service::{RevNat, SERVICE_FLAG_AFFINITY},
    socket::SockRevNatKey,
};
use lb_core::plan::{
    memory::{MemoryError, MemoryMaps},
    Capacity, Dump, Op,
};

use super::{syscall_error, KernelError, ServiceMaps};

/// The maps as plain data. Session affinity entries are kept as
/// (service id, backend id) pairs, as the reconciler prunes them.
#[derive(Clone, Debug, Default)]
pub struct FakeServiceMaps {
    /// What plans wrote.
    pub maps: MemoryMaps,
    /// Session affinity entries: client -> (service id, backend id).
    pub affinity: BTreeMap<u64, (u32, u32)>,
    /// Open translated sockets.
    pub sockets: Vec<(SockRevNatKey, RevNat)>,
    /// Every write executed, in order.
    pub writes: Vec<Op>,
}

impl FakeServiceMaps {
    /// Empty maps with these capacities.
    pub fn with_capacity(capacity: Capacity) -> Self {
        Self {
            maps: MemoryMaps::with_capacity(capacity),
            ..Self::default()
        }
    }

    /// Gives every frontend with session affinity one client stuck to each
    /// of its backends, as traffic would.
    pub fn add_affinity_clients(&mut self) {
        let mut client = self.affinity.len() as u64;
        for value in self.maps.services.values() {
            if value.flags & SERVICE_FLAG_AFFINITY == 0 {
                continue;
            }
            for slot in 0..value.backend_count {
                let key = lb_common::service::SlotKey {
                    generation: value.slot_generation,
                    slot,
                };
                if let Some(backend) = self.maps.slots.get(&key) {
                    client += 1;
                    self.affinity.insert(client, (value.service_id, *backend));
                }
            }
        }
    }
}

/// The kernel map and errno a write refused by [`MemoryMaps`] stands for.
fn kernel_error(err: MemoryError, op: &Op) -> KernelError {
    match err {
        MemoryError::Full { map, .. } => {
            let (name, errno) = match map {
                "service" => (maps::SERVICES, libc::E2BIG),
                "backend" => (maps::BACKENDS, libc::E2BIG),
                "backend slot" => (maps::BACKEND_SLOTS, libc::E2BIG),
                "reverse NAT" => (maps::REV_NAT, libc::E2BIG),
                "name" => (maps::SERVICE_NAMES, libc::E2BIG),
                "Maglev table" => (maps::MAGLEV, libc::E2BIG),
                _ => (maps::SOURCE_RANGES, libc::ENOSPC),
            };
            KernelError::Map {
                name,
                source: syscall_error("bpf_map_update_elem", errno),
            }
        }
        MemoryError::Dangling(_) => panic!(
            "{}: a plan flipped a frontend to a backend set it had not written",
            op.describe()
        ),
    }
}

impl ServiceMaps for FakeServiceMaps {
    fn dump(&self) -> Result<Dump, KernelError> {
        Ok(self.maps.dump())
    }

    /// # Panics
    ///
    /// When a write would point a frontend at a backend set that is not
    /// complete: a plan must never do that.
    fn write(&mut self, op: &Op) -> Result<(), KernelError> {
        self.maps.write(op).map_err(|err| kernel_error(err, op))?;
        self.writes.push(op.clone());
        Ok(())
    }

    fn prune_affinity(&mut self, keep: &dyn Fn(u32, u32) -> bool) -> Result<usize, KernelError> {
        let before = self.affinity.len();
        self.affinity
            .retain(|_, (service_id, backend_id)| keep(*service_id, *backend_id));
        Ok(before - self.affinity.len())
    }

    fn socket_translations(&self) -> Result<Vec<(SockRevNatKey, RevNat)>, KernelError> {
        Ok(self.sockets.clone())
    }

    fn has_socket_translation(&self, key: &SockRevNatKey) -> Result<bool, KernelError> {
        Ok(self.sockets.iter().any(|(k, _)| k == key))
    }

    fn forget_socket_translation(&mut self, key: &SockRevNatKey) -> Result<(), KernelError> {
        self.sockets.retain(|(k, _)| k != key);
        Ok(())
    }
}
