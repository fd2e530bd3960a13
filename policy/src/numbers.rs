//! Stable numbers for things named by a digest: identities (label sets and
//! CIDRs), policy sets and rules. A thing keeps its number while it exists,
//! across agent restarts too (numbers found in the kernel are adopted by
//! digest), and a freed number is reused only after the range wrapped.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

/// Numbers in `first..=last`, each for one digest.
#[derive(Clone, Debug)]
pub struct Numbers {
    first: u32,
    last: u32,
    next: u32,
    by_digest: FxHashMap<[u8; 16], u32>,
    by_number: BTreeMap<u32, [u8; 16]>,
}

/// The range is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// How many numbers the range has.
    pub capacity: u32,
}

impl Numbers {
    /// An empty allocator of `first..=last`.
    pub fn new(first: u32, last: u32) -> Self {
        Self {
            first,
            last,
            next: first,
            by_digest: FxHashMap::default(),
            by_number: BTreeMap::new(),
        }
    }

    /// Takes over numbers found in the kernel, so that the same digests get
    /// the same numbers again; numbers outside the range are ignored.
    pub fn adopt(&mut self, found: impl IntoIterator<Item = (u32, [u8; 16])>) {
        for (number, digest) in found {
            if (self.first..=self.last).contains(&number) && !self.by_digest.contains_key(&digest) {
                self.by_digest.insert(digest, number);
                self.by_number.insert(number, digest);
                self.next = self.next.max(number.saturating_add(1));
            }
        }
        if self.next > self.last {
            self.next = self.first;
        }
    }

    /// The number of `digest`, allocating one if it has none.
    pub fn number(&mut self, digest: [u8; 16]) -> Result<u32, Exhausted> {
        if let Some(number) = self.by_digest.get(&digest) {
            return Ok(*number);
        }
        let capacity = self.last - self.first + 1;
        if self.by_number.len() as u64 >= u64::from(capacity) {
            return Err(Exhausted { capacity });
        }
        while self.by_number.contains_key(&self.next) {
            self.next = if self.next == self.last {
                self.first
            } else {
                self.next + 1
            };
        }
        let number = self.next;
        self.next = if number == self.last {
            self.first
        } else {
            number + 1
        };
        self.by_digest.insert(digest, number);
        self.by_number.insert(number, digest);
        Ok(number)
    }

    /// The number of `digest`, if it has one.
    pub fn get(&self, digest: &[u8; 16]) -> Option<u32> {
        self.by_digest.get(digest).copied()
    }

    /// Frees every number whose digest `keep` rejects.
    pub fn retain(&mut self, keep: impl Fn(u32, &[u8; 16]) -> bool) {
        let gone: BTreeSet<u32> = self
            .by_number
            .iter()
            .filter(|(n, d)| !keep(**n, d))
            .map(|(n, _)| *n)
            .collect();
        for number in gone {
            if let Some(digest) = self.by_number.remove(&number) {
                self.by_digest.remove(&digest);
            }
        }
    }

    /// Gives `number`, which must be free and in range, to `digest`;
    /// returns whether it could.
    pub fn claim(&mut self, number: u32, digest: [u8; 16]) -> bool {
        let free = (self.first..=self.last).contains(&number)
            && !self.by_number.contains_key(&number)
            && !self.by_digest.contains_key(&digest);
        if free {
            self.by_digest.insert(digest, number);
            self.by_number.insert(number, digest);
        }
        free
    }

    /// Frees one number.
    pub fn free(&mut self, number: u32) {
        if let Some(digest) = self.by_number.remove(&number) {
            self.by_digest.remove(&digest);
        }
    }

    /// How many numbers are in use.
    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    /// Whether no number is in use.
    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn numbers_are_stable_adopted_and_reused_after_wrapping() {
        let mut numbers = Numbers::new(10, 12);
        assert_eq!(numbers.number(d(1)), Ok(10));
        assert_eq!(numbers.number(d(2)), Ok(11));
        assert_eq!(numbers.number(d(1)), Ok(10));
        numbers.retain(|_, digest| *digest != d(1));
        // 10 is free again but 12 comes first: numbers are not reused at once.
        assert_eq!(numbers.number(d(3)), Ok(12));
        assert_eq!(numbers.number(d(4)), Ok(10));
        assert_eq!(numbers.number(d(5)), Err(Exhausted { capacity: 3 }));

        let mut restarted = Numbers::new(10, 12);
        restarted.adopt([(11, d(2)), (99, d(9))]);
        assert_eq!(restarted.get(&d(2)), Some(11));
        assert_eq!(restarted.get(&d(9)), None, "out of range");
        assert_eq!(restarted.number(d(6)), Ok(12));
        assert_eq!(restarted.len(), 2);
    }
}
