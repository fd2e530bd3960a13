//! Sources of intent: the Kubernetes API ([`kubernetes`]) and a directory
//! of YAML ([`files`]). Each hands whole snapshots of objects to the agent
//! through a one-slot mailbox ([`Latest`]): a newer snapshot replaces an
//! unread older one, so the queue is bounded and the agent always works on
//! the latest state.

pub mod events;
pub mod files;
pub mod kubernetes;
mod pod_store;

use std::{
    sync::{Condvar, Mutex},
    time::Duration,
};

use lb_core::intent::{ObjectError, Objects};

/// A snapshot of every object a source holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The objects.
    pub objects: Objects,
    /// Documents the source could not parse (YAML only).
    pub errors: Vec<ObjectError>,
}

/// A one-slot mailbox holding the latest snapshot.
#[derive(Default)]
pub struct Latest {
    slot: Mutex<Option<Snapshot>>,
    ready: Condvar,
}

impl Latest {
    /// Replaces any unread snapshot with `snapshot`.
    pub fn publish(&self, snapshot: Snapshot) {
        *self.slot.lock().expect("not poisoned") = Some(snapshot);
        self.ready.notify_one();
    }

    /// Waits up to `timeout` for a snapshot and takes it.
    pub fn take(&self, timeout: Duration) -> Option<Snapshot> {
        let guard = self.slot.lock().expect("not poisoned");
        let (mut guard, _) = self
            .ready
            .wait_timeout_while(guard, timeout, |slot| slot.is_none())
            .expect("not poisoned");
        guard.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mailbox_keeps_only_the_latest_snapshot() {
        let latest = Latest::default();
        assert!(latest.take(Duration::from_millis(1)).is_none());
        let mut first = Snapshot::default();
        first.errors.push(ObjectError {
            origin: "a".into(),
            object: "x".into(),
            field: "f".into(),
            reason: "r".into(),
        });
        latest.publish(first);
        latest.publish(Snapshot::default());
        let taken = latest.take(Duration::from_millis(1)).expect("a snapshot");
        assert!(taken.errors.is_empty(), "the newer snapshot wins");
        assert!(latest.take(Duration::from_millis(1)).is_none());
    }
}
