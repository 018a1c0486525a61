//! The records this process's claims wrote, kept for the attempt's next transition (issue 32
//! item 10): its completion, release or marking IN_DOUBT is first tried against the record
//! its own claim wrote instead of reading it back, one statement less a fresh call. A guess,
//! never a decision: the swap still compares against what is stored, so a record another
//! replica changed refuses it and hands back what is there, and a transition that would
//! change nothing on the guess reads the record and decides again. This module never reads
//! or writes PostgreSQL.

use std::collections::HashMap;
use std::sync::Mutex;

/// Records kept at most. An attempt takes its record back within its lease, so only the calls
/// in flight are here; past the bound (attempts that ended without a next transition, such
/// as a cancelled task) every guess is dropped, and those keys are read.
pub const WRITTEN_RECORDS_MAX: usize = 4_096;

/// The last record a claim of this process wrote, by key.
#[derive(Default)]
pub struct Written {
    records: Mutex<HashMap<[u8; 32], Vec<u8>>>,
}

impl Written {
    /// Keeps `record` as what the claim of `key` wrote.
    pub fn keep(&self, key: [u8; 32], record: Vec<u8>) {
        let mut records = self.records.lock().expect("no panic holds this lock");
        if records.len() >= WRITTEN_RECORDS_MAX {
            records.clear();
        }
        records.insert(key, record);
    }

    /// What the claim of `key` wrote, if kept; forgotten here either way.
    pub fn take(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        self.records
            .lock()
            .expect("no panic holds this lock")
            .remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_taken_once() {
        let written = Written::default();
        written.keep([1; 32], b"claimed".to_vec());
        assert_eq!(written.take(&[1; 32]).as_deref(), Some(&b"claimed"[..]));
        assert_eq!(
            written.take(&[1; 32]),
            None,
            "a guess serves one transition"
        );
        assert_eq!(written.take(&[2; 32]), None);
    }

    #[test]
    fn past_the_bound_the_guesses_are_dropped_not_grown() {
        let written = Written::default();
        for n in 0..=WRITTEN_RECORDS_MAX {
            let mut key = [0; 32];
            key[..8].copy_from_slice(&(n as u64).to_be_bytes());
            written.keep(key, vec![1]);
        }
        let held = written.records.lock().unwrap().len();
        assert!(held <= WRITTEN_RECORDS_MAX, "{held} records held");
    }
}
