//! Label identities: the label sets pod addresses have, counted, numbered
//! and retired.
//!
//! Each distinct [`IdentityLabels`] gets a slot, counted by the addresses
//! that have it; a slot gets a number when it is first used. A slot no
//! address uses any more retires: it keeps its number for one more update
//! (the kernel may still see it on addresses until that update's writes
//! are done) and is released at the next one, unless used again.

use std::{collections::BTreeSet, sync::Arc};

use lb_core::intent::ObjectError;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    labels::{digest, IdentityLabels},
    numbers::Numbers,
};

/// A label set's place in the table, stable while it is in use.
pub(super) type Slot = u32;

struct LabelSlot {
    labels: Arc<IdentityLabels>,
    /// The addresses that have it.
    refs: u32,
    number: Option<u32>,
    /// The pod that first had it, for reports.
    holder: String,
}

/// What an update changed in the numbered identities. An identity is
/// active while an address has it.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Identities numbered in this update.
    pub added: Vec<(u32, Arc<IdentityLabels>)>,
    /// Identities active again (or new) in this update.
    pub activated: Vec<(u32, Arc<IdentityLabels>)>,
    /// Identities no address has any more (retiring, or released at once
    /// when they had no number).
    pub deactivated: Vec<u32>,
    /// Identities released in this update.
    pub released: Vec<u32>,
    /// Whether a label set used before this update got its number only
    /// now (numbers had run out): its addresses change.
    pub late: bool,
}

/// The label sets in use (or retiring).
pub(super) struct Identities {
    slots: FxHashMap<Slot, LabelSlot>,
    by_labels: FxHashMap<Arc<IdentityLabels>, Slot>,
    next_slot: Slot,
    numbers: Numbers,
    /// Numbered slots, by number.
    by_number: FxHashMap<u32, Slot>,
    /// Slots no address uses.
    unused: FxHashSet<Slot>,
    /// Slots in use without a number (new, or none was left).
    unnumbered: FxHashSet<Slot>,
    /// Slots made since the last settling.
    fresh: FxHashSet<Slot>,
    /// Unused slots kept for this update, and their numbers.
    retiring: FxHashSet<Slot>,
    retiring_numbers: BTreeSet<u32>,
}

impl Identities {
    pub(super) fn new(numbers: Numbers) -> Self {
        Self {
            slots: FxHashMap::default(),
            by_labels: FxHashMap::default(),
            next_slot: 0,
            numbers,
            by_number: FxHashMap::default(),
            unused: FxHashSet::default(),
            unnumbered: FxHashSet::default(),
            fresh: FxHashSet::default(),
            retiring: FxHashSet::default(),
            retiring_numbers: BTreeSet::new(),
        }
    }

    /// Counts one more address with `labels`; returns its slot and the
    /// labels as the table shares them.
    pub(super) fn hold(
        &mut self,
        labels: Arc<IdentityLabels>,
        holder: impl FnOnce() -> String,
    ) -> (Slot, Arc<IdentityLabels>) {
        if let Some(&slot) = self.by_labels.get(&labels) {
            let entry = self.slots.get_mut(&slot).expect("slot of a label set");
            entry.refs += 1;
            if entry.refs == 1 {
                self.unused.remove(&slot);
            }
            return (slot, entry.labels.clone());
        }
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1);
        self.by_labels.insert(labels.clone(), slot);
        self.slots.insert(
            slot,
            LabelSlot {
                labels: labels.clone(),
                refs: 1,
                number: None,
                holder: holder(),
            },
        );
        self.unnumbered.insert(slot);
        self.fresh.insert(slot);
        (slot, labels)
    }

    /// Counts one address fewer with the labels of `slot`.
    pub(super) fn release(&mut self, slot: Slot) {
        let entry = self.slots.get_mut(&slot).expect("slot held");
        entry.refs -= 1;
        if entry.refs == 0 {
            self.unused.insert(slot);
        }
    }

    /// The number of a slot, if it has one.
    pub(super) fn number(&self, slot: Slot) -> Option<u32> {
        self.slots.get(&slot).and_then(|s| s.number)
    }

    /// The labels of a numbered identity.
    pub(super) fn labels(&self, number: u32) -> Option<&Arc<IdentityLabels>> {
        let slot = self.by_number.get(&number)?;
        Some(&self.slots[slot].labels)
    }

    /// Every numbered identity (retiring ones too).
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Arc<IdentityLabels>)> + '_ {
        self.by_number
            .iter()
            .map(|(number, slot)| (*number, &self.slots[slot].labels))
    }

    /// Identities no address has, kept for this update.
    pub(super) fn retiring(&self) -> &BTreeSet<u32> {
        &self.retiring_numbers
    }

    /// Ends an update's counting: releases the slots that retired in the
    /// last update and are still unused, retires the newly unused, and
    /// numbers the new. Returns what changed.
    pub(super) fn settle(&mut self, errors: &mut Vec<ObjectError>) -> Settled {
        let mut settled = Settled::default();
        let previous = std::mem::take(&mut self.retiring);
        self.retiring_numbers.clear();
        for slot in &previous {
            let entry = &self.slots[slot];
            if entry.refs > 0 {
                if let Some(number) = entry.number {
                    settled.activated.push((number, entry.labels.clone()));
                }
            }
        }
        for slot in std::mem::take(&mut self.unused) {
            let number = self.slots[&slot].number;
            if number.is_some() && !previous.contains(&slot) {
                // Kept for this update.
                self.retiring.insert(slot);
                self.retiring_numbers.extend(number);
                settled.deactivated.extend(number);
                self.unused.insert(slot);
                continue;
            }
            let entry = self.slots.remove(&slot).expect("unused slot");
            self.by_labels.remove(&entry.labels);
            self.unnumbered.remove(&slot);
            if let Some(number) = entry.number {
                self.by_number.remove(&number);
                self.numbers.free(number);
                settled.released.push(number);
            }
        }
        let mut exhausted = false;
        let mut numbered = Vec::new();
        for &slot in &self.unnumbered {
            let entry = self.slots.get_mut(&slot).expect("unnumbered slot");
            match self.numbers.number(digest(&entry.labels.canonical())) {
                Ok(number) => {
                    entry.number = Some(number);
                    self.by_number.insert(number, slot);
                    numbered.push(slot);
                    settled.late |= !self.fresh.contains(&slot);
                    settled.added.push((number, entry.labels.clone()));
                    settled.activated.push((number, entry.labels.clone()));
                }
                Err(full) => {
                    if !exhausted {
                        errors.push(ObjectError {
                            origin: "policy".into(),
                            object: entry.holder.clone(),
                            field: "metadata.labels".into(),
                            reason: format!(
                                "no identity left ({} label sets in use): the pod's \
                                 addresses count as the world for policy",
                                full.capacity
                            ),
                        });
                    }
                    exhausted = true;
                }
            }
        }
        for slot in numbered {
            self.unnumbered.remove(&slot);
        }
        self.fresh.clear();
        settled
    }
}
