//! Applies desired states to the maps, keeping the applied state in step:
//! plans (from `lb-core`), executes them group by group through any
//! [`ServiceMaps`], and repairs what failed on a later pass.
//!
//! - A frontend that did not fit (a capacity error) is planned again on every
//!   pass until it does, even if nothing about it changes.
//! - A failed write makes the next pass re-read the maps and plan every
//!   frontend, so whatever the failure left half done is repaired.
//! - Sockets whose UDP backend left are found here and returned; moving
//!   them to a live backend is the caller's business.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use lb_common::{
    net::PROTO_UDP,
    service::{Backend, ServiceKey, SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY},
    socket::SockRevNatKey,
};
use lb_core::{
    addr::{addr_from_ip, ip_from_addr, port_from_be, port_to_be},
    desired::DesiredState,
    plan::{plan, Applied, Capacity, CapacityError, MaglevSettings, Plan, Scope, UndersizedTable},
};

use crate::kernel::{KernelError, ServiceMaps};

/// What went wrong in a pass; the pass did everything else it could.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A frontend does not fit a map; it keeps its previous state and is
    /// retried on every pass.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// A map write failed; the rest of its frontend's writes were skipped,
    /// and the next pass re-reads the maps and repairs it.
    #[error("{op}: {source}")]
    Write {
        /// The write, in words.
        op: String,
        /// What the kernel answered.
        source: KernelError,
    },
    /// The maps could not be read back after a failed write.
    #[error("re-reading the maps after a failed write: {0}")]
    Reread(KernelError),
    /// Session affinity entries of removed backends could not be pruned.
    #[error("pruning session affinity: {0}")]
    Affinity(KernelError),
    /// The sockets steered to removed UDP backends could not be listed.
    #[error("listing the sockets of removed UDP backends: {0}")]
    Sockets(KernelError),
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Map writes executed.
    pub writes: usize,
    /// Frontends in the maps afterwards.
    pub frontends: usize,
    /// Sockets the socket programs steered to a UDP backend that left.
    pub stale_udp_sockets: Vec<StaleUdpSocket>,
    /// What went wrong.
    pub errors: Vec<ReconcileError>,
}

/// A socket the socket programs steered to a UDP backend that has left:
/// connected to it, or an unconnected socket that once sent to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUdpSocket {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend it was steered to.
    pub backend: SocketAddr,
    /// The frontend its application asked for.
    pub frontend: SocketAddr,
}

impl StaleUdpSocket {
    /// The socket's entry in the per-socket reverse translation map.
    pub fn translation_key(&self) -> SockRevNatKey {
        SockRevNatKey::new(
            self.cookie,
            addr_from_ip(self.backend.ip()),
            port_to_be(self.backend.port()),
        )
    }
}

/// Connected UDP sockets of removed backends still to be connected again
/// (their frontend had no backend, or moving them failed), at most a
/// capacity of them.
#[derive(Debug)]
pub struct WaitingUdpSockets {
    sockets: Vec<StaleUdpSocket>,
    capacity: usize,
}

impl WaitingUdpSockets {
    /// An empty list holding at most `capacity` sockets.
    pub fn new(capacity: usize) -> Self {
        Self {
            sockets: Vec::new(),
            capacity,
        }
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes out the sockets whose frontend `reconciler` serves now.
    pub fn take_served(&mut self, reconciler: &Reconciler) -> Vec<StaleUdpSocket> {
        let (served, waiting) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|socket| reconciler.serves_udp(socket.frontend));
        self.sockets = waiting;
        served
    }

    /// Room for up to `wanted` more. When they would not fit, the sockets
    /// closed meanwhile are forgotten first: the socket programs delete a
    /// socket's translation when it is released.
    pub fn room_for(&mut self, wanted: usize, maps: &impl ServiceMaps) -> usize {
        if self.sockets.len() + wanted > self.capacity {
            self.sockets.retain(|socket| {
                maps.has_socket_translation(&socket.translation_key())
                    .unwrap_or(true)
            });
        }
        self.capacity.saturating_sub(self.sockets.len())
    }

    /// Adds sockets, as many as there is room for.
    pub fn add(&mut self, sockets: impl IntoIterator<Item = StaleUdpSocket>) {
        let room = self.capacity.saturating_sub(self.sockets.len());
        self.sockets.extend(sockets.into_iter().take(room));
    }
}

/// Keeps what the maps hold and moves them to each new desired state.
pub struct Reconciler {
    applied: Applied,
    capacity: Capacity,
    maglev: MaglevSettings,
    /// Set after adoption or a failed write: the next pass plans every
    /// frontend, not only the ones the compiler reports changed.
    needs_full: bool,
    /// Frontends a capacity error kept out of the maps.
    pending: BTreeSet<ServiceKey>,
    /// Set after adoption: the next pass returns the sockets of every UDP
    /// backend that is not (or no longer) one of its frontend's, also
    /// those removed before this agent started (while no agent ran, or
    /// waiting for a backend when the previous agent stopped).
    sweep_sockets: bool,
}

impl Reconciler {
    /// Adopts what the maps already hold (a previous agent's work): every
    /// frontend with its backend slots or Maglev table, source ranges, and
    /// the entries nothing refers to, to delete.
    pub fn adopt(
        maps: &impl ServiceMaps,
        capacity: Capacity,
        maglev: MaglevSettings,
    ) -> Result<Self, KernelError> {
        Ok(Self {
            applied: Applied::adopt(&maps.dump()?, &maglev),
            capacity,
            maglev,
            needs_full: true,
            pending: BTreeSet::new(),
            sweep_sockets: true,
        })
    }

    /// What the maps hold, as last written or read.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Maglev frontends whose table is small for their backends.
    pub fn undersized_maglev_tables(&self) -> Vec<UndersizedTable> {
        self.applied.undersized_maglev_tables(self.maglev.size)
    }

    /// The capacities plans respect.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// How many frontends a full map keeps out of the datapath.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether the socket programs give a UDP socket connecting to
    /// `frontend` a backend: it is programmed and has one.
    pub fn serves_udp(&self, frontend: SocketAddr) -> bool {
        let key = ServiceKey {
            addr: addr_from_ip(frontend.ip()),
            port: port_to_be(frontend.port()),
            proto: PROTO_UDP,
            scope: SCOPE_EXTERNAL,
        };
        self.applied
            .frontends
            .get(&key)
            .is_some_and(|f| !f.backends.is_empty())
    }

    /// Whether a pass is owed even without a change: a frontend waits for
    /// capacity, or a failed write waits for repair.
    pub fn needs_retry(&self) -> bool {
        self.needs_full || !self.pending.is_empty()
    }

    /// Moves the maps to `desired` for the frontends in `changed`, and for
    /// every frontend a previous pass could not finish.
    pub fn reconcile(
        &mut self,
        maps: &mut impl ServiceMaps,
        desired: &DesiredState,
        changed: &BTreeSet<ServiceKey>,
    ) -> Reconciled {
        let scope_keys: BTreeSet<ServiceKey> = changed.union(&self.pending).copied().collect();
        let scope = if self.needs_full {
            Scope::All
        } else {
            Scope::Only(&scope_keys)
        };
        self.needs_full = false;
        let plan = plan(
            &mut self.applied,
            desired,
            &self.capacity,
            &self.maglev,
            scope,
        );
        self.pending = plan.errors.iter().map(|e| e.key).collect();
        let mut errors: Vec<ReconcileError> = plan
            .errors
            .iter()
            .cloned()
            .map(ReconcileError::Capacity)
            .collect();
        let affinity_touched = touches_affinity(&self.applied, &plan);
        let removed_udp = removed_udp_backends(&self.applied, &plan);
        let (writes, failed) = execute(maps, &plan);
        if !failed.is_empty() {
            self.needs_full = true;
            errors.extend(failed);
            match maps.dump() {
                Ok(dump) => self.applied = Applied::adopt(&dump, &self.maglev),
                Err(err) => errors.push(ReconcileError::Reread(err)),
            }
        }
        if affinity_touched {
            let valid = affine_backends(&self.applied);
            let keep = |service_id: u32, backend_id: u32| {
                valid
                    .get(&service_id)
                    .is_some_and(|ids| ids.contains(&backend_id))
            };
            if let Err(err) = maps.prune_affinity(&keep) {
                errors.push(ReconcileError::Affinity(err));
            }
        }
        let mut stale_udp_sockets = Vec::new();
        if self.sweep_sockets || !removed_udp.is_empty() {
            let udp_backends = self.sweep_sockets.then(|| udp_backends(&self.applied));
            match maps.socket_translations() {
                Ok(sockets) => {
                    self.sweep_sockets = false;
                    let same =
                        |key: &SockRevNatKey, b: &Backend| b.addr == key.addr && b.port == key.port;
                    stale_udp_sockets = sockets
                        .into_iter()
                        .filter(|(key, rev)| {
                            let removed = removed_udp.iter().any(|(service_id, backend)| {
                                *service_id == rev.service_id && same(key, backend)
                            });
                            let not_a_backend = udp_backends.as_ref().is_some_and(|frontends| {
                                frontends
                                    .get(&rev.service_id)
                                    .is_some_and(|backends| !backends.iter().any(|b| same(key, b)))
                            });
                            removed || not_a_backend
                        })
                        .map(|(key, rev)| StaleUdpSocket {
                            cookie: key.cookie,
                            backend: SocketAddr::new(
                                ip_from_addr(&key.addr),
                                port_from_be(key.port),
                            ),
                            frontend: SocketAddr::new(
                                ip_from_addr(&rev.addr),
                                port_from_be(rev.port),
                            ),
                        })
                        .collect();
                }
                Err(err) => errors.push(ReconcileError::Sockets(err)),
            }
        }
        Reconciled {
            writes,
            frontends: self.applied.frontends.len(),
            stale_udp_sockets,
            errors,
        }
    }
}

/// Executes a plan group by group. A failed write skips the rest of its
/// group, leaving that frontend as it was; other groups still run. Returns
/// the writes done and the failures.
fn execute(maps: &mut impl ServiceMaps, plan: &Plan) -> (usize, Vec<ReconcileError>) {
    let mut writes = 0;
    let mut failed = Vec::new();
    for group in &plan.groups {
        for op in &group.ops {
            match maps.write(op) {
                Ok(()) => writes += 1,
                Err(source) => {
                    failed.push(ReconcileError::Write {
                        op: op.describe(),
                        source,
                    });
                    break;
                }
            }
        }
    }
    (writes, failed)
}

/// `(service id, backend)` pairs of UDP frontends whose backend the plan removes.
fn removed_udp_backends(applied: &Applied, plan: &Plan) -> BTreeSet<(u32, Backend)> {
    let mut removed = BTreeSet::new();
    for (key, old) in plan.replaced.iter().filter(|(k, _)| k.proto == PROTO_UDP) {
        let kept: BTreeSet<&Backend> = applied
            .frontends
            .get(key)
            .map(|f| f.backends.iter().collect())
            .unwrap_or_default();
        for backend in old.backends.iter().filter(|b| !kept.contains(b)) {
            removed.insert((old.service_id, *backend));
        }
    }
    removed
}

/// The backends of each UDP frontend, by service id.
fn udp_backends(applied: &Applied) -> BTreeMap<u32, &[Backend]> {
    applied
        .frontends
        .iter()
        .filter(|(key, _)| key.proto == PROTO_UDP)
        .map(|(_, frontend)| (frontend.service_id, frontend.backends.as_slice()))
        .collect()
}

/// Whether the plan changes a frontend that has or had session affinity;
/// `applied` is the state after the plan.
fn touches_affinity(applied: &Applied, plan: &Plan) -> bool {
    plan.replaced.iter().any(|(key, old)| {
        old.flags & SERVICE_FLAG_AFFINITY != 0
            || applied
                .frontends
                .get(key)
                .is_some_and(|f| f.flags & SERVICE_FLAG_AFFINITY != 0)
    })
}

/// For each frontend with affinity, the backend ids a client may stay on.
fn affine_backends(applied: &Applied) -> BTreeMap<u32, BTreeSet<u32>> {
    applied
        .frontends
        .values()
        .filter(|f| f.flags & SERVICE_FLAG_AFFINITY != 0)
        .map(|f| {
            let ids = f
                .backends
                .iter()
                .filter_map(|b| applied.backends.get(b).copied())
                .collect();
            (f.service_id, ids)
        })
        .collect()
}

#[cfg(test)]
mod tests;
