//! The record state machine (design §3): the only place that decides a state.
//!
//! Every function here is a pure transition: it reads the current record (if any) and returns
//! the change to apply plus what the caller learns. Stores apply a change atomically (one
//! compare-and-swap or one script) and never invent a state of their own. Nothing here does
//! I/O or reads a clock: the instant is an argument.

pub mod probe;

pub use crate::pb::idemproxy::v1::{Header, Record, Response, State};

/// The version written in every new record.
pub const RECORD_VERSION: u32 = 1;

/// What a store must do with the record it read.
// A change is consumed at once by the store that asked for it, never kept in bulk, so the
// size of `Put` costs nothing and a box would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Leave it as it is.
    Keep,
    /// Replace it (or create it) with this record.
    Put(Record),
    /// Delete it: the key is free again.
    Delete,
}

/// The claim token: identifies one claim, so only its owner may complete or release it.
pub type Token = [u8; 16];

/// A first attempt's request to own a key.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Fingerprint of the request messages.
    pub fingerprint: &'a [u8; 32],
    /// `/package.Service/Method`.
    pub method: &'a str,
    /// The caller, as the caller source named it.
    pub caller: &'a str,
    /// The new claim's token.
    pub token: Token,
    /// Now, in Unix milliseconds.
    pub now_ms: u64,
    /// Until when the claimant may run the call.
    pub lease_until_ms: u64,
    /// When the record stops protecting the key.
    pub expires_ms: u64,
    /// Set when the store has one writer process (sled): this process's incarnation. An
    /// IN_FLIGHT record claimed under any other incarnation then belongs to a process that has
    /// ended, and is IN_DOUBT. `None` for stores shared by live processes.
    pub sole_owner: Option<[u8; 8]>,
    /// The method's policy says an unknown outcome may be run again (`IN_DOUBT_RETRY`): an
    /// IN_DOUBT record (or an IN_FLIGHT one past its lease) is claimed anew.
    pub retry_in_doubt: bool,
    /// The claiming attempt's trace and span id (`telemetry::trace::origin_of`), kept for
    /// operators.
    pub origin: Option<&'a [u8; 24]>,
    /// The caller holds as many live records as it may: a claim that would create a new
    /// record is refused (`Claimed::QuotaExceeded`); duplicates of its records are answered.
    pub at_quota: bool,
    /// The serial number, kept in the record when the method's unknown outcome is probed.
    pub serial: Option<&'a [u8]>,
}

/// What a claim learned.
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// The key is ours: forward the call.
    Owned,
    /// A recorded outcome for this very request: replay it.
    Replay(Response),
    /// The call ran, but its response was too large to keep.
    ResponseNotKept,
    /// Another attempt owns the key until `lease_until_ms`.
    InProgress {
        /// When that owner's lease runs out.
        lease_until_ms: u64,
    },
    /// The service may have acted and its outcome is unknown; the call that made it may run
    /// until `lease_until_ms` (a probe goes only after).
    InDoubt {
        /// When the claiming call's lease runs out.
        lease_until_ms: u64,
    },
    /// The same key arrived with another request payload; the record is in `state`.
    KeyReused {
        /// The record's state as of the claim (an IN_FLIGHT one past its lease: IN_DOUBT).
        state: State,
    },
    /// A new key of a caller at its cap on live records: nothing was written.
    QuotaExceeded,
    /// The recorded outcome is sealed and cannot be opened (its key is gone, or the record
    /// was altered): answered as IN_DOUBT, never run again.
    Unreadable,
}

/// Whether the owner's write landed, or another claim holds the record now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// The transition was applied.
    Applied,
    /// The record is not ours (another token, or gone): nothing was changed.
    NotOwner,
}

/// True when `record` no longer protects its key at `now_ms` and may be replaced.
///
/// A live IN_FLIGHT record is never dead: its owner may still be running the call.
pub fn is_expired(record: &Record, now_ms: u64) -> bool {
    let live_in_flight = record.state() == State::InFlight && record.lease_until_ms > now_ms;
    !live_in_flight && record.expires_ms <= now_ms
}

/// The state as of `now_ms`: an IN_FLIGHT record past its lease is IN_DOUBT.
pub fn effective_state(record: &Record, now_ms: u64) -> State {
    match record.state() {
        State::InFlight if record.lease_until_ms <= now_ms => State::InDoubt,
        state => state,
    }
}

/// The name operators and refusals use for a state (`IN_DOUBT`).
pub fn state_name(state: State) -> &'static str {
    match state {
        State::InFlight => "IN_FLIGHT",
        State::Completed => "COMPLETED",
        State::InDoubt => "IN_DOUBT",
        State::Unspecified => "UNSPECIFIED",
    }
}

/// The states an operator may name, as `state_name` writes them.
pub const STATE_NAMES: [&str; 3] = ["IN_FLIGHT", "COMPLETED", "IN_DOUBT"];

/// The state named `name` exactly as `state_name` writes it; `None` for anything else.
pub fn state_named(name: &str) -> Option<State> {
    [State::InFlight, State::Completed, State::InDoubt]
        .into_iter()
        .find(|state| state_name(*state) == name)
}

/// A first attempt or a duplicate arrives: claim the key, or learn its standing.
pub fn claim(current: Option<&Record>, request: &ClaimRequest<'_>) -> (Change, Claimed) {
    let record = match current {
        Some(record) if !is_expired(record, request.now_ms) => record,
        _ if request.at_quota => return (Change::Keep, Claimed::QuotaExceeded),
        _ => return (Change::Put(new_in_flight(request)), Claimed::Owned),
    };
    if record.fingerprint != request.fingerprint[..] {
        let state = effective_state(record, request.now_ms);
        return (Change::Keep, Claimed::KeyReused { state });
    }
    if record.sealed.is_some() {
        return (Change::Keep, Claimed::Unreadable);
    }
    let orphaned = request.sole_owner.is_some_and(|incarnation| {
        record.state() == State::InFlight && !record.token.starts_with(&incarnation)
    });
    let in_doubt_now = orphaned || effective_state(record, request.now_ms) == State::InDoubt;
    if request.retry_in_doubt && in_doubt_now {
        return (Change::Put(new_in_flight(request)), Claimed::Owned);
    }
    if let Some(incarnation) = request.sole_owner {
        if record.state() == State::InFlight && !record.token.starts_with(&incarnation) {
            let change = Change::Put(in_doubt(record, ENDED_OWNER));
            return (change, in_doubt_until(record));
        }
    }
    match effective_state(record, request.now_ms) {
        State::InFlight => (
            Change::Keep,
            Claimed::InProgress {
                lease_until_ms: record.lease_until_ms,
            },
        ),
        State::InDoubt if record.state() == State::InFlight => {
            // The lease ran out: the owner crashed or hung. Record that, never re-execute.
            let change = Change::Put(in_doubt(record, "the owner's lease expired"));
            (change, in_doubt_until(record))
        }
        State::InDoubt | State::Unspecified => (Change::Keep, in_doubt_until(record)),
        State::Completed if record.response_not_kept => (Change::Keep, Claimed::ResponseNotKept),
        State::Completed => match &record.response {
            Some(response) => (Change::Keep, Claimed::Replay(response.clone())),
            None => (Change::Keep, Claimed::ResponseNotKept),
        },
    }
}

fn new_in_flight(request: &ClaimRequest<'_>) -> Record {
    Record {
        version: RECORD_VERSION,
        state: State::InFlight as i32,
        fingerprint: request.fingerprint.to_vec(),
        method: request.method.to_owned(),
        caller: request.caller.to_owned(),
        created_ms: request.now_ms,
        expires_ms: request.expires_ms,
        token: request.token.to_vec(),
        lease_until_ms: request.lease_until_ms,
        origin_trace: request
            .origin
            .map(|origin| origin.to_vec())
            .unwrap_or_default(),
        serial: request.serial.map(<[u8]>::to_vec).unwrap_or_default(),
        ..Record::default()
    }
}

fn in_doubt_until(record: &Record) -> Claimed {
    Claimed::InDoubt {
        lease_until_ms: record.lease_until_ms,
    }
}

fn in_doubt(record: &Record, reason: &str) -> Record {
    Record {
        state: State::InDoubt as i32,
        in_doubt_reason: reason.to_owned(),
        ..record.clone()
    }
}

fn owns(record: &Record, token: &Token) -> bool {
    record.token == token[..] && matches!(record.state(), State::InFlight | State::InDoubt)
}

/// The owner records the outcome: COMPLETED with the response (or without, when it was too
/// large to keep). A late owner may complete its own IN_DOUBT record: we learn the truth.
pub fn complete(
    current: Option<&Record>,
    token: &Token,
    response: Option<Response>,
    now_ms: u64,
    expires_ms: u64,
) -> (Change, Fenced) {
    match current {
        Some(record) if owns(record, token) => {
            let completed = Record {
                state: State::Completed as i32,
                response_not_kept: response.is_none(),
                response,
                completed_ms: now_ms,
                expires_ms,
                in_doubt_reason: String::new(),
                ..record.clone()
            };
            (Change::Put(completed), Fenced::Applied)
        }
        _ => (Change::Keep, Fenced::NotOwner),
    }
}

/// The owner learned the service did not act: free the key so a retry executes.
pub fn release(current: Option<&Record>, token: &Token) -> (Change, Fenced) {
    match current {
        Some(record) if owns(record, token) => (Change::Delete, Fenced::Applied),
        _ => (Change::Keep, Fenced::NotOwner),
    }
}

/// The owner cannot tell whether the service acted.
pub fn mark_in_doubt(current: Option<&Record>, token: &Token, reason: &str) -> (Change, Fenced) {
    match current {
        Some(record) if record.token == token[..] && record.state() == State::InFlight => {
            (Change::Put(in_doubt(record, reason)), Fenced::Applied)
        }
        _ => (Change::Keep, Fenced::NotOwner),
    }
}

const ENDED_OWNER: &str = "the owning process ended before the outcome";

/// After a restart: a record left IN_FLIGHT by an earlier process (any incarnation but
/// `live`) has no owner any more.
pub fn recover(current: Option<&Record>, live: Option<&[u8; 8]>) -> Change {
    match current {
        Some(record)
            if record.state() == State::InFlight
                && live.is_none_or(|incarnation| !record.token.starts_with(incarnation)) =>
        {
            Change::Put(in_doubt(record, ENDED_OWNER))
        }
        _ => Change::Keep,
    }
}

/// The sweeper's look at one record: delete what expired, settle leases that ran out.
pub fn sweep(current: Option<&Record>, now_ms: u64) -> Change {
    match current {
        Some(record) if is_expired(record, now_ms) => Change::Delete,
        Some(record) if record.state() == State::InFlight && record.lease_until_ms <= now_ms => {
            Change::Put(in_doubt(record, "the owner's lease expired"))
        }
        _ => Change::Keep,
    }
}

/// The store is over its size bound: only COMPLETED records may go, never a claim or an
/// unknown outcome.
pub fn evict(current: Option<&Record>) -> Change {
    match current {
        Some(record) if record.state() == State::Completed => Change::Delete,
        _ => Change::Keep,
    }
}

/// What an upstream answer means for its record (design §3, outcome classification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A deterministic answer: COMPLETED, replayed to duplicates.
    Record,
    /// The service did not act: free the key so a retry executes.
    Release,
    /// The service may have acted: IN_DOUBT.
    InDoubt,
}

/// Classifies a complete upstream response by its gRPC status.
pub fn classify(response: &Response) -> Disposition {
    match response.grpc_status {
        // OK and the deterministic refusals: the same request gets the same answer.
        0 | 3 | 5 | 6 | 9 | 11 | 12 => Disposition::Record,
        // UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ABORTED: not acted on.
        16 | 7 | 8 | 10 => Disposition::Release,
        // UNAVAILABLE before any response header: the request was not processed.
        14 if response.trailers_only => Disposition::Release,
        // DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, INTERNAL, DATA_LOSS, late UNAVAILABLE, and
        // any code the protocol does not define.
        _ => Disposition::InDoubt,
    }
}

/// What an operator's change found.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// Applied; the record as it was before.
    Applied(Box<Record>),
    /// No record for this key.
    NotFound,
    /// The record is not in the state the change needs; its state as of now.
    Refused(State),
}

/// The operator forgets an unknown outcome: the key is free, and a retry executes.
pub fn resolve_forget(current: Option<&Record>, now_ms: u64) -> (Change, Resolved) {
    match current {
        None => (Change::Keep, Resolved::NotFound),
        Some(record) if effective_state(record, now_ms) == State::InDoubt => {
            (Change::Delete, Resolved::Applied(Box::new(record.clone())))
        }
        Some(record) => (
            Change::Keep,
            Resolved::Refused(effective_state(record, now_ms)),
        ),
    }
}

/// The operator records what an unknown call did: COMPLETED with `response`, replayed to
/// every retry until `expires_ms`.
pub fn resolve_complete(
    current: Option<&Record>,
    response: Response,
    now_ms: u64,
    expires_ms: u64,
) -> (Change, Resolved) {
    match current {
        None => (Change::Keep, Resolved::NotFound),
        Some(record) if effective_state(record, now_ms) == State::InDoubt => {
            let completed = Record {
                state: State::Completed as i32,
                response: Some(response),
                response_not_kept: false,
                completed_ms: now_ms,
                expires_ms,
                ..record.clone()
            };
            (
                Change::Put(completed),
                Resolved::Applied(Box::new(record.clone())),
            )
        }
        Some(record) => (
            Change::Keep,
            Resolved::Refused(effective_state(record, now_ms)),
        ),
    }
}

/// The operator deletes a record; never one whose call may still be running (IN_FLIGHT
/// within its lease), since its owner would then record into a key already reused.
pub fn purge(current: Option<&Record>, now_ms: u64) -> (Change, Resolved) {
    match current {
        None => (Change::Keep, Resolved::NotFound),
        Some(record) if effective_state(record, now_ms) == State::InFlight => {
            (Change::Keep, Resolved::Refused(State::InFlight))
        }
        Some(record) => (Change::Delete, Resolved::Applied(Box::new(record.clone()))),
    }
}

/// Classifies with a method's overrides: status codes whose bit (1 << code) is set in
/// `record_codes` are recorded, in `release_codes` released; the rest as `classify` says.
pub fn classify_with(response: &Response, record_codes: u32, release_codes: u32) -> Disposition {
    let bit = 1u32.checked_shl(response.grpc_status).unwrap_or(0);
    if record_codes & bit != 0 {
        Disposition::Record
    } else if release_codes & bit != 0 {
        Disposition::Release
    } else {
        classify(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [u8; 32] = [7; 32];
    const OTHER_FP: [u8; 32] = [8; 32];

    fn request(token: u8, now_ms: u64) -> ClaimRequest<'static> {
        ClaimRequest {
            fingerprint: &FP,
            method: "/s.S/M",
            caller: "-",
            token: [token; 16],
            now_ms,
            lease_until_ms: now_ms + 1_000,
            expires_ms: now_ms + 10_000,
            sole_owner: None,
            retry_in_doubt: false,
            origin: None,
            at_quota: false,
            serial: None,
        }
    }

    #[test]
    fn a_record_head_reads_the_state_caller_and_expiry_of_the_stored_bytes() {
        use prost::Message;
        let record = Record {
            version: 1,
            state: State::Completed as i32,
            fingerprint: FP.to_vec(),
            method: "/s.S/M".into(),
            caller: "billing".into(),
            created_ms: 5,
            expires_ms: 10_005,
            token: vec![1; 16],
            response: Some(Response {
                body: vec![9; 4_096].into(),
                ..Response::default()
            }),
            ..Record::default()
        };
        let head = crate::pb::idemproxy::v1::RecordHead::decode(&record.encode_to_vec()[..])
            .expect("a record's bytes are a head's");
        assert_eq!(head.state(), State::Completed);
        assert_eq!(head.caller, "billing");
        assert_eq!(head.expires_ms, 10_005);
    }

    fn put(change: Change) -> Record {
        match change {
            Change::Put(record) => record,
            other => panic!("expected a put, got {other:?}"),
        }
    }

    fn ok_response() -> Response {
        Response {
            http_status: 200,
            grpc_status: 0,
            body: b"\0\0\0\0\x01z".to_vec().into(),
            ..Response::default()
        }
    }

    #[test]
    fn classification_follows_the_design_table() {
        let of = |grpc_status, trailers_only| {
            classify(&Response {
                grpc_status,
                trailers_only,
                ..Response::default()
            })
        };
        for code in [0, 3, 5, 6, 9, 11, 12] {
            assert_eq!(of(code, false), Disposition::Record, "code {code}");
        }
        for code in [16, 7, 8, 10] {
            assert_eq!(of(code, true), Disposition::Release, "code {code}");
        }
        assert_eq!(of(14, true), Disposition::Release);
        assert_eq!(of(14, false), Disposition::InDoubt);
        for code in [1, 2, 4, 13, 15, 99] {
            assert_eq!(of(code, true), Disposition::InDoubt, "code {code}");
        }
    }

    #[test]
    fn first_claim_owns_then_duplicates_wait() {
        let (change, claimed) = claim(None, &request(1, 100));
        assert_eq!(claimed, Claimed::Owned);
        let record = put(change);
        assert_eq!(record.state(), State::InFlight);
        let (change, claimed) = claim(Some(&record), &request(2, 200));
        assert_eq!(change, Change::Keep);
        assert_eq!(
            claimed,
            Claimed::InProgress {
                lease_until_ms: 1_100
            }
        );
    }

    #[test]
    fn other_payload_is_key_reuse_in_every_state() {
        let record = put(claim(None, &request(1, 100)).0);
        let mut other = request(2, 200);
        other.fingerprint = &OTHER_FP;
        assert_eq!(
            claim(Some(&record), &other).1,
            Claimed::KeyReused {
                state: State::InFlight
            }
        );
        let done = put(complete(Some(&record), &[1; 16], Some(ok_response()), 150, 10_100).0);
        assert_eq!(
            claim(Some(&done), &other).1,
            Claimed::KeyReused {
                state: State::Completed
            }
        );
    }

    #[test]
    fn completed_replays_until_expiry() {
        let record = put(claim(None, &request(1, 100)).0);
        let done = put(complete(Some(&record), &[1; 16], Some(ok_response()), 150, 10_100).0);
        assert_eq!(
            claim(Some(&done), &request(2, 10_099)).1,
            Claimed::Replay(ok_response())
        );
        assert_eq!(claim(Some(&done), &request(3, 10_100)).1, Claimed::Owned);
    }

    #[test]
    fn lease_expiry_makes_in_doubt_never_owned() {
        let record = put(claim(None, &request(1, 100)).0);
        let (change, claimed) = claim(Some(&record), &request(2, 1_100));
        assert!(matches!(claimed, Claimed::InDoubt { .. }));
        assert_eq!(put(change).state(), State::InDoubt);
    }

    #[test]
    fn a_sole_owner_sees_another_incarnation_claim_as_ended() {
        let record = put(claim(None, &request(1, 100)).0);
        let mut same_process = request(1, 200);
        same_process.token = [1; 16];
        same_process.sole_owner = Some([1; 8]);
        assert!(matches!(
            claim(Some(&record), &same_process).1,
            Claimed::InProgress { .. }
        ));
        let mut restarted = request(2, 200);
        restarted.sole_owner = Some([2; 8]);
        let (change, claimed) = claim(Some(&record), &restarted);
        assert!(
            matches!(claimed, Claimed::InDoubt { .. }),
            "never re-run, though the lease is live"
        );
        assert_eq!(put(change).state(), State::InDoubt);
        // A shared store knows nothing of incarnations: a live lease is in progress.
        assert!(matches!(
            claim(Some(&record), &request(2, 200)).1,
            Claimed::InProgress { .. }
        ));
    }

    #[test]
    fn only_the_token_owner_completes_or_releases() {
        let record = put(claim(None, &request(1, 100)).0);
        let stranger = [9; 16];
        assert_eq!(
            complete(Some(&record), &stranger, Some(ok_response()), 1, 2).1,
            Fenced::NotOwner
        );
        assert_eq!(release(Some(&record), &stranger).1, Fenced::NotOwner);
        assert_eq!(release(None, &[1; 16]).1, Fenced::NotOwner);
        assert_eq!(release(Some(&record), &[1; 16]).0, Change::Delete);
    }

    #[test]
    fn late_owner_completes_its_in_doubt_record() {
        let record = put(claim(None, &request(1, 100)).0);
        let doubted = put(mark_in_doubt(Some(&record), &[1; 16], "reset").0);
        let (change, fenced) = complete(Some(&doubted), &[1; 16], Some(ok_response()), 5, 9);
        assert_eq!(fenced, Fenced::Applied);
        assert_eq!(put(change).state(), State::Completed);
    }

    #[test]
    fn a_new_claim_fences_the_old_token() {
        let record = put(claim(None, &request(1, 100)).0);
        let done = put(complete(Some(&record), &[1; 16], None, 150, 200).0);
        assert!(done.response_not_kept);
        let reclaimed = put(claim(Some(&done), &request(2, 300)).0);
        assert_eq!(release(Some(&reclaimed), &[1; 16]).1, Fenced::NotOwner);
    }

    #[test]
    fn recovery_sweep_and_eviction_never_free_an_unknown_outcome() {
        let record = put(claim(None, &request(1, 100)).0);
        assert_eq!(put(recover(Some(&record), None)).state(), State::InDoubt);
        assert_eq!(
            recover(Some(&record), Some(&[1; 8])),
            Change::Keep,
            "still ours"
        );
        assert_eq!(evict(Some(&record)), Change::Keep);
        assert_eq!(sweep(Some(&record), 500), Change::Keep);
        assert_eq!(put(sweep(Some(&record), 1_100)).state(), State::InDoubt);
        let doubted = put(recover(Some(&record), Some(&[2; 8])));
        assert_eq!(evict(Some(&doubted)), Change::Keep);
        assert_eq!(sweep(Some(&doubted), 10_100), Change::Delete);
    }
}
