//! Maps that fail on purpose, as Cilium's `FaultyLBMaps` does: wraps any
//! [`ServiceMaps`] and injects the kernel's errors (ENOSPC, E2BIG, EPERM)
//! into chosen writes, or cuts a Maglev table write off half way, so the
//! reconciler's tests can show what a full map, a lost capability or a crash
//! in the middle of a batch leave behind, and that the next pass repairs it.

use lb_common::{maps, service::RevNat, socket::SockRevNatKey};
use lb_core::plan::{Dump, Op};

use super::{syscall_error, KernelError, ServiceMaps};

/// Which writes a fault hits.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The write this many writes from now (0: the next one).
    Nth(usize),
    /// Every write this predicate accepts.
    Matching(fn(&Op) -> bool),
}

/// One scripted failure.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// Which writes fail.
    pub target: Target,
    /// The errno they fail with.
    pub errno: i32,
    /// How many writes it hits before it is used up.
    pub times: usize,
    /// A Maglev table write it hits first writes half its slots, as a
    /// crash or a full map in the middle of the batch would leave it.
    pub half_table: bool,
}

impl Fault {
    /// The next write fails once with `errno`.
    pub fn next_write(errno: i32) -> Self {
        Self::nth_write(0, errno)
    }

    /// The write `n` writes from now fails once with `errno`.
    pub fn nth_write(n: usize, errno: i32) -> Self {
        Self {
            target: Target::Nth(n),
            errno,
            times: 1,
            half_table: false,
        }
    }

    /// The next `times` writes `matching` accepts fail with `errno`.
    pub fn matching(matching: fn(&Op) -> bool, errno: i32, times: usize) -> Self {
        Self {
            target: Target::Matching(matching),
            errno,
            times,
            half_table: false,
        }
    }

    /// The next Maglev table write stops half way with `errno`.
    pub fn half_table(errno: i32) -> Self {
        Self {
            target: Target::Matching(|op| matches!(op, Op::PutMaglevTable(..))),
            errno,
            times: 1,
            half_table: true,
        }
    }
}

/// [`ServiceMaps`] that fail as scripted, and otherwise pass through.
#[derive(Debug)]
pub struct FaultyServiceMaps<M> {
    /// The maps that writes which do not fail reach.
    pub inner: M,
    faults: Vec<Fault>,
    /// Writes attempted so far.
    attempted: usize,
    /// Writes failed so far.
    pub failed: usize,
}

impl<M: ServiceMaps> FaultyServiceMaps<M> {
    /// Wraps `inner`; no fault is scripted yet.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            faults: Vec::new(),
            attempted: 0,
            failed: 0,
        }
    }

    /// Scripts a fault; `Target::Nth` counts from now.
    pub fn inject(&mut self, mut fault: Fault) {
        if let Target::Nth(n) = &mut fault.target {
            *n += self.attempted;
        }
        self.faults.push(fault);
    }

    /// Whether every scripted fault has been used up.
    pub fn exhausted(&self) -> bool {
        self.faults.iter().all(|f| f.times == 0)
    }

    /// The fault that hits write number `index`, taking one of its uses.
    fn hit(&mut self, index: usize, op: &Op) -> Option<Fault> {
        let fault = self.faults.iter_mut().find(|f| {
            f.times > 0
                && match f.target {
                    Target::Nth(n) => n == index,
                    Target::Matching(matches) => matches(op),
                }
        })?;
        fault.times -= 1;
        Some(*fault)
    }
}

/// The map a write goes to, for the error it fails with.
fn map_of(op: &Op) -> &'static str {
    match op {
        Op::PutBackend(..) | Op::DeleteBackend(_) => maps::BACKENDS,
        Op::PutSlot(..) | Op::DeleteSlot(_) => maps::BACKEND_SLOTS,
        Op::PutRevNat(..) | Op::DeleteRevNat(_) => maps::REV_NAT,
        Op::PutName(..) | Op::DeleteName(_) => maps::SERVICE_NAMES,
        Op::PutService(..) | Op::DeleteService(_) => maps::SERVICES,
        Op::PutMaglevTable(..) | Op::DeleteMaglevTable(..) => maps::MAGLEV,
        Op::PutSourceRange(..) | Op::DeleteSourceRange(..) => maps::SOURCE_RANGES,
    }
}

impl<M: ServiceMaps> ServiceMaps for FaultyServiceMaps<M> {
    fn dump(&self) -> Result<Dump, KernelError> {
        self.inner.dump()
    }

    fn write(&mut self, op: &Op) -> Result<(), KernelError> {
        let index = self.attempted;
        self.attempted += 1;
        let Some(fault) = self.hit(index, op) else {
            return self.inner.write(op);
        };
        self.failed += 1;
        if let (true, Op::PutMaglevTable(generation, table)) = (fault.half_table, op) {
            // The first half of the slots stays, without the size entry: a
            // table no reader can use, under a generation no frontend points
            // at yet. (A table of zero slots deletes just the size entry.)
            let half = table[..table.len() / 2].to_vec();
            if !half.is_empty() {
                self.inner.write(&Op::PutMaglevTable(*generation, half))?;
                self.inner.write(&Op::DeleteMaglevTable(*generation, 0))?;
            }
        }
        Err(KernelError::Map {
            name: map_of(op),
            source: syscall_error("bpf_map_update_elem", fault.errno),
        })
    }

    fn prune_affinity(&mut self, keep: &dyn Fn(u32, u32) -> bool) -> Result<usize, KernelError> {
        self.inner.prune_affinity(keep)
    }

    fn socket_translations(&self) -> Result<Vec<(SockRevNatKey, RevNat)>, KernelError> {
        self.inner.socket_translations()
    }

    fn has_socket_translation(&self, key: &SockRevNatKey) -> Result<bool, KernelError> {
        self.inner.has_socket_translation(key)
    }

    fn forget_socket_translation(&mut self, key: &SockRevNatKey) -> Result<(), KernelError> {
        self.inner.forget_socket_translation(key)
    }
}
