//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), sans-IO and
//! deterministic.
//!
//! Every node computes the lookup table of a service in user space and the tc
//! datapath picks `table[flow_hash % M]`. For a flow to reach the same backend
//! whichever node it enters, every node must build the *identical* table from
//! the same backend set. This module therefore:
//!
//! - only accepts table sizes `M` from the fixed list of primes
//!   [`TABLE_SIZES`] (default [`DEFAULT_TABLE_SIZE`]); [`table_size_for`]
//!   picks the smallest one with `M >= 100 * N`;
//! - orders backends by the bytes of their key (e.g. address and port in
//!   network byte order), never by input order, so any permutation of the same
//!   set gives the same table;
//! - derives each backend's permutation (offset and skip) from two hashes of
//!   `(seed, key)` computed with a fixed, documented hash ([`key_hash`]:
//!   64-bit FNV-1a followed by the MurmurHash3 `fmix64` finalizer), never with
//!   std's randomly keyed `RandomState`. The seed is configuration and must be
//!   the same on every node.
//!
//! Table entries are `u32` indices into the backend list *sorted by key bytes*
//! ([`sorted_backends`] returns that order), including backends of weight 0,
//! which keep their index but never appear in the table (useful for draining
//! backends that must stay addressable).
//!
//! Weights follow the weighted variant used by Katran: population proceeds in
//! rounds, in each round every backend adds its weight to a credit and places
//! one entry when the credit reaches the largest weight. The backends with the
//! largest weight place one entry per round, a backend of weight `w` places
//! `w / max_weight` per round on average, so it ends with about
//! `w / sum(weights)` of the table. With equal weights this is exactly the
//! original Maglev population loop, and every backend gets `floor(M/N)` or
//! `ceil(M/N)` entries.
//!
//! Changing the hash, the ordering or the population loop changes every table
//! and would move flows between backends while nodes run different agent
//! versions; the `golden_*` unit tests pin the current behaviour.

use thiserror::Error;

/// The table sizes accepted by [`build_table`]: primes, so that every skip in
/// `1..M` generates a full permutation of the slots.
pub const TABLE_SIZES: [usize; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65537, 131071,
];

/// The default table size (Cilium's default).
pub const DEFAULT_TABLE_SIZE: usize = 16381;

/// Marks an unfilled slot while the table is being populated.
const EMPTY: u32 = u32::MAX;

/// Errors from building or comparing Maglev tables.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    /// The requested table size is not one of [`TABLE_SIZES`].
    #[error("Maglev table size {size} is not one of the supported primes {TABLE_SIZES:?}")]
    InvalidTableSize {
        /// The rejected size.
        size: usize,
    },
    /// The backend list is empty or every backend has weight 0; there is no
    /// table to build (the caller should treat the service as having no
    /// endpoints).
    #[error("no backend with a non-zero weight")]
    NoBackends,
    /// More backends with a non-zero weight than table slots (or more backends
    /// than a `u32` table entry can index).
    #[error("{backends} backends do not fit in a Maglev table of {size} slots")]
    TooManyBackends {
        /// Number of backends given.
        backends: usize,
        /// The table size.
        size: usize,
    },
    /// Two backends have the same key bytes, so no order between them is
    /// stable across nodes.
    #[error("backend key at input index {index} is a duplicate")]
    DuplicateKey {
        /// Input index of one of the duplicates.
        index: usize,
    },
    /// Two tables compared with [`changed_fraction`] have different sizes.
    #[error("tables have different sizes ({old} and {new})")]
    LengthMismatch {
        /// Size of the old table.
        old: usize,
        /// Size of the new table.
        new: usize,
    },
    /// A table entry does not index into the backend (or key/weight) list
    /// given with it.
    #[error("table entry {entry} is out of range for {backends} backends")]
    EntryOutOfRange {
        /// The offending entry.
        entry: u32,
        /// Length of the list it should index into.
        backends: usize,
    },
}

/// One backend as seen by Maglev.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaglevBackend<K> {
    /// Stable identity of the backend, identical on every node, e.g. its
    /// address and port in network byte order. Backends are ordered and
    /// hashed by these bytes.
    pub key: K,
    /// Relative weight; 0 excludes the backend from the table while keeping
    /// its index in the sorted backend list.
    pub weight: u32,
}

impl<K> MaglevBackend<K> {
    /// A backend with the given key and weight.
    pub fn new(key: K, weight: u32) -> Self {
        Self { key, weight }
    }
}

/// Checks that `size` is one of [`TABLE_SIZES`].
pub fn check_table_size(size: usize) -> Result<(), MaglevError> {
    if TABLE_SIZES.contains(&size) {
        Ok(())
    } else {
        Err(MaglevError::InvalidTableSize { size })
    }
}

/// The smallest size in [`TABLE_SIZES`] that is at least `100 * backends`,
/// or the largest listed size when none is big enough.
pub fn table_size_for(backends: usize) -> usize {
    let wanted = backends.saturating_mul(100);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| m >= wanted)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over `bytes`, continuing from `state`.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finalizer: spreads FNV's weak low bits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash used to derive a backend's permutation:
/// `fmix64(FNV-1a-64(seed as 8 little-endian bytes || domain || key))`.
///
/// Domain 0 gives the offset, domain 1 the skip. Stable across platforms and
/// versions; every node must use the same function.
pub fn key_hash(seed: u64, domain: u8, key: &[u8]) -> u64 {
    let mut h = fnv1a(FNV_OFFSET_BASIS, &seed.to_le_bytes());
    h = fnv1a(h, &[domain]);
    h = fnv1a(h, key);
    fmix64(h)
}

/// Indices of `backends` sorted by key bytes; rejects duplicate keys.
fn sorted_order<K: AsRef<[u8]>>(backends: &[MaglevBackend<K>]) -> Result<Vec<usize>, MaglevError> {
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_unstable_by(|&a, &b| backends[a].key.as_ref().cmp(backends[b].key.as_ref()));
    for pair in order.windows(2) {
        if backends[pair[0]].key.as_ref() == backends[pair[1]].key.as_ref() {
            return Err(MaglevError::DuplicateKey {
                index: pair[0].max(pair[1]),
            });
        }
    }
    Ok(order)
}

/// The backends in the order the entries of [`build_table`] refer to: sorted
/// by key bytes, weight-0 backends included. Entry `i` of a table means
/// `sorted_backends(backends)[i]`.
pub fn sorted_backends<K: AsRef<[u8]>>(backends: &[MaglevBackend<K>]) -> Vec<&MaglevBackend<K>> {
    let mut sorted: Vec<&MaglevBackend<K>> = backends.iter().collect();
    sorted.sort_by(|a, b| a.key.as_ref().cmp(b.key.as_ref()));
    sorted
}

/// Per-backend state of the population loop.
struct Slotter {
    /// Index in the sorted backend list, the value written to the table.
    index: u32,
    weight: u64,
    /// Next slot of this backend's permutation.
    next: u64,
    skip: u64,
    credit: u64,
}

/// Builds the Maglev lookup table of `size` slots for `backends`.
///
/// Entries index into the backends sorted by key bytes ([`sorted_backends`]);
/// the result does not depend on the order of `backends`, only on the set of
/// `(key, weight)` pairs, `size` and `seed`. Every slot is filled.
///
/// Errors: [`MaglevError::InvalidTableSize`] unless `size` is in
/// [`TABLE_SIZES`]; [`MaglevError::NoBackends`] when `backends` is empty or
/// all weights are 0 (no empty table is ever returned);
/// [`MaglevError::DuplicateKey`] for repeated keys;
/// [`MaglevError::TooManyBackends`] when more backends have a non-zero weight
/// than there are slots.
pub fn build_table<K: AsRef<[u8]>>(
    backends: &[MaglevBackend<K>],
    size: usize,
    seed: u64,
) -> Result<Vec<u32>, MaglevError> {
    check_table_size(size)?;
    if backends.len() >= EMPTY as usize {
        return Err(MaglevError::TooManyBackends {
            backends: backends.len(),
            size,
        });
    }
    let order = sorted_order(backends)?;
    let m = size as u64;

    let mut slotters: Vec<Slotter> = Vec::with_capacity(order.len());
    for (rank, &input) in order.iter().enumerate() {
        let b = &backends[input];
        if b.weight == 0 {
            continue;
        }
        let key = b.key.as_ref();
        slotters.push(Slotter {
            // Cannot truncate: checked against EMPTY above.
            index: rank as u32,
            weight: u64::from(b.weight),
            next: key_hash(seed, 0, key) % m,
            skip: key_hash(seed, 1, key) % (m - 1) + 1,
            credit: 0,
        });
    }
    if slotters.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    if slotters.len() > size {
        return Err(MaglevError::TooManyBackends {
            backends: slotters.len(),
            size,
        });
    }
    let max_weight = slotters.iter().map(|s| s.weight).max().unwrap_or(1);

    let mut table = vec![EMPTY; size];
    let mut filled = 0usize;
    // Each round, the backends of maximal weight place one entry, so this
    // ends after at most `size` rounds. Within a placement, the permutation
    // (offset + j * skip) mod M visits every slot because M is prime and
    // 0 < skip < M, so an empty slot is always found while filled < size.
    'rounds: loop {
        for s in slotters.iter_mut() {
            s.credit += s.weight;
            if s.credit < max_weight {
                continue;
            }
            s.credit -= max_weight;
            loop {
                let slot = s.next as usize;
                s.next += s.skip;
                if s.next >= m {
                    s.next -= m;
                }
                if table[slot] == EMPTY {
                    table[slot] = s.index;
                    break;
                }
            }
            filled += 1;
            if filled == size {
                break 'rounds;
            }
        }
    }
    Ok(table)
}

/// Number of table entries pointing at each of `backends` indices.
fn slot_counts(table: &[u32], backends: usize) -> Result<Vec<usize>, MaglevError> {
    let mut counts = vec![0usize; backends];
    for &entry in table {
        let c = counts
            .get_mut(entry as usize)
            .ok_or(MaglevError::EntryOutOfRange { entry, backends })?;
        *c += 1;
    }
    Ok(counts)
}

/// The share of slots whose backend *key* differs between two tables of the
/// same size. `old_keys` and `new_keys` are the keys each table's entries
/// index into (the [`sorted_backends`] order), so a backend keeps being
/// recognised when removing another one shifts its index.
pub fn changed_fraction<K: AsRef<[u8]>>(
    old: &[u32],
    old_keys: &[K],
    new: &[u32],
    new_keys: &[K],
) -> Result<f64, MaglevError> {
    if old.len() != new.len() {
        return Err(MaglevError::LengthMismatch {
            old: old.len(),
            new: new.len(),
        });
    }
    if old.is_empty() {
        return Ok(0.0);
    }
    fn key<K: AsRef<[u8]>>(keys: &[K], entry: u32) -> Result<&[u8], MaglevError> {
        keys.get(entry as usize)
            .map(AsRef::as_ref)
            .ok_or(MaglevError::EntryOutOfRange {
                entry,
                backends: keys.len(),
            })
    }
    let mut changed = 0usize;
    for (&a, &b) in old.iter().zip(new) {
        if key(old_keys, a)? != key(new_keys, b)? {
            changed += 1;
        }
    }
    Ok(changed as f64 / old.len() as f64)
}

/// The largest relative deviation of any backend's share of `table` from its
/// fair share `weight / sum(weights)`, e.g. `0.005` for 0.5 %.
///
/// `weights` are in the order the entries index into ([`sorted_backends`]).
/// Backends of weight 0 have no fair share and are skipped (a correct table
/// never points at them).
pub fn max_share_deviation(table: &[u32], weights: &[u32]) -> Result<f64, MaglevError> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 || table.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    let counts = slot_counts(table, weights.len())?;
    let m = table.len() as f64;
    let mut worst = 0.0f64;
    for (&w, &count) in weights.iter().zip(&counts) {
        if w == 0 {
            continue;
        }
        let fair = m * f64::from(w) / total as f64;
        worst = worst.max((count as f64 - fair).abs() / fair);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Address and port in network byte order, like the agent would use.
    fn key(i: usize) -> [u8; 6] {
        let i = i as u32;
        let [_, b, c, d] = i.to_be_bytes();
        [10, b, c, d, 0x1f, 0x90]
    }

    fn backends(n: usize) -> Vec<MaglevBackend<[u8; 6]>> {
        (0..n).map(|i| MaglevBackend::new(key(i), 1)).collect()
    }

    /// Deterministic Fisher-Yates with a 64-bit LCG.
    fn shuffle<T>(v: &mut [T], mut state: u64) {
        for i in (1..v.len()).rev() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = ((state >> 33) as usize) % (i + 1);
            v.swap(i, j);
        }
    }

    fn keys_of<K: AsRef<[u8]> + Clone>(b: &[MaglevBackend<K>]) -> Vec<K> {
        sorted_backends(b)
            .into_iter()
            .map(|b| b.key.clone())
            .collect()
    }

    fn weights_of<K: AsRef<[u8]>>(b: &[MaglevBackend<K>]) -> Vec<u32> {
        sorted_backends(b).into_iter().map(|b| b.weight).collect()
    }

    /// Worst-case and mean ratio of changed entries to the ideal 1/N when
    /// each backend in turn is removed.
    fn removal_ratios(n: usize, m: usize, seed: u64) -> (f64, f64) {
        let all = backends(n);
        let full = build_table(&all, m, seed).unwrap();
        let full_keys = keys_of(&all);
        let mut worst = 0.0f64;
        let mut sum = 0.0;
        for removed in 0..n {
            let mut fewer = all.clone();
            fewer.remove(removed);
            let t = build_table(&fewer, m, seed).unwrap();
            let f = changed_fraction(&full, &full_keys, &t, &keys_of(&fewer)).unwrap();
            let ratio = f * n as f64;
            worst = worst.max(ratio);
            sum += ratio;
        }
        (worst, sum / n as f64)
    }

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn golden_table_is_pinned() {
        // Changing these values changes every node's tables: flows would move
        // between backends while agents of different versions coexist.
        // The values were cross-checked against an independent Python
        // implementation of the hash and the population loop.
        assert_eq!(key_hash(0, 0, b""), 0xf51e_c3da_bc2c_4015);
        assert_eq!(key_hash(42, 1, &key(1)), 0xd104_867d_365c_18a5);
        let t = build_table(&backends(3), 251, 42).unwrap();
        assert_eq!(
            &t[..24],
            &[0, 2, 2, 2, 0, 2, 1, 0, 0, 1, 2, 2, 1, 1, 1, 1, 0, 0, 1, 2, 2, 0, 2, 2]
        );
    }

    #[test]
    fn table_sizes() {
        for m in TABLE_SIZES {
            assert!(check_table_size(m).is_ok());
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} not prime"
            );
        }
        assert!(TABLE_SIZES.contains(&DEFAULT_TABLE_SIZE));
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
        for bad in [0, 1, 250, 16383, 65536, 1 << 20] {
            assert_eq!(
                build_table(&backends(2), bad, 0),
                Err(MaglevError::InvalidTableSize { size: bad })
            );
        }
    }

    #[test]
    fn table_size_helper() {
        assert_eq!(table_size_for(0), 251);
        assert_eq!(table_size_for(1), 251);
        assert_eq!(table_size_for(2), 251);
        assert_eq!(table_size_for(3), 509);
        assert_eq!(table_size_for(10), 1021);
        assert_eq!(table_size_for(100), 16381);
        assert_eq!(table_size_for(163), 16381);
        assert_eq!(table_size_for(164), 32749);
        assert_eq!(table_size_for(1000), 131071);
        assert_eq!(table_size_for(655), 65537);
        assert_eq!(table_size_for(5000), 131071);
        assert_eq!(table_size_for(usize::MAX), 131071);
    }

    #[test]
    fn empty_and_zero_weight_lists_are_errors() {
        let none: [MaglevBackend<[u8; 6]>; 0] = [];
        assert_eq!(build_table(&none, 251, 0), Err(MaglevError::NoBackends));
        let zero = vec![MaglevBackend::new(key(0), 0), MaglevBackend::new(key(1), 0)];
        assert_eq!(build_table(&zero, 251, 0), Err(MaglevError::NoBackends));
    }

    #[test]
    fn duplicate_keys_and_too_many_backends_are_errors() {
        let dup = vec![
            MaglevBackend::new(key(1), 1),
            MaglevBackend::new(key(2), 1),
            MaglevBackend::new(key(1), 3),
        ];
        assert_eq!(
            build_table(&dup, 251, 0),
            Err(MaglevError::DuplicateKey { index: 2 })
        );
        assert_eq!(
            build_table(&backends(252), 251, 0),
            Err(MaglevError::TooManyBackends {
                backends: 252,
                size: 251
            })
        );
        // Exactly M backends: one slot each.
        let t = build_table(&backends(251), 251, 0).unwrap();
        assert_eq!(slot_counts(&t, 251).unwrap(), vec![1; 251]);
    }

    #[test]
    fn single_backend_fills_everything() {
        let one = vec![MaglevBackend::new(key(7), 5)];
        assert_eq!(build_table(&one, 251, 9).unwrap(), vec![0; 251]);
    }

    #[test]
    fn every_slot_filled_with_valid_index() {
        for (n, m) in [(1, 251), (3, 509), (10, 1021), (100, 16381), (37, 4093)] {
            let b = backends(n);
            let t = build_table(&b, m, 1).unwrap();
            assert_eq!(t.len(), m);
            assert!(t.iter().all(|&e| (e as usize) < n), "n={n} m={m}");
        }
    }

    #[test]
    fn independent_of_input_order() {
        let mut b = backends(100);
        // Weights vary so the ordering matters for more than the index.
        for (i, be) in b.iter_mut().enumerate() {
            be.weight = (i % 4) as u32;
        }
        let reference = build_table(&b, 16381, 7).unwrap();
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(build_table(&reversed, 16381, 7).unwrap(), reference);
        for s in 1..5 {
            let mut shuffled = b.clone();
            shuffle(&mut shuffled, s);
            assert_ne!(shuffled, b);
            assert_eq!(build_table(&shuffled, 16381, 7).unwrap(), reference);
        }
    }

    #[test]
    fn seed_determines_table() {
        let b = backends(50);
        let a1 = build_table(&b, 8191, 1234).unwrap();
        let a2 = build_table(&b, 8191, 1234).unwrap();
        assert_eq!(a1, a2);
        let other = build_table(&b, 8191, 1235).unwrap();
        let keys = keys_of(&b);
        let diff = changed_fraction(&a1, &keys, &other, &keys).unwrap();
        // Unrelated tables agree on about 1/N of the slots.
        assert!(diff > 0.9, "a different seed changed only {diff}");
    }

    #[test]
    fn equal_weights_are_balanced() {
        for (n, m) in [
            (10, 1021),
            (100, 16381),
            (163, 16381),
            (300, 32749),
            (1000, 131071),
        ] {
            let b = backends(n);
            let t = build_table(&b, m, 3).unwrap();
            let counts = slot_counts(&t, n).unwrap();
            let (lo, hi) = (m / n, m.div_ceil(n));
            assert!(
                counts.iter().all(|&c| c == lo || c == hi),
                "n={n} m={m} counts outside [{lo}, {hi}]"
            );
            let dev = max_share_deviation(&t, &weights_of(&b)).unwrap();
            assert!(dev <= 0.01, "n={n} m={m} imbalance {dev}");
        }
    }

    // Removing one of N backends must move at least the 1/N of the slots it
    // owned; Maglev also moves some slots between surviving backends because
    // their population order shifts. The extra part shrinks as M/N grows and
    // grows with N: standard Maglev meets 1.5x the ideal for small N at
    // M ~ 100 N, but not for N = 100 at M = 16381 (measured mean 2.4x, worst
    // 2.6x; 1.9x at M = 32749, 1.6x at M = 65537). The bounds below are the
    // measured behaviour with some margin, so a regression shows.

    #[test]
    fn removal_disruption_n10_m1021() {
        for seed in 0..4 {
            let (worst, mean) = removal_ratios(10, 1021, seed);
            assert!(worst <= 1.5, "seed {seed} worst ratio {worst}");
            assert!(mean >= 1.0, "seed {seed} mean ratio {mean}");
        }
    }

    #[test]
    fn removal_disruption_n100_m16381() {
        let (worst, mean) = removal_ratios(100, 16381, 0x5eed);
        assert!(worst <= 3.0, "worst ratio {worst}");
        assert!((1.0..=2.7).contains(&mean), "mean ratio {mean}");
    }

    #[test]
    fn removal_disruption_shrinks_with_table_size() {
        let (_, small) = removal_ratios(30, 4093, 9);
        let (worst, large) = removal_ratios(30, 32749, 9);
        assert!(large < small, "M=32749: {large}, M=4093: {small}");
        assert!(worst <= 1.5, "N=30 M=32749 worst ratio {worst}");
    }

    #[test]
    fn zero_weight_backend_changes_nothing_but_indices() {
        let b = backends(20);
        let t = build_table(&b, 2039, 5).unwrap();
        let mut with_drain = b.clone();
        // Sorts first, so every index shifts by one.
        with_drain.push(MaglevBackend::new([0u8; 6], 0));
        let t2 = build_table(&with_drain, 2039, 5).unwrap();
        assert_ne!(t, t2);
        assert!(!t2.contains(&0));
        let f = changed_fraction(&t, &keys_of(&b), &t2, &keys_of(&with_drain)).unwrap();
        assert_eq!(f, 0.0);
    }

    #[test]
    fn weights_are_respected() {
        // One backend of weight 2 among weight-1 backends.
        let mut b = backends(10);
        b[3].weight = 2;
        let t = build_table(&b, 1021, 11).unwrap();
        let counts = slot_counts(&t, 10).unwrap();
        let heavy = counts[3] as f64;
        let light: f64 = counts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, &c)| c as f64)
            .sum::<f64>()
            / 9.0;
        assert!(
            (heavy / light - 2.0).abs() < 0.05,
            "heavy {heavy} light {light}"
        );
        assert!(max_share_deviation(&t, &weights_of(&b)).unwrap() <= 0.02);

        // Mixed weights 1..=4 with M >= 100 * sum(weights).
        let mut b = backends(40);
        for (i, be) in b.iter_mut().enumerate() {
            be.weight = (i % 4) as u32 + 1;
        }
        let t = build_table(&b, 16381, 11).unwrap();
        let dev = max_share_deviation(&t, &weights_of(&b)).unwrap();
        assert!(dev <= 0.03, "weighted imbalance {dev}");

        // Weight 0 never appears.
        b[5].weight = 0;
        let t = build_table(&b, 16381, 11).unwrap();
        assert!(!t.contains(&5));
        assert!(max_share_deviation(&t, &weights_of(&b)).unwrap() <= 0.03);
    }

    #[test]
    fn extreme_weights_terminate() {
        let b = vec![
            MaglevBackend::new(key(0), u32::MAX),
            MaglevBackend::new(key(1), 1),
        ];
        let t = build_table(&b, 251, 0).unwrap();
        assert!(t.iter().all(|&e| e == 0));
    }

    #[test]
    fn changed_fraction_errors() {
        let keys = [key(0), key(1)];
        assert_eq!(
            changed_fraction(&[0, 1], &keys, &[0], &keys),
            Err(MaglevError::LengthMismatch { old: 2, new: 1 })
        );
        assert_eq!(
            changed_fraction(&[0, 2], &keys, &[0, 1], &keys),
            Err(MaglevError::EntryOutOfRange {
                entry: 2,
                backends: 2
            })
        );
        assert_eq!(changed_fraction(&[0, 1], &keys, &[1, 1], &keys), Ok(0.5));
    }
}
