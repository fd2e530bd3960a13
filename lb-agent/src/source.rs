//! Sources of intent hand whole snapshots of objects to the agent through a
//! one-slot mailbox: a newer snapshot replaces an unread older one, so the
//! queue is bounded and the agent always works on the latest state.

use std::{
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Duration,
};

use crate::{
    model::{ObjectError, Objects},
    yaml,
};

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

/// Polls a manifest directory and publishes a snapshot whenever a file
/// changes. A directory that cannot be read publishes nothing: the datapath
/// keeps its last state.
pub fn watch_manifests(dir: PathBuf, period: Duration, out: Arc<Latest>) {
    thread::spawn(move || {
        let mut last_seen: Option<yaml::Fingerprint> = None;
        loop {
            match yaml::fingerprint(&dir) {
                Ok(fingerprint) if last_seen.as_ref() != Some(&fingerprint) => {
                    match yaml::read_dir(&dir) {
                        Ok(parsed) => {
                            out.publish(Snapshot {
                                objects: parsed.objects,
                                errors: parsed.errors,
                            });
                            last_seen = Some(fingerprint);
                        }
                        Err(err) => log::error!(
                            "reading {}: {err}; keeping the current state",
                            dir.display()
                        ),
                    }
                }
                Ok(_) => {}
                Err(err) => log::error!(
                    "reading {}: {err}; keeping the current state",
                    dir.display()
                ),
            }
            thread::sleep(period);
        }
    });
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
