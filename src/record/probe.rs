//! The transitions of an in-doubt probe (issue 34): a prober takes an IN_DOUBT record with its
//! own token and lease (so two sidecars never probe one key at once, and a prober that dies
//! leaves the record IN_DOUBT), then settles it by what the service's lookup answered. Pure,
//! like every transition here: the instant is an argument.

use super::{effective_state, in_doubt, is_expired, Change, Record, Response, State, Token};

/// The longest wait between two probes of one record.
pub const PROBE_BACKOFF_MAX_MS: u64 = 30_000;

/// When a probe may go, as the method's rule and the prober say.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    /// Now, in Unix milliseconds.
    pub now_ms: u64,
    /// How long the prober holds the record (its call's deadline and a margin).
    pub lease_ms: u64,
    /// How long after the original call's lease the first probe goes.
    pub after_ms: u64,
    /// How long after the original call's lease probing stops.
    pub give_up_after_ms: u64,
    /// A duplicate waits on this probe: skip `after_ms` (never the backoff of a failed one).
    pub at_once: bool,
}

/// What a prober's try to take a record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTake {
    /// Taken: probe the call of `serial` made by `caller`.
    Taken {
        /// The call's serial number.
        serial: Vec<u8>,
        /// Who made it.
        caller: String,
        /// The call's span (`Record::origin_trace`), which the probe's span links to.
        origin: Vec<u8>,
    },
    /// Not yet: the next probe may go at `at_ms`.
    NotDue {
        /// When.
        at_ms: u64,
    },
    /// Another prober holds it.
    Busy,
    /// Probing stops now (the record says so from here on): an operator decides.
    GaveUp,
    /// Nothing to probe: no IN_DOUBT record whose call has ended (or it kept no serial, or
    /// probing gave up on it before).
    Nothing,
}

/// What the service's lookup said.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeAnswer {
    /// OK: the call took effect, and this is its answer.
    Found(Response),
    /// NOT_FOUND: the call did not take effect, and can no longer.
    NotFound,
    /// Anything else: ask again later.
    Failed,
}

/// What an IN_DOUBT record waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Its method's probe will ask the service.
    Probe,
    /// Nothing settles it but an operator: its method keeps no serial (no probe), or probing
    /// gave up.
    Operator,
}

impl Waiting {
    /// As the admin API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Waiting::Probe => "probe",
            Waiting::Operator => "operator",
        }
    }
}

/// What `record` waits for at `now_ms`; `None` unless it is IN_DOUBT.
pub fn waiting_for(record: &Record, now_ms: u64) -> Option<Waiting> {
    if effective_state(record, now_ms) != State::InDoubt {
        return None;
    }
    if record.serial.is_empty() || record.probing_stopped {
        Some(Waiting::Operator)
    } else {
        Some(Waiting::Probe)
    }
}

/// A prober asks to probe the record: it takes it with `token` when the record is IN_DOUBT,
/// the original call's lease is over, no other probe holds it, and a probe is due.
pub fn take_probe(
    current: Option<&Record>,
    token: &Token,
    at: &ProbeTiming,
) -> (Change, ProbeTake) {
    let now_ms = at.now_ms;
    let record = match current {
        Some(record)
            if !is_expired(record, now_ms)
                && waiting_for(record, now_ms) == Some(Waiting::Probe)
                && record.lease_until_ms <= now_ms =>
        {
            record
        }
        _ => return (Change::Keep, ProbeTake::Nothing),
    };
    if now_ms >= record.lease_until_ms.saturating_add(at.give_up_after_ms) {
        // Said once, in the record: it now waits for an operator, and no walk takes it again.
        let stopped = Record {
            probing_stopped: true,
            ..record.clone()
        };
        return (Change::Put(stopped), ProbeTake::GaveUp);
    }
    if record.probe_lease_until_ms > now_ms {
        return (Change::Keep, ProbeTake::Busy);
    }
    let first_ms = if at.at_once {
        0
    } else {
        record.lease_until_ms.saturating_add(at.after_ms)
    };
    let due_ms = first_ms.max(record.next_probe_ms);
    if now_ms < due_ms {
        return (Change::Keep, ProbeTake::NotDue { at_ms: due_ms });
    }
    let base = match record.state() {
        // An IN_FLIGHT record past its lease: record that, as a claim would.
        State::InFlight => in_doubt(record, "the owner's lease expired"),
        _ => record.clone(),
    };
    let taken = Record {
        probe_token: token.to_vec(),
        probe_lease_until_ms: now_ms.saturating_add(at.lease_ms),
        probes: record.probes.saturating_add(1),
        ..base
    };
    let what = ProbeTake::Taken {
        serial: record.serial.clone(),
        caller: record.caller.clone(),
        origin: record.origin_trace.clone(),
    };
    (Change::Put(taken), what)
}

/// The prober holding the record with `token` settles it by the service's `answer`: found,
/// COMPLETED with the lookup's answer (kept until `expires_ms`); not found, released; else
/// left IN_DOUBT, the next probe after a backoff. `true`: applied (the record was still
/// this prober's and IN_DOUBT).
pub fn settle_probe(
    current: Option<&Record>,
    token: &Token,
    answer: ProbeAnswer,
    now_ms: u64,
    expires_ms: u64,
) -> (Change, bool) {
    let record = match current {
        Some(record) if record.probe_token == token[..] && record.state() == State::InDoubt => {
            record
        }
        _ => return (Change::Keep, false),
    };
    let released = Record {
        probe_token: Vec::new(),
        probe_lease_until_ms: 0,
        ..record.clone()
    };
    let change = match answer {
        ProbeAnswer::Found(mut response) => {
            response.resolved_by_probe = true;
            Change::Put(Record {
                state: State::Completed as i32,
                response: Some(response),
                response_not_kept: false,
                completed_ms: now_ms,
                expires_ms,
                in_doubt_reason: String::new(),
                ..released
            })
        }
        ProbeAnswer::NotFound => Change::Delete,
        ProbeAnswer::Failed => {
            let backoff_ms = 1_000u64
                .saturating_mul(1 << record.probes.clamp(1, 16).saturating_sub(1))
                .min(PROBE_BACKOFF_MAX_MS);
            Change::Put(Record {
                next_probe_ms: now_ms.saturating_add(backoff_ms),
                ..released
            })
        }
    };
    (change, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE_END: u64 = 10_000;

    fn in_doubt_record() -> Record {
        Record {
            state: State::InDoubt as i32,
            serial: b"pay-1".to_vec(),
            caller: "alice".into(),
            token: vec![1; 16],
            lease_until_ms: LEASE_END,
            expires_ms: 1_000_000,
            ..Record::default()
        }
    }

    fn timing(now_ms: u64, at_once: bool) -> ProbeTiming {
        ProbeTiming {
            now_ms,
            lease_ms: 5_000,
            after_ms: 1_000,
            give_up_after_ms: 100_000,
            at_once,
        }
    }

    fn applied(change: Change) -> Record {
        match change {
            Change::Put(record) => record,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn a_probe_waits_for_the_lease_and_then_for_after() {
        let record = in_doubt_record();
        let (_, early) = take_probe(Some(&record), &[2; 16], &timing(LEASE_END - 1, true));
        assert_eq!(
            early,
            ProbeTake::Nothing,
            "the original may still be running"
        );
        let (_, soon) = take_probe(Some(&record), &[2; 16], &timing(LEASE_END + 10, false));
        assert_eq!(
            soon,
            ProbeTake::NotDue {
                at_ms: LEASE_END + 1_000
            }
        );
        let (change, taken) = take_probe(Some(&record), &[2; 16], &timing(LEASE_END + 10, true));
        assert!(
            matches!(taken, ProbeTake::Taken { .. }),
            "a duplicate asks at once"
        );
        let held = applied(change);
        let (_, other) = take_probe(Some(&held), &[3; 16], &timing(LEASE_END + 20, true));
        assert_eq!(other, ProbeTake::Busy, "one prober per key");
        let (stop, late) = take_probe(Some(&record), &[2; 16], &timing(LEASE_END + 100_000, true));
        assert_eq!(late, ProbeTake::GaveUp);
        let stopped = applied(stop);
        assert!(stopped.probing_stopped && stopped.state() == State::InDoubt);
        let (_, after) = take_probe(Some(&stopped), &[2; 16], &timing(LEASE_END + 100_001, true));
        assert_eq!(after, ProbeTake::Nothing, "given up once, and said once");
        assert_eq!(
            waiting_for(&stopped, LEASE_END + 100_001),
            Some(Waiting::Operator)
        );
        assert_eq!(waiting_for(&record, LEASE_END), Some(Waiting::Probe));
        let unprobed = Record {
            serial: Vec::new(),
            ..record
        };
        assert_eq!(waiting_for(&unprobed, LEASE_END), Some(Waiting::Operator));
    }

    #[test]
    fn answers_complete_release_or_back_off() {
        let record = in_doubt_record();
        let now = LEASE_END + 2_000;
        let (change, _) = take_probe(Some(&record), &[2; 16], &timing(now, false));
        let held = applied(change);
        let response = Response {
            grpc_status: 0,
            ..Response::default()
        };
        let (found, ok) =
            settle_probe(Some(&held), &[2; 16], ProbeAnswer::Found(response), now, 99);
        let found = applied(found);
        assert!(ok);
        assert_eq!(found.state(), State::Completed);
        assert!(found.response.is_some_and(|r| r.resolved_by_probe));
        let (gone, _) = settle_probe(Some(&held), &[2; 16], ProbeAnswer::NotFound, now, 99);
        assert_eq!(gone, Change::Delete);
        let (failed, _) = settle_probe(Some(&held), &[2; 16], ProbeAnswer::Failed, now, 99);
        let failed = applied(failed);
        assert_eq!(failed.state(), State::InDoubt);
        assert!(failed.next_probe_ms > now && failed.probe_token.is_empty());
        let (not_ours, ok) = settle_probe(Some(&held), &[9; 16], ProbeAnswer::NotFound, now, 99);
        assert_eq!(
            (not_ours, ok),
            (Change::Keep, false),
            "another prober's record"
        );
        // The original's late outcome still completes the record, as without probes.
        let (late, fenced) = super::super::complete(Some(&held), &[1; 16], None, now, 99);
        assert!(matches!(late, Change::Put(_)) && fenced == super::super::Fenced::Applied);
    }
}
