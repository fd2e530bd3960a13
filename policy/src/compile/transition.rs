//! The sets of the update in which addresses change identities.
//!
//! The writes of an update move each endpoint to its new set first and
//! each moved address to its new identities after (the plan's order), so
//! for a while new sets judge old identities. An address that moves from
//! `(label O, CIDR Y)` to `(N, X)` must meanwhile keep its verdict whenever
//! it is the same before and after. The sets of that update (followed by
//! one more update that writes the final sets) therefore judge each
//! identity some moving address had or gets, per endpoint and direction:
//!
//! - as the endpoint's old set did, when an address left the identity and
//!   none came to it: the movers keep what they had, and whoever keeps the
//!   identity keeps its old verdicts for one more update;
//! - as the final set does, when no address left the identity;
//! - and in any case as both do (the intersection).
//!
//! None of the three allows a flow that is denied before and after: a
//! flow's old identities are judged at most as the old set did, its new
//! ones at most as the final set does. An identity that addresses both
//! leave and come to can only be judged by the intersection: a flow of
//! such an address allowed only by its old judgement or only by its new
//! may drop until the address's ipcache entry is rewritten.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use lb_common::policy::{
    IpcacheValue, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED,
    ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_WORLD,
};
use rustc_hash::FxHashMap;

use crate::desired::{Entry, SetContent, L4};

/// How the addresses of an identity move in one update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Moves {
    /// A moving address had it before.
    held_before: bool,
    /// A moving address has it after.
    held_after: bool,
    /// An address had it and no longer has.
    left: bool,
    /// An address has it and did not have it.
    entered: bool,
}

/// The identities moving addresses had or get in one update.
#[derive(Clone, Debug, Default)]
pub(super) struct Movement {
    identities: FxHashMap<u32, Moves>,
}

/// The identities of a value, each once.
fn parts(value: IpcacheValue) -> impl Iterator<Item = u32> {
    let second = (value.cidr_identity != value.identity).then_some(value.cidr_identity);
    std::iter::once(value.identity).chain(second)
}

/// The identities of a range no ipcache prefix covers.
pub(super) const WORLD: IpcacheValue = IpcacheValue {
    identity: IDENTITY_WORLD,
    cidr_identity: IDENTITY_WORLD,
};

/// Whether an ipcache entry stands for a policy CIDR (not an address).
fn is_cidr(value: &IpcacheValue) -> bool {
    value.identity >= IDENTITY_FIRST_CIDR && value.identity == value.cidr_identity
}

impl Movement {
    /// The movement of an update from the ipcache entries it changed, each
    /// with its value before and after: addresses whose identities change,
    /// and ranges of CIDRs that come or go (`covering_before` and
    /// `covering_after` give the value of the longest CIDR entry strictly
    /// holding a prefix, before and after). Addresses that come or go are
    /// pods that start or end: they had no flows.
    pub(super) fn from_changes<'a>(
        changes: impl Iterator<Item = (&'a IpNetwork, Option<IpcacheValue>, Option<IpcacheValue>)>,
        covering_before: impl Fn(&IpNetwork) -> IpcacheValue,
        covering_after: impl Fn(&IpNetwork) -> IpcacheValue,
    ) -> Self {
        let mut movement = Movement::default();
        for (prefix, before, after) in changes {
            match (before, after) {
                (Some(before), Some(after)) if before != after => movement.add(before, after),
                (None, Some(after)) if is_cidr(&after) => {
                    movement.add(covering_before(prefix), after)
                }
                (Some(before), None) if is_cidr(&before) => {
                    movement.add(before, covering_after(prefix))
                }
                _ => {}
            }
        }
        movement
    }

    /// Records an address (or range) moving from `before` to `after`.
    fn add(&mut self, before: IpcacheValue, after: IpcacheValue) {
        for id in parts(before) {
            let moves = self.identities.entry(id).or_default();
            moves.held_before = true;
            if !parts(after).any(|a| a == id) {
                moves.left = true;
            }
        }
        for id in parts(after) {
            let moves = self.identities.entry(id).or_default();
            moves.held_after = true;
            if !parts(before).any(|b| b == id) {
                moves.entered = true;
            }
        }
    }

    /// Whether no address moves.
    pub(super) fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// What [`Movement::entries`] needs of an old set: its entries for the
    /// identities that move and for any peer.
    pub(super) fn relevant(&self, set: &SetContent) -> SetContent {
        let mut entries = BTreeMap::new();
        for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
            for id in self.identities.keys().chain(&[IDENTITY_ANY]) {
                entries.extend(of(&set.entries, direction, *id).map(|(e, r)| (*e, *r)));
            }
        }
        SetContent {
            entries,
            digest: set.digest,
        }
    }

    /// The entries of an endpoint's set for this update: `fin`, its final
    /// entries, with the identities that move judged as the module says;
    /// `None` when that is `fin` itself. `old` is what the endpoint held
    /// before (`None`: it is new, and has no flows to keep), `flags` its
    /// isolation now; entries kept from the old set keep their rule where
    /// `known` knows it still, and get rule `rule` otherwise.
    pub(super) fn entries(
        &self,
        fin: &BTreeMap<Entry, u32>,
        old: Option<(Option<&SetContent>, u32)>,
        flags: u32,
        rule: u32,
        known: impl Fn(u32) -> bool,
    ) -> Option<BTreeMap<Entry, u32>> {
        let (old_set, old_flags) = old?;
        let mut entries: Option<BTreeMap<Entry, u32>> = None;
        for (direction, bit) in [
            (DIRECTION_INGRESS, ENDPOINT_INGRESS_ISOLATED),
            (DIRECTION_EGRESS, ENDPOINT_EGRESS_ISOLATED),
        ] {
            if flags & bit == 0 {
                continue;
            }
            // The old judgement of an identity: everything when the
            // endpoint was not isolated, else its entries and the
            // wildcard's.
            let old_of = |id: u32| -> Vec<(L4, u32)> {
                if old_flags & bit == 0 {
                    return vec![(L4::Any, rule)];
                }
                let Some(set) = old_set else {
                    return Vec::new();
                };
                let kept = |(e, r): (&Entry, &u32)| (e.l4, if known(*r) { *r } else { rule });
                let mut l4s: Vec<(L4, u32)> = of(&set.entries, direction, id).map(kept).collect();
                if id != IDENTITY_ANY {
                    l4s.extend(of(&set.entries, direction, IDENTITY_ANY).map(kept));
                }
                l4s
            };
            for (&id, moves) in &self.identities {
                let before = old_of(id);
                let after: Vec<(L4, u32)> =
                    of(fin, direction, id).map(|(e, r)| (e.l4, *r)).collect();
                let mut judged: BTreeMap<L4, u32> = BTreeMap::new();
                for (a, _) in &before {
                    for (b, r) in &after {
                        if let Some(both) = intersection(a, b) {
                            judged.entry(both).or_insert(*r);
                        }
                    }
                }
                if moves.held_before && !moves.entered {
                    for (a, r) in &before {
                        judged.entry(*a).or_insert(*r);
                    }
                }
                if !moves.left {
                    for (b, r) in &after {
                        judged.insert(*b, *r);
                    }
                }
                if judged
                    .iter()
                    .map(|(l4, r)| (*l4, *r))
                    .eq(after.iter().copied())
                {
                    continue;
                }
                let entries = entries.get_or_insert_with(|| fin.clone());
                let key = |l4| Entry {
                    direction,
                    identity: id,
                    l4,
                };
                for (l4, _) in &after {
                    entries.remove(&key(*l4));
                }
                entries.extend(judged.into_iter().map(|(l4, r)| (key(l4), r)));
            }
        }
        entries
    }
}

/// The entries of `entries` for `identity` in `direction`.
pub(super) fn of(
    entries: &BTreeMap<Entry, u32>,
    direction: u8,
    identity: u32,
) -> impl Iterator<Item = (&Entry, &u32)> {
    let first = Entry {
        direction,
        identity,
        l4: L4::Any,
    };
    let last = Entry {
        direction,
        identity,
        l4: L4::Ports {
            proto: u8::MAX,
            port: u16::MAX,
            prefix: u8::MAX,
        },
    };
    entries.range(first..=last)
}

/// Whether `outer` matches every packet `inner` matches.
fn covers(outer: &L4, inner: &L4) -> bool {
    match (*outer, *inner) {
        (L4::Any, _) => true,
        (L4::Proto(p), L4::Proto(q)) => p == q,
        (L4::Proto(p), L4::Ports { proto, .. }) => p == proto,
        (
            L4::Ports {
                proto: p,
                port: a,
                prefix: m,
            },
            L4::Ports {
                proto: q,
                port: b,
                prefix: n,
            },
        ) => {
            let mask = if m == 0 { 0 } else { u16::MAX << (16 - m) };
            p == q && m <= n && a & mask == b & mask
        }
        _ => false,
    }
}

/// What both match (trie nodes either nest or are disjoint).
fn intersection(a: &L4, b: &L4) -> Option<L4> {
    if covers(a, b) {
        Some(*b)
    } else if covers(b, a) {
        Some(*a)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the longest CIDR entry of `ipcache` strictly holding
    /// `prefix`.
    fn covering(ipcache: &BTreeMap<IpNetwork, IpcacheValue>, prefix: &IpNetwork) -> IpcacheValue {
        ipcache
            .iter()
            .filter(|(p, v)| {
                is_cidr(v)
                    && p.is_ipv4() == prefix.is_ipv4()
                    && p.prefix() < prefix.prefix()
                    && p.contains(prefix.network())
            })
            .max_by_key(|(p, _)| p.prefix())
            .map_or(WORLD, |(_, v)| *v)
    }

    impl Movement {
        fn between(
            old: &BTreeMap<IpNetwork, IpcacheValue>,
            new: &BTreeMap<IpNetwork, IpcacheValue>,
        ) -> Self {
            let keys: std::collections::BTreeSet<&IpNetwork> =
                old.keys().chain(new.keys()).collect();
            Movement::from_changes(
                keys.into_iter()
                    .map(|k| (k, old.get(k).copied(), new.get(k).copied())),
                |p| covering(old, p),
                |p| covering(new, p),
            )
        }
    }

    const TCP: u8 = 6;

    fn value(identity: u32, cidr_identity: u32) -> IpcacheValue {
        IpcacheValue {
            identity,
            cidr_identity,
        }
    }

    fn entry(identity: u32, l4: L4) -> Entry {
        Entry {
            direction: DIRECTION_INGRESS,
            identity,
            l4,
        }
    }

    #[test]
    fn trie_nodes_nest_or_are_disjoint() {
        let port = |port, prefix| L4::Ports {
            proto: TCP,
            port,
            prefix,
        };
        assert_eq!(intersection(&L4::Any, &port(80, 16)), Some(port(80, 16)));
        assert_eq!(
            intersection(&port(80, 12), &L4::Proto(TCP)),
            Some(port(80, 12))
        );
        assert_eq!(
            intersection(&port(5000, 13), &port(5007, 16)),
            Some(port(5007, 16))
        );
        assert_eq!(intersection(&port(5000, 13), &port(5008, 16)), None);
        assert_eq!(intersection(&L4::Proto(17), &port(53, 16)), None);
    }

    #[test]
    fn a_relabeled_peer_keeps_its_old_verdicts_where_it_left_and_nobody_came() {
        // 10.0.0.9 moves from identity 300 to 301; 302 stays.
        let ip = |text: &str| text.parse::<IpNetwork>().unwrap();
        let old = BTreeMap::from([
            (ip("10.0.0.9/32"), value(300, IDENTITY_WORLD)),
            (ip("10.0.0.8/32"), value(302, IDENTITY_WORLD)),
        ]);
        let mut new = old.clone();
        new.insert(ip("10.0.0.9/32"), value(301, IDENTITY_WORLD));
        let movement = Movement::between(&old, &new);
        // The endpoint was not isolated; now it allows 301 on TCP.
        let fin = BTreeMap::from([(entry(301, L4::Proto(TCP)), 7)]);
        let entries = movement
            .entries(&fin, Some((None, 0)), ENDPOINT_INGRESS_ISOLATED, 99, |_| {
                true
            })
            .unwrap();
        // 300 is judged as before (everything), 301 as after, and the
        // world, which the address keeps, as before too.
        assert_eq!(
            entries,
            BTreeMap::from([
                (entry(IDENTITY_WORLD, L4::Any), 99),
                (entry(300, L4::Any), 99),
                (entry(301, L4::Proto(TCP)), 7),
            ])
        );
        // A new endpoint has nothing to keep.
        assert_eq!(
            movement.entries(&fin, None, ENDPOINT_INGRESS_ISOLATED, 99, |_| true),
            None
        );
    }

    #[test]
    fn an_identity_left_and_entered_is_judged_by_both_sets_at_once() {
        let ip = |text: &str| text.parse::<IpNetwork>().unwrap();
        // Two addresses swap identities 300 and 301.
        let old = BTreeMap::from([
            (ip("10.0.0.1/32"), value(300, IDENTITY_WORLD)),
            (ip("10.0.0.2/32"), value(301, IDENTITY_WORLD)),
        ]);
        let new = BTreeMap::from([
            (ip("10.0.0.1/32"), value(301, IDENTITY_WORLD)),
            (ip("10.0.0.2/32"), value(300, IDENTITY_WORLD)),
        ]);
        let movement = Movement::between(&old, &new);
        let tcp80 = L4::Ports {
            proto: TCP,
            port: 80,
            prefix: 16,
        };
        let old_set = SetContent {
            entries: BTreeMap::from([(entry(300, L4::Proto(TCP)), 1)]),
            digest: [0; 16],
        };
        let fin = BTreeMap::from([(entry(300, tcp80), 2), (entry(301, L4::Any), 3)]);
        let entries = movement.entries(
            &fin,
            Some((Some(&old_set), ENDPOINT_INGRESS_ISOLATED)),
            ENDPOINT_INGRESS_ISOLATED,
            99,
            |_| true,
        );
        assert_eq!(entries, Some(BTreeMap::from([(entry(300, tcp80), 2)])));
    }

    #[test]
    fn a_new_cidr_moves_its_range_off_the_covering_one() {
        let ip = |text: &str| text.parse::<IpNetwork>().unwrap();
        let (wide, narrow) = (IDENTITY_FIRST_CIDR, IDENTITY_FIRST_CIDR + 1);
        let old = BTreeMap::from([(ip("10.0.0.0/8"), value(wide, wide))]);
        let mut new = old.clone();
        new.insert(ip("10.1.0.0/16"), value(narrow, narrow));
        let movement = Movement::between(&old, &new);
        assert_eq!(
            movement.identities[&wide],
            Moves {
                held_before: true,
                held_after: false,
                left: true,
                entered: false
            }
        );
        assert!(movement.identities[&narrow].entered);
        // And a CIDR that goes hands its range to the covering one.
        let movement = Movement::between(&new, &old);
        assert!(movement.identities[&narrow].left);
        assert!(movement.identities[&wide].entered);
    }
}
