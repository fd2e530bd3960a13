//! The writes that take the policy maps from what they hold to what they
//! should hold, ordered so that no packet sees a state that denies what is
//! allowed both before and after, or allows what is denied both before and
//! after (make-before-break):
//!
//! 1. identities and rule names (display only);
//! 2. each new set's entries, then its digest (a set is complete, and
//!    adoptable after a restart, only once its digest is written);
//! 3. new addresses and prefixes (a prefix inside an older one with the
//!    older one's CIDR identity for now), and addresses a new prefix covers
//!    that were the world;
//! 4. endpoints, switching to their new sets;
//! 5. the other ipcache changes (relabels: the new sets still allow the
//!    old identities for this update), and the final values of step 3;
//! 6. deletions: endpoints and addresses that left, sets no endpoint uses
//!    (digest first), rules and identities;
//! 7. one revision bump, so that every established flow is checked again
//!    against the final state on its next packet.
//!
//! Capacity is planned, not discovered: a set whose entries do not fit
//! next to what the map holds is not written, and its endpoints are written
//! fail-closed (their new flows are refused, with a drop reason) until it
//! fits. Every other endpoint is unaffected.

use smallvec::{smallvec, SmallVec};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnetwork::IpNetwork;
use lb_common::{
    maps::{MAX_ENDPOINTS, MAX_IPCACHE, MAX_POLICY_ENTRIES},
    policy::{EndpointValue, IpcacheValue, PolicyState, ENDPOINT_FAIL_CLOSED, IDENTITY_WORLD},
};

use crate::{
    desired::{Entry, IdentityInfo, PolicyLookup},
    tables::{name_kept, AppliedSet, PolicyTables, PolicyTarget},
};

/// One policy map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    /// Insert or replace an identity's digest and labels.
    PutIdentity(u32, IdentityInfo),
    /// Insert or replace a rule's name.
    PutRule(u32, String),
    /// Insert or replace an entry of a set, with its rule.
    PutEntry(u32, Entry, u32),
    /// Mark a set complete with its digest.
    PutSet(u32, [u8; 16]),
    /// Insert or replace an endpoint.
    PutEndpoint(IpAddr, EndpointValue),
    /// Insert or replace a pod's name.
    PutPodName(IpAddr, Arc<str>),
    /// Insert or replace an ipcache prefix.
    PutIpcache(IpNetwork, IpcacheValue),
    /// Write the revision and flags.
    PutState(PolicyState),
    /// Delete an endpoint.
    DeleteEndpoint(IpAddr),
    /// Delete a pod's name.
    DeletePodName(IpAddr),
    /// Delete an ipcache prefix.
    DeleteIpcache(IpNetwork),
    /// Unmark a set (its entries go next).
    DeleteSet(u32),
    /// Delete an entry of a set.
    DeleteEntry(u32, Entry),
    /// Delete a rule's name.
    DeleteRule(u32),
    /// Delete an identity.
    DeleteIdentity(u32),
}

/// Writes that stand or fall together: a set's entries and its digest (if
/// one fails the rest is skipped, and the set counts as not written), or a
/// set's deletion (skipped while an endpoint still uses the set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyGroup {
    /// The set the group writes or deletes, if any.
    pub set: Option<u32>,
    /// Whether the group deletes its set.
    pub deletes: bool,
    /// The writes, in order. Most groups are one write (a pod's address,
    /// its name), kept inline: a first plan at 150,000 pods has 300,000.
    pub ops: SmallVec<[PolicyOp; 1]>,
}

/// Map capacities the plan respects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCapacity {
    /// Policy entries, all sets together.
    pub entries: usize,
    /// ipcache prefixes.
    pub ipcache: usize,
    /// Endpoints.
    pub endpoints: usize,
}

impl Default for PolicyCapacity {
    fn default() -> Self {
        Self {
            entries: MAX_POLICY_ENTRIES as usize,
            ipcache: MAX_IPCACHE as usize,
            endpoints: MAX_ENDPOINTS as usize,
        }
    }
}

/// A plan and what it could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    /// The writes, in order.
    pub groups: Vec<PolicyGroup>,
    /// Sets that do not fit (or could not be written): not written.
    pub unfit_sets: BTreeSet<u32>,
    /// Endpoints written fail-closed, because their set is unfit.
    pub fail_closed: BTreeSet<IpAddr>,
    /// ipcache prefixes and endpoints left out for lack of room.
    pub left_out: usize,
}

impl PolicyPlan {
    /// Every write, in order.
    pub fn ops(&self) -> impl Iterator<Item = &PolicyOp> {
        self.groups.iter().flat_map(|g| &g.ops)
    }
}

/// A key of two sorted maps: in the first only, the second only, or both.
enum Side<'a, K, A, B> {
    Old(&'a K),
    New(&'a K, &'a B),
    Both(&'a K, &'a A, &'a B),
}

/// The keys of two sorted maps in order, each with where it is: one walk of
/// both (the plan of a pass that changed little costs no lookups).
fn merge<'a, K: Ord, A, B>(
    old: &'a BTreeMap<K, A>,
    new: &'a BTreeMap<K, B>,
) -> impl Iterator<Item = Side<'a, K, A, B>> {
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    std::iter::from_fn(move || match (old.peek(), new.peek()) {
        (Some((ok, _)), Some((nk, _))) => match ok.cmp(nk) {
            std::cmp::Ordering::Less => old.next().map(|(k, _)| Side::Old(k)),
            std::cmp::Ordering::Greater => new.next().map(|(k, b)| Side::New(k, b)),
            std::cmp::Ordering::Equal => {
                let (k, a) = old.next()?;
                let (_, b) = new.next()?;
                Some(Side::Both(k, a, b))
            }
        },
        (Some(_), None) => old.next().map(|(k, _)| Side::Old(k)),
        (None, Some(_)) => new.next().map(|(k, b)| Side::New(k, b)),
        (None, None) => None,
    })
}

fn single(op: PolicyOp) -> PolicyGroup {
    PolicyGroup {
        set: None,
        deletes: false,
        ops: smallvec![op],
    }
}

/// The plan from `applied` to `target` within `capacity`; sets in
/// `unwritable` (writes that failed in this pass) are treated as unfit.
pub fn plan(
    applied: &PolicyTables,
    target: &PolicyTarget,
    capacity: &PolicyCapacity,
    unwritable: &BTreeSet<u32>,
) -> PolicyPlan {
    let mut out = PolicyPlan::default();
    let mut changes_verdicts = false;

    // 1. Display data.
    let mut gone_identities = Vec::new();
    for side in merge(&applied.identities, &target.identities) {
        match side {
            Side::Old(id) => gone_identities.push(*id),
            Side::Both(_, old, new) if old.digest == new.digest => {}
            Side::New(id, info) | Side::Both(id, _, info) => out
                .groups
                .push(single(PolicyOp::PutIdentity(*id, info.clone()))),
        }
    }
    for (id, name) in &target.rules {
        if applied.rules.get(id) != Some(name) {
            out.groups
                .push(single(PolicyOp::PutRule(*id, name.clone())));
        }
    }

    // 2. New or changed sets, in number order, while they fit.
    let mut entries_used = applied.entry_count();
    for (number, content) in target.sets.iter() {
        let current = applied.sets.get(number);
        if current.and_then(|s| s.digest) == Some(content.digest) {
            continue;
        }
        let empty = AppliedSet::default();
        let current = current.unwrap_or(&empty);
        let (puts, deletes, added) = entry_changes(&current.entries, &content.entries);
        if unwritable.contains(number) || entries_used + added > capacity.entries {
            out.unfit_sets.insert(*number);
            continue;
        }
        entries_used += added;
        let mut ops = Vec::new();
        if current.digest.is_some() {
            // Changed in place (or a pass failed half-way): not complete
            // until its new digest is written.
            ops.push(PolicyOp::DeleteSet(*number));
        }
        ops.extend(
            puts.into_iter()
                .map(|(entry, rule)| PolicyOp::PutEntry(*number, entry, rule)),
        );
        ops.extend(
            deletes
                .into_iter()
                .map(|entry| PolicyOp::DeleteEntry(*number, entry)),
        );
        ops.push(PolicyOp::PutSet(*number, content.digest));
        changes_verdicts = true;
        out.groups.push(PolicyGroup {
            set: Some(*number),
            deletes: false,
            ops: ops.into(),
        });
    }

    // 3. New addresses and prefixes, and addresses a new prefix covers
    // that were the world, before any endpoint moves to a set that knows
    // their new identities: the sets in use know nothing of those, so they
    // judge the flows as before. Addresses in a new prefix inside an older
    // one keep the older CIDR identity until the endpoints have moved.
    // Step 5 and 6's ipcache writes are found in the same walk.
    let mut ipcache_used = applied.ipcache.len();
    let mut later_ipcache = Vec::new();
    let mut gone_prefixes = Vec::new();
    for side in merge(&applied.ipcache, &target.ipcache) {
        let (prefix, value, early) = match side {
            Side::Old(prefix) => {
                gone_prefixes.push(*prefix);
                continue;
            }
            Side::Both(_, current, value) if current == value => continue,
            Side::Both(prefix, current, value)
                if current.identity == value.identity
                    && current.cidr_identity == IDENTITY_WORLD =>
            {
                (prefix, value, *value)
            }
            Side::Both(prefix, _, value) => {
                later_ipcache.push((*prefix, *value));
                changes_verdicts = true;
                continue;
            }
            Side::New(_, _) if ipcache_used >= capacity.ipcache => {
                out.left_out += 1;
                continue;
            }
            Side::New(prefix, value) if value.identity == value.cidr_identity => {
                let covering = applied.identities(prefix.network()).cidr_identity;
                let transitional = IpcacheValue {
                    identity: value.identity,
                    cidr_identity: covering,
                };
                (prefix, value, transitional)
            }
            Side::New(prefix, value) => (prefix, value, *value),
        };
        if !applied.ipcache.contains_key(prefix) {
            ipcache_used += 1;
        }
        changes_verdicts = true;
        if early != *value {
            later_ipcache.push((*prefix, *value));
        }
        out.groups
            .push(single(PolicyOp::PutIpcache(*prefix, early)));
    }

    // 4. Endpoints, fail-closed where their set is unfit.
    let mut endpoints_used = applied.endpoints.len();
    for (ip, value) in &target.endpoints {
        let mut value = *value;
        if out.unfit_sets.contains(&value.set) {
            value.flags |= ENDPOINT_FAIL_CLOSED;
            value.set = 0;
            out.fail_closed.insert(*ip);
        }
        let present = applied.endpoints.get(ip);
        if present.is_none() {
            if endpoints_used >= capacity.endpoints {
                out.left_out += 1;
                continue;
            }
            endpoints_used += 1;
        }
        if present != Some(&value) {
            out.groups.push(single(PolicyOp::PutEndpoint(*ip, value)));
            changes_verdicts = true;
        }
    }
    let mut names_used = applied.pod_names.len();
    let mut gone_names = Vec::new();
    for side in merge(&applied.pod_names, &target.pod_names) {
        let (ip, name) = match side {
            Side::Old(ip) => {
                gone_names.push(*ip);
                continue;
            }
            Side::Both(ip, current, name) => {
                if **current == *name_kept(name) {
                    continue;
                }
                (ip, name)
            }
            // Names are for display: one left out is not worth a retry.
            Side::New(_, _) if names_used >= capacity.ipcache => continue,
            Side::New(ip, name) => {
                names_used += 1;
                (ip, name)
            }
        };
        // The desired state's name is shared with the mirror of the maps
        // unless the map keeps only part of it.
        let kept = name_kept(name);
        let name = if kept.len() == name.len() {
            name.clone()
        } else {
            Arc::from(kept)
        };
        out.groups.push(single(PolicyOp::PutPodName(*ip, name)));
    }

    // 5. The other ipcache changes (relabels, whose old identities the
    // new sets still allow for this update), and the final values of what
    // step 3 wrote for the transition.
    for (prefix, value) in later_ipcache {
        out.groups.push(single(PolicyOp::PutIpcache(prefix, value)));
    }

    // 6. Deletions.
    for ip in applied.endpoints.keys() {
        if !target.endpoints.contains_key(ip) {
            out.groups.push(single(PolicyOp::DeleteEndpoint(*ip)));
            changes_verdicts = true;
        }
    }
    for ip in gone_names {
        out.groups.push(single(PolicyOp::DeletePodName(ip)));
    }
    for prefix in gone_prefixes {
        out.groups.push(single(PolicyOp::DeleteIpcache(prefix)));
        changes_verdicts = true;
    }
    // (The executor keeps a set an endpoint still uses, if its move failed.)
    for (number, set) in &applied.sets {
        if target.sets.contains_key(number) && !out.unfit_sets.contains(number) {
            continue;
        }
        let mut ops = Vec::new();
        if set.digest.is_some() {
            ops.push(PolicyOp::DeleteSet(*number));
        }
        ops.extend(
            set.entries
                .keys()
                .map(|entry| PolicyOp::DeleteEntry(*number, *entry)),
        );
        out.groups.push(PolicyGroup {
            set: Some(*number),
            deletes: true,
            ops: ops.into(),
        });
    }
    for id in applied.rules.keys() {
        if !target.rules.contains_key(id) {
            out.groups.push(single(PolicyOp::DeleteRule(*id)));
        }
    }
    for id in gone_identities {
        out.groups.push(single(PolicyOp::DeleteIdentity(id)));
    }

    // 7. The revision.
    let flags = target.state_flags();
    if changes_verdicts || applied.state.flags != flags {
        out.groups.push(single(PolicyOp::PutState(PolicyState {
            revision: applied.state.revision.wrapping_add(1),
            flags,
        })));
    }
    out
}

/// The entries to put (new, or with another rule) and to delete to take a
/// set from `current` to `wanted`, each in order, and how many are new:
/// one walk over both (a changed set is often large and changed little).
fn entry_changes(
    current: &BTreeMap<Entry, u32>,
    wanted: &BTreeMap<Entry, u32>,
) -> (Vec<(Entry, u32)>, Vec<Entry>, usize) {
    let (mut puts, mut deletes, mut added) = (Vec::new(), Vec::new(), 0);
    let mut have = current.iter().peekable();
    for (entry, rule) in wanted {
        while let Some((old, _)) = have.next_if(|(old, _)| *old < entry) {
            deletes.push(*old);
        }
        match have.next_if(|(old, _)| *old == entry) {
            Some((_, old_rule)) if old_rule == rule => {}
            Some(_) => puts.push((*entry, *rule)),
            None => {
                puts.push((*entry, *rule));
                added += 1;
            }
        }
    }
    deletes.extend(have.map(|(old, _)| *old));
    (puts, deletes, added)
}

impl PolicyTables {
    /// Records a write that succeeded.
    pub fn apply(&mut self, op: &PolicyOp) {
        match op {
            PolicyOp::PutIdentity(id, info) => {
                self.identities.insert(*id, info.clone());
            }
            PolicyOp::PutRule(id, name) => {
                self.rules.insert(*id, name.clone());
            }
            PolicyOp::PutEntry(set, entry, rule) => {
                self.sets
                    .entry(*set)
                    .or_default()
                    .entries
                    .insert(*entry, *rule);
            }
            PolicyOp::PutSet(set, digest) => {
                self.sets.entry(*set).or_default().digest = Some(*digest);
            }
            PolicyOp::PutEndpoint(ip, value) => {
                self.endpoints.insert(*ip, *value);
            }
            PolicyOp::PutPodName(ip, name) => {
                self.pod_names.insert(*ip, name.clone());
            }
            PolicyOp::PutIpcache(prefix, value) => {
                self.ipcache.insert(*prefix, *value);
            }
            PolicyOp::PutState(state) => self.state = *state,
            PolicyOp::DeleteEndpoint(ip) => {
                self.endpoints.remove(ip);
            }
            PolicyOp::DeletePodName(ip) => {
                self.pod_names.remove(ip);
            }
            PolicyOp::DeleteIpcache(prefix) => {
                self.ipcache.remove(prefix);
            }
            PolicyOp::DeleteSet(set) => {
                if let Some(set) = self.sets.get_mut(set) {
                    set.digest = None;
                }
            }
            PolicyOp::DeleteEntry(set, entry) => {
                if let Some(applied) = self.sets.get_mut(set) {
                    applied.entries.remove(entry);
                    if applied.entries.is_empty() && applied.digest.is_none() {
                        self.sets.remove(set);
                    }
                }
            }
            PolicyOp::DeleteRule(id) => {
                self.rules.remove(id);
            }
            PolicyOp::DeleteIdentity(id) => {
                self.identities.remove(id);
            }
        }
    }

    /// The complete sets (digest written) and their digests: what a
    /// restarted agent adopts.
    pub fn complete_sets(&self) -> BTreeMap<u32, [u8; 16]> {
        self.sets
            .iter()
            .filter_map(|(n, s)| Some((*n, s.digest?)))
            .collect()
    }
}

#[cfg(test)]
mod tests;
