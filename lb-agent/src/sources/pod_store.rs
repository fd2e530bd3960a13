//! The Pods the agent keeps, fed by a watch. Each decoded Pod becomes its
//! compact record ([`Pod`]) as it arrives and the decoded object is dropped
//! at once: kube-rs's reflector store keeps a clone of every decoded object
//! and a key of four strings per object, which at 150,000 Pods was most of
//! the agent's memory. A Pod whose kept fields did not change (most Pod
//! updates are status conditions) keeps its record, so nothing downstream
//! sees a change.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
};

use hashbrown::HashTable;
use kube::runtime::watcher::Event;
use lb_core::pod::{Pod, PodInfo, PodInterner};
use tokio::sync::watch;

/// The kept Pods, shared by the watch that fills them and the loop that
/// publishes snapshots.
pub(super) struct PodStore {
    state: Mutex<State>,
    listed: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Each Pod, found by its namespace and name, which it holds itself:
    /// a separate key would cost another 32 bytes a Pod.
    pods: HashTable<Kept>,
    hasher: RandomState,
    /// Counts the watch's (re)listings.
    listing: u64,
    interner: PodInterner,
}

impl PodStore {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::default(),
            listed: watch::Sender::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map: every
        // change below is a single insert or remove.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes one watch event; returns whether the kept Pods changed.
    ///
    /// A relisting replaces Pods in place and removes those it did not list
    /// only when it is complete, so a snapshot taken meanwhile never lacks
    /// a Pod that still exists, and the store never holds two copies.
    pub(super) fn apply(&self, event: Event<PodInfo>) -> bool {
        let mut state = self.state();
        match event {
            Event::Init => {
                state.listing += 1;
                false
            }
            Event::InitApply(info) | Event::Apply(info) => state.put(info),
            Event::Delete(info) => {
                let (namespace, name) = info.names();
                let hash = hash_of(&state.hasher, namespace, name);
                let found = state.pods.find_entry(hash, |kept| kept.is(namespace, name));
                found.map(|entry| entry.remove()).is_ok()
            }
            Event::InitDone => {
                let listing = state.listing;
                let before = state.pods.len();
                state.pods.retain(|kept| kept.listing == listing);
                self.listed.send_replace(true);
                state.pods.len() != before
            }
        }
    }

    /// The kept Pods.
    pub(super) fn pods(&self) -> Vec<Arc<Pod>> {
        let state = self.state();
        state.pods.iter().map(|kept| kept.pod.clone()).collect()
    }

    /// Resolves once the first listing is complete; fails if the watch
    /// ended before.
    pub(super) async fn wait_until_listed(&self) -> Result<(), watch::error::RecvError> {
        self.listed
            .subscribe()
            .wait_for(|listed| *listed)
            .await
            .map(drop)
    }

    #[cfg(test)]
    fn interned(&self) -> usize {
        self.state().interner.len()
    }
}

/// A kept Pod, with the listing that last saw it.
struct Kept {
    pod: Arc<Pod>,
    listing: u64,
}

impl Kept {
    /// Whether this is the record of the Pod `name` of `namespace`.
    fn is(&self, namespace: &str, name: &str) -> bool {
        *self.pod.namespace == *namespace && *self.pod.name == *name
    }
}

impl State {
    /// Keeps `info`; an unchanged Pod keeps its record.
    fn put(&mut self, info: PodInfo) -> bool {
        let pod = Pod::keep(info, &mut self.interner);
        let listing = self.listing;
        let hash = hash_of(&self.hasher, &pod.namespace, &pod.name);
        match self
            .pods
            .find_mut(hash, |kept| kept.is(&pod.namespace, &pod.name))
        {
            Some(kept) if *kept.pod == pod => {
                kept.listing = listing;
                false
            }
            Some(kept) => {
                (kept.pod, kept.listing) = (Arc::new(pod), listing);
                true
            }
            None => {
                let kept = Kept {
                    pod: Arc::new(pod),
                    listing,
                };
                let hasher = &self.hasher;
                self.pods.insert_unique(hash, kept, |kept| {
                    hash_of(hasher, &kept.pod.namespace, &kept.pod.name)
                });
                true
            }
        }
    }
}

fn hash_of(hasher: &RandomState, namespace: &str, name: &str) -> u64 {
    hasher.hash_one((namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, app: &str, ip: &str) -> PodInfo {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app},
                         "resourceVersion": ip},
            "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    fn names(store: &PodStore) -> Vec<String> {
        let mut names: Vec<String> = store.pods().iter().map(|p| p.name.to_string()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_listing_fills_the_store_and_marks_it_listed() {
        let store = PodStore::new();
        assert!(!store.apply(Event::Init));
        assert!(store.apply(Event::InitApply(info("a", "web", "10.0.0.1"))));
        assert!(store.apply(Event::InitApply(info("b", "web", "10.0.0.2"))));
        assert!(!*store.listed.borrow());
        assert!(!store.apply(Event::InitDone), "nothing was left unlisted");
        store.wait_until_listed().await.unwrap();
        assert_eq!(names(&store), ["a", "b"]);
        let pods = store.pods();
        assert!(Arc::ptr_eq(&pods[0].labels, &pods[1].labels));
    }

    #[test]
    fn an_update_that_changes_nothing_kept_keeps_the_record() {
        let store = PodStore::new();
        store.apply(Event::Init);
        store.apply(Event::InitApply(info("a", "web", "10.0.0.1")));
        store.apply(Event::InitDone);
        let before = store.pods()[0].clone();
        let mut same = info("a", "web", "10.0.0.1");
        same.metadata.resource_version = Some("2".into());
        assert!(!store.apply(Event::Apply(same)));
        assert!(Arc::ptr_eq(&before, &store.pods()[0]));
        assert!(store.apply(Event::Apply(info("a", "db", "10.0.0.1"))));
        assert_eq!(store.pods()[0].labels["app"], "db");
        assert!(store.apply(Event::Delete(info("a", "db", "10.0.0.1"))));
        assert!(store.pods().is_empty());
        assert!(!store.apply(Event::Delete(info("a", "db", "10.0.0.1"))));
    }

    #[test]
    fn a_relisting_keeps_every_pod_until_it_is_complete_then_drops_the_unlisted() {
        let store = PodStore::new();
        store.apply(Event::Init);
        for name in ["a", "b", "c"] {
            store.apply(Event::InitApply(info(name, "web", "10.0.0.1")));
        }
        store.apply(Event::InitDone);
        let kept_a = store.pods().into_iter().find(|p| &*p.name == "a").unwrap();
        store.apply(Event::Init);
        assert!(!store.apply(Event::InitApply(info("a", "web", "10.0.0.1"))));
        store.apply(Event::InitApply(info("d", "web", "10.0.0.4")));
        assert_eq!(
            names(&store),
            ["a", "b", "c", "d"],
            "nothing goes mid-listing"
        );
        assert!(store.apply(Event::InitDone));
        assert_eq!(names(&store), ["a", "d"]);
        let a = store.pods().into_iter().find(|p| &*p.name == "a").unwrap();
        assert!(
            Arc::ptr_eq(&kept_a, &a),
            "an unchanged Pod keeps its record"
        );
    }

    #[test]
    fn label_sets_no_pod_holds_are_forgotten() {
        let store = PodStore::new();
        store.apply(Event::Init);
        store.apply(Event::InitDone);
        for i in 0..5_000 {
            let app = format!("app-{i}");
            store.apply(Event::Apply(info("churn", &app, "10.0.0.9")));
        }
        assert_eq!(store.pods().len(), 1);
        assert!(store.interned() < 1_100, "{} held", store.interned());
    }
}
