//! Audit: the decision record every release writes, and where it goes.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::table::Revision;
use super::{DataClass, Party, Purpose};
use crate::ids::BusinessId;
use crate::store::HoldScope;
use crate::time::Timestamp;

/// Identifies one decision: a random 64-bit instance (one per [`Gate`])
/// and a sequence number counted by that instance.
///
/// Written `iiiiiiiiiiiiiiii-ssssssssssssssss` (16 + 16 lowercase hex
/// digits). Ids are unique within a process without a global lock: each gate
/// draws its instance at random and counts with one atomic; two gates share
/// an instance with probability 2^-64 per pair.
///
/// [`Gate`]: super::Gate
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecisionId {
    instance: u64,
    sequence: u64,
}

impl DecisionId {
    /// The id with this instance and sequence number.
    pub const fn new(instance: u64, sequence: u64) -> Self {
        Self { instance, sequence }
    }

    /// The gate instance that made the decision.
    pub const fn instance(self) -> u64 {
        self.instance
    }

    /// The decision's number within its instance, from 1.
    pub const fn sequence(self) -> u64 {
        self.sequence
    }
}

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.instance, self.sequence)
    }
}

impl fmt::Debug for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DecisionId({self})")
    }
}

/// A string that is not a decision id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a decision id is 16 lowercase hex digits, '-', 16 lowercase hex digits")]
#[non_exhaustive]
pub struct BadDecisionId;

impl FromStr for DecisionId {
    type Err = BadDecisionId;

    fn from_str(s: &str) -> Result<Self, BadDecisionId> {
        fn half(s: &str) -> Result<u64, BadDecisionId> {
            let canonical = s.len() == 16
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !canonical {
                return Err(BadDecisionId);
            }
            u64::from_str_radix(s, 16).map_err(|_| BadDecisionId)
        }
        let (instance, sequence) = s.split_once('-').ok_or(BadDecisionId)?;
        Ok(Self::new(half(instance)?, half(sequence)?))
    }
}

impl Serialize for DecisionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DecisionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a release was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The value was released to be handed over. The decision is recorded
    /// before the value leaves the gate (a release is never made that the
    /// trail does not show), so an attempt whose hand-over then fails, and
    /// each attempt made again, has an `Allow` of its own: the trail shows
    /// every release, not only the hand-overs that succeeded.
    Allow,
    /// The value was kept.
    Deny,
}

/// Why a release was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DenyReason {
    /// The policy does not allow the cell.
    Policy,
    /// An opt-in service, and the value's business has not opted in (or the
    /// value belongs to no business).
    NotOptedIn,
    /// The policy allowed it, but the audit sink failed to record the
    /// decision, so the value was kept (fail closed).
    AuditFailed,
}

/// One release decision: the audit event. It never holds the value.
///
/// Read back, a field it does not have is refused (as by every audit
/// record): a reader takes no line for a decision that a sink never wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Decision {
    /// When it was decided, from the gate's clock.
    pub at: Timestamp,
    /// Its unique id.
    pub id: DecisionId,
    /// The revision of the policy that decided.
    pub revision: Revision,
    /// Who asked to receive the value.
    pub party: Party,
    /// The class of the value.
    pub class: DataClass,
    /// What for.
    pub purpose: Purpose,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// Why it was denied; `None` when allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    /// The business the value belongs to, if it belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business: Option<BusinessId>,
}

impl Decision {
    /// Whether the value was released to be handed over: the hand-over
    /// may then have failed, or not been made (see [`Verdict::Allow`]).
    pub const fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow)
    }
}

/// Why an audit sink could not record a decision. Its text is logged as
/// given: a sink keeps phone numbers and content out of it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Writing to the sink's destination failed.
    #[error("audit write failed: {0}")]
    Io(Arc<io::Error>),
    /// The sink failed earlier and records nothing more: what reached its
    /// destination after the failure is unknown.
    #[error("audit sink is out of service after an earlier write failure")]
    OutOfService,
    /// The decision could not be encoded.
    #[error("audit event could not be encoded: {0}")]
    Encode(String),
}

/// Where decisions are recorded.
///
/// `record` is called on every release, from many threads at once: keep it
/// short and synchronous (buffer, or hand off to a queue of your own). An
/// error makes the gate keep the value (fail closed). It runs under the
/// gate's read locks of the policy (and, for an opt-in service, of the
/// opt-ins), which releases share, so that a policy put in force or an
/// opt-out is recorded before a decision it governs or after its value is
/// out; `record_change` runs under the matching write lock. So a sink must
/// not call back into the gate.
pub trait AuditSink: Send + Sync {
    /// Record one decision.
    fn record(&self, decision: &Decision) -> Result<(), AuditError>;

    /// Record a legal hold being placed or released.
    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError>;

    /// Record an administrative change before it is made: an early shred,
    /// a retention or visibility policy put in force, a business opting in
    /// or out.
    fn record_change(&self, change: &Change) -> Result<(), AuditError>;
}

impl<S: AuditSink + ?Sized> AuditSink for Arc<S> {
    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        (**self).record(decision)
    }

    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        (**self).record_hold(event)
    }

    fn record_change(&self, change: &Change) -> Result<(), AuditError> {
        (**self).record_change(change)
    }
}

/// An administrative change, recorded before it is made (a change the
/// trail cannot record is not made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change", deny_unknown_fields)]
#[non_exhaustive]
pub enum Change {
    /// A business's epoch key destroyed before its epoch ends, on request
    /// (see `Retention::shred_epoch`).
    Shred {
        /// When.
        at: Timestamp,
        /// Who asked (empty in trails written before shreds named them).
        #[serde(default)]
        principal: String,
        /// Whose key.
        business: BusinessId,
        /// The end of the key's epoch.
        epoch_end: Timestamp,
        /// The case or request it serves.
        reference: String,
    },
    /// A retention policy put in force.
    Retention {
        /// When.
        at: Timestamp,
        /// Who put it in force.
        principal: String,
        /// What it says ([`RetentionPolicy::digest`](crate::retention::RetentionPolicy::digest)).
        digest: String,
    },
    /// A visibility policy put in force.
    Policy {
        /// When.
        at: Timestamp,
        /// Who put it in force.
        principal: String,
        /// Its revision.
        revision: Revision,
        /// What it allows ([`VisibilityPolicy::digest`](super::VisibilityPolicy::digest)):
        /// two tables given one revision are told apart.
        digest: String,
    },
    /// A processor started, with these policies in force (from the host's
    /// configuration, which no earlier change need have recorded).
    Start {
        /// When.
        at: Timestamp,
        /// The visibility policy's revision.
        revision: Revision,
        /// The visibility policy's digest.
        visibility: String,
        /// The retention policy's digest.
        retention: String,
    },
    /// A business enabled or disabled the opt-in services.
    OptIn {
        /// When.
        at: Timestamp,
        /// Who, for the business.
        principal: String,
        /// The business.
        business: BusinessId,
        /// Enabled (`true`) or disabled.
        enabled: bool,
    },
}

impl Change {
    /// When it was made.
    pub fn at(&self) -> Timestamp {
        match self {
            Self::Shred { at, .. }
            | Self::Retention { at, .. }
            | Self::Policy { at, .. }
            | Self::Start { at, .. }
            | Self::OptIn { at, .. } => *at,
        }
    }
}

/// What happened to a legal hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldAction {
    /// The hold was placed: what it covers is no longer deleted or shredded.
    Placed,
    /// The hold was released: the next sweep catches up.
    Released,
}

/// A legal hold placed or released: an audit event of its own, since holds
/// suspend retention.
///
/// The trail keeps the event, [`scope`](Self::scope) included, for as long
/// as the host keeps the trail. A hold on one consumer
/// ([`HoldScope::Consumer`]) names the consumer by its keyed phone hash,
/// which so stays in the trail after the hold is released and retention
/// has deleted the consumer's messages and sessions: the trail must say
/// what a hold covered. The hash is pseudonymous: only the business's
/// phone-index key links it to a number
/// ([`KeyManager::phone_hash`](crate::keys::KeyManager::phone_hash)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldEvent {
    /// When.
    pub at: Timestamp,
    /// Who asked (empty in trails written before holds named them).
    #[serde(default)]
    pub principal: String,
    /// Placed or released.
    pub action: HoldAction,
    /// What the hold covers.
    pub scope: HoldScope,
    /// The case or order it serves.
    pub reference: String,
}

/// One line of the trail a [`JsonLinesSink`] writes: a release decision
/// (a [`Decision`] object), or, tagged, a legal hold event
/// (`{"hold": {...}}`) or an administrative change (`{"admin": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrailEntry {
    /// A release decision.
    Decision(Decision),
    /// A legal hold placed or released.
    Hold(HoldEvent),
    /// An administrative change.
    Change(Change),
}

/// Why the trail could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrailError {
    /// A line that is no entry: one a failed write or a dying process cut
    /// (the sink ends such a line with ` <cut>`; a trail's last line
    /// without its `\n` is cut too, though it holds a whole entry: its
    /// record was refused), or one damaged or not written by a sink (a
    /// field no entry has, a denial without its reason). Its text is not
    /// repeated here, whatever it holds. The lines after it are read as
    /// usual: skipping it loses no other.
    #[error("audit trail line {line} is no entry: {what} at column {column}")]
    Unreadable {
        /// Its number, from 1.
        line: u64,
        /// Where reading it stopped (0 when the JSON was whole).
        column: usize,
        /// What is wrong, in a few words.
        what: &'static str,
    },
    /// The reader failed; nothing more is read.
    #[error("reading the audit trail failed: {0}")]
    Io(#[from] io::Error),
}

impl TrailEntry {
    /// Read one line of the trail, with or without its `\n`. A line
    /// alone cannot tell a whole entry from one cut just before its `\n`:
    /// read a trail with [`read_trail`], which can.
    ///
    /// # Errors
    ///
    /// [`TrailError::Unreadable`] (as line 1) if it is no entry.
    pub fn from_line(line: &[u8]) -> Result<Self, TrailError> {
        Self::read(line, 1)
    }

    fn read(line: &[u8], number: u64) -> Result<Self, TrailError> {
        /// The tagged events, as `JsonLinesSink::write_event` writes them.
        #[derive(Deserialize)]
        enum Event {
            #[serde(rename = "hold")]
            Hold(HoldEvent),
            #[serde(rename = "admin")]
            Change(Change),
        }
        // A sink writes the tag first, with no space: the line's opening
        // tells the shapes apart without reading it twice.
        let object = line.starts_with(b"{");
        let read = if line.starts_with(br#"{"hold":"#) || line.starts_with(br#"{"admin":"#) {
            serde_json::from_slice(line).map(|event| match event {
                Event::Hold(hold) => Self::Hold(hold),
                Event::Change(change) => Self::Change(change),
            })
        } else if object {
            // A decision says why it was denied, and only then.
            serde_json::from_slice(line).and_then(|d: Decision| {
                if d.is_allowed() == d.reason.is_none() {
                    Ok(Self::Decision(d))
                } else {
                    Err(serde::de::Error::custom("verdict and reason disagree"))
                }
            })
        } else {
            // Not an array either, which would read as a decision's fields
            // in order.
            Err(serde::de::Error::custom("not an object"))
        };
        read.map_err(|e| TrailError::Unreadable {
            line: number,
            column: e.column(),
            // Only the kind of failure: serde's own message may quote the
            // line, and a damaged line may hold anything.
            what: if line.ends_with(CUT) || line.ends_with(&CUT[..CUT.len() - 1]) {
                "a line cut short"
            } else if object && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() {
                "not the shape of an entry"
            } else {
                "not a JSON object"
            },
        })
    }
}

/// Read a trail a [`JsonLinesSink`] wrote, one entry per line. A line that
/// is no entry (one cut short, say, or a last line without its `\n`) is a
/// [`TrailError::Unreadable`] of its own, and reading goes on after it; a
/// failed read ([`TrailError::Io`]) ends the iteration.
///
/// Under [`FlushPolicy::Buffered`] a crash loses the decisions still
/// buffered, whose values were released: a last line without its `\n` may
/// be one of them (a later record's write failed just after it), and is
/// read as cut all the same. Under [`FlushPolicy::EveryEvent`] (the
/// default) it is always a record that was refused.
///
/// ```
/// use custodian::visibility::{read_trail, TrailEntry, TrailError};
///
/// let trail = b"{\"admin\":{\"change\":\"retention\",\"at\":1,\"principal\":\"ops\",\"digest\":\"ab\"}}\n\
///               {\"at\":2,\"id\":\"00 <cut>\n";
/// let mut entries = read_trail(&trail[..]);
/// assert!(matches!(entries.next(), Some(Ok(TrailEntry::Change(_)))));
/// assert!(matches!(entries.next(), Some(Err(TrailError::Unreadable { line: 2, .. }))));
/// assert!(entries.next().is_none());
/// ```
pub fn read_trail<R: io::BufRead>(
    mut reader: R,
) -> impl Iterator<Item = Result<TrailEntry, TrailError>> {
    let mut number = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => {
                done = true;
                None
            }
            Ok(_) => {
                number += 1;
                let Some(whole) = line.strip_suffix(b"\n") else {
                    // Every line a sink writes ends with `\n`: this one's
                    // write failed, or its process died, before the end.
                    done = true;
                    return Some(Err(TrailError::Unreadable {
                        line: number,
                        column: line.len(),
                        what: "a line cut short",
                    }));
                };
                Some(TrailEntry::read(whole, number))
            }
            Err(e) => {
                done = true;
                Some(Err(TrailError::Io(e)))
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the state consistent at each step,
    // so a panic elsewhere while holding the lock is no reason to stop auditing.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps decisions in memory: for tests, and as a bounded ring of the
/// latest decisions for inspection.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    inner: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Decision>,
    capacity: Option<usize>,
    recorded: u64,
    holds: Vec<HoldEvent>,
    changes: Vec<Change>,
}

impl MemoryAuditSink {
    /// A sink that keeps every decision (memory grows with each release).
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that keeps the latest `capacity` decisions (at least one),
    /// dropping the oldest. Memory grows with the decisions kept, not with
    /// the bound.
    pub fn bounded(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(1024)),
                capacity: Some(capacity),
                recorded: 0,
                holds: Vec::new(),
                changes: Vec::new(),
            }),
        }
    }

    /// The decisions kept, oldest first.
    pub fn events(&self) -> Vec<Decision> {
        lock(&self.inner).events.iter().copied().collect()
    }

    /// Removes and returns the decisions kept, oldest first.
    pub fn take(&self) -> Vec<Decision> {
        lock(&self.inner).events.drain(..).collect()
    }

    /// How many decisions were ever recorded (including any dropped by the bound).
    pub fn recorded(&self) -> u64 {
        lock(&self.inner).recorded
    }

    /// Every legal-hold event, oldest first (never dropped by the bound).
    pub fn hold_events(&self) -> Vec<HoldEvent> {
        lock(&self.inner).holds.clone()
    }

    /// Every administrative change, oldest first (never dropped by the
    /// bound).
    pub fn changes(&self) -> Vec<Change> {
        lock(&self.inner).changes.clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        let mut ring = lock(&self.inner);
        if ring.capacity.is_some_and(|c| ring.events.len() >= c) {
            ring.events.pop_front();
        }
        ring.events.push_back(*decision);
        ring.recorded += 1;
        Ok(())
    }

    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        lock(&self.inner).holds.push(event.clone());
        Ok(())
    }

    fn record_change(&self, change: &Change) -> Result<(), AuditError> {
        lock(&self.inner).changes.push(change.clone());
        Ok(())
    }
}

/// When a [`JsonLinesSink`] writes its lines to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushPolicy {
    /// Write and flush each line before `record` returns: a released value's
    /// decision is in the operating system's hands before the value leaves.
    /// One write per release.
    EveryEvent,
    /// Buffer lines; write when `max_bytes` are buffered, or when a decision
    /// is at least `max_delay` (by decision time) after the last write, or on
    /// [`JsonLinesSink::flush`] and drop. Decisions still in the buffer are
    /// lost if the process dies: call `flush` from a timer to bound that.
    Buffered {
        /// Buffer size that triggers a write.
        max_bytes: usize,
        /// Longest time between writes while decisions keep coming.
        max_delay: Duration,
    },
}

impl FlushPolicy {
    /// Buffered, 64 KiB or one second.
    pub const BUFFERED: Self = Self::Buffered {
        max_bytes: 64 << 10,
        max_delay: Duration::from_secs(1),
    };
}

impl Default for FlushPolicy {
    /// [`FlushPolicy::EveryEvent`]: the audit trail comes before throughput.
    fn default() -> Self {
        Self::EveryEvent
    }
}

/// Appends decisions to a writer (normally a file), one JSON object per line.
///
/// After a write error the sink is out of service: every later `record`
/// fails (so the gate keeps every value) until the host, the cause mended
/// (space freed, say), calls [`resume`](Self::resume). The record whose
/// write failed is withdrawn (it was refused, so what it says did not
/// happen); lines buffered before it, whose records succeeded, are kept
/// and written then, unless the host takes them
/// ([`take_unwritten`](Self::take_unwritten)). The file may hold a whole
/// line whose flush failed (with a writer that buffers), whose value the
/// gate kept, and a partial line where a failed write or a dying process
/// cut one: the sink (or the next one opened on the file) ends it with
/// ` <cut>` before its own first line, so that it never parses (even cut
/// just before its `\n`), and a reader that skips lines that do not parse
/// loses no other. (A file the sink may only append to, whose end it cannot
/// read, gets that ending too: a line of its own if the file ended whole.)
pub struct JsonLinesSink<W: Write + Send = File> {
    flush: FlushPolicy,
    inner: Mutex<Lines<W>>,
}

struct Lines<W> {
    writer: Option<W>,
    buf: Vec<u8>,
    last_write: Option<Timestamp>,
    failed: bool,
    /// What the writer took ends mid-line.
    mid_line: bool,
    /// End that line before writing any other (its rest was taken, or it
    /// was in the file when the sink opened it).
    end_line: bool,
}

impl JsonLinesSink<File> {
    /// Appends to the file at `path`, creating it if needed, writing every
    /// line at once ([`FlushPolicy::EveryEvent`]).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_with(path, FlushPolicy::default())
    }

    /// Appends to the file at `path`, creating it if needed. A partial last
    /// line (a writer stopped mid-line) is ended before the first new one.
    pub fn open_with(path: impl AsRef<Path>, flush: FlushPolicy) -> io::Result<Self> {
        let path = path.as_ref();
        let readable = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path);
        let (file, cut) = match readable {
            Ok(mut file) => {
                let mut last = [b'\n'];
                if file.metadata()?.len() > 0 {
                    file.seek(SeekFrom::End(-1))?;
                    file.read_exact(&mut last)?;
                }
                (file, last[0] != b'\n')
            }
            // An audit file the process may only append to: whether it
            // ends mid-line is unknown, and a line that does not parse does
            // no harm.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                let cut = file.metadata()?.len() > 0;
                (file, cut)
            }
            Err(e) => return Err(e),
        };
        let sink = Self::new(file, flush);
        if cut {
            lock(&sink.inner).cut();
        }
        Ok(sink)
    }
}

impl<W: Write + Send> JsonLinesSink<W> {
    /// Writes lines to `writer`.
    pub fn new(writer: W, flush: FlushPolicy) -> Self {
        Self {
            flush,
            inner: Mutex::new(Lines {
                writer: Some(writer),
                buf: Vec::with_capacity(256),
                last_write: None,
                failed: false,
                mid_line: false,
                end_line: false,
            }),
        }
    }

    /// Writes and flushes every buffered line.
    pub fn flush(&self) -> Result<(), AuditError> {
        lock(&self.inner).write_out()
    }

    /// After a write error: the bytes of the lines the writer never took
    /// (the first may be the rest of a partial line), taken out of the
    /// sink. With [`FlushPolicy::Buffered`] they can hold decisions whose
    /// values were released: keep them elsewhere before replacing the sink.
    pub fn take_unwritten(&self) -> Vec<u8> {
        let mut lines = lock(&self.inner);
        lines.end_line |= lines.mid_line;
        std::mem::take(&mut lines.buf)
    }

    /// Puts the sink back in service after a write error, once its cause is
    /// mended, and writes the lines it holds (ending first a line the
    /// failure cut, if its rest was taken). If writing fails again, the
    /// sink stays out of service and the error is returned.
    pub fn resume(&self) -> Result<(), AuditError> {
        let mut lines = lock(&self.inner);
        lines.failed = false;
        lines.write_out()
    }

    /// Flushes, then returns the writer. On an error the sink is gone with
    /// the lines it could not write: to keep them, [`flush`](Self::flush)
    /// and [`take_unwritten`](Self::take_unwritten) first.
    pub fn into_inner(mut self) -> Result<W, AuditError> {
        let lines = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        lines.write_out()?;
        lines.writer.take().ok_or(AuditError::OutOfService)
    }
}

/// What ends a line a failure cut: text no JSON continues with (no quote
/// closes a string before it, no bracket an object), so the line never
/// parses, even when the cut took only its `\n`.
const CUT: &[u8] = b" <cut>\n";

impl<W: Write> Lines<W> {
    /// The file ends mid-line: end that line before writing any other.
    fn cut(&mut self) {
        self.mid_line = true;
        self.end_line = true;
    }

    /// [`write_out`](Self::write_out), the buffer's last `line` bytes being
    /// the record the caller is writing: if the write fails, that record is
    /// refused, so its line is withdrawn (what it says did not happen), and
    /// if the writer took part of it, the cut is ended before the next line.
    fn write_out_record(&mut self, line: usize) -> Result<(), AuditError> {
        let result = self.write_out();
        if result.is_err() {
            match self.buf.len().checked_sub(line) {
                Some(before) => self.buf.truncate(before),
                // The writer took its line whole (its flush failed): no
                // cut to end.
                None if !self.mid_line => {}
                None => {
                    self.buf.clear();
                    self.cut();
                }
            }
        }
        result
    }

    fn write_out(&mut self) -> Result<(), AuditError> {
        if self.failed {
            return Err(AuditError::OutOfService);
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(AuditError::OutOfService);
        };
        if std::mem::take(&mut self.end_line) {
            self.buf.splice(0..0, CUT.iter().copied());
        }
        // What was not written stays, for `take_unwritten`.
        let mut written = 0;
        let result = loop {
            let Some(rest) = self.buf.get(written..).filter(|r| !r.is_empty()) else {
                break writer.flush();
            };
            match writer.write(rest) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if let Some(&last) = written.checked_sub(1).and_then(|i| self.buf.get(i)) {
            self.mid_line = last != b'\n';
        }
        self.buf.drain(..written.min(self.buf.len()));
        result.map_err(|e| {
            self.failed = true;
            AuditError::Io(Arc::new(e))
        })
    }
}

impl<W: Write + Send> JsonLinesSink<W> {
    /// Write a rare event at once, as `{"<tag>": {...}}` so readers tell it
    /// from release decisions.
    fn write_event(
        &self,
        tag: &str,
        event: &impl Serialize,
        at: Timestamp,
    ) -> Result<(), AuditError> {
        let mut lines = lock(&self.inner);
        if lines.failed {
            return Err(AuditError::OutOfService);
        }
        let start = lines.buf.len();
        if let Err(e) = serde_json::to_writer(&mut lines.buf, &serde_json::json!({ tag: event })) {
            lines.buf.truncate(start);
            return Err(AuditError::Encode(e.to_string()));
        }
        lines.buf.push(b'\n');
        lines.last_write = Some(at);
        let line = lines.buf.len() - start;
        lines.write_out_record(line)
    }
}

impl<W: Write + Send> AuditSink for JsonLinesSink<W> {
    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        // Hold events are rare and suspend retention: written at once.
        self.write_event("hold", event, event.at)
    }

    fn record_change(&self, change: &Change) -> Result<(), AuditError> {
        self.write_event("admin", change, change.at())
    }

    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        let mut lines = lock(&self.inner);
        if lines.failed {
            return Err(AuditError::OutOfService);
        }
        let start = lines.buf.len();
        if let Err(e) = serde_json::to_writer(&mut lines.buf, decision) {
            lines.buf.truncate(start);
            return Err(AuditError::Encode(e.to_string()));
        }
        lines.buf.push(b'\n');
        let due = match self.flush {
            FlushPolicy::EveryEvent => true,
            FlushPolicy::Buffered {
                max_bytes,
                max_delay,
            } => {
                lines.buf.len() >= max_bytes
                    || lines
                        .last_write
                        .is_none_or(|t| decision.at.saturating_duration_since(t) >= max_delay)
            }
        };
        if due {
            lines.last_write = Some(decision.at);
            let line = lines.buf.len() - start;
            lines.write_out_record(line)?;
        }
        Ok(())
    }
}

impl<W: Write + Send> Drop for JsonLinesSink<W> {
    fn drop(&mut self) {
        let lines = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !lines.buf.is_empty() {
            // Nowhere to report an error from drop; call `flush` first to see it.
            let _ = lines.write_out();
        }
    }
}

impl<W: Write + Send> fmt::Debug for JsonLinesSink<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines = lock(&self.inner);
        f.debug_struct("JsonLinesSink")
            .field("flush", &self.flush)
            .field("buffered_bytes", &lines.buf.len())
            .field("failed", &lines.failed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decision(seq: u64, at: u64) -> Decision {
        Decision {
            at: Timestamp::from_millis(at),
            id: DecisionId::new(0xabc, seq),
            revision: Revision::PUBLISHED,
            party: Party::Transport,
            class: DataClass::ConsumerPhoneNumber,
            purpose: Purpose::Delivery,
            verdict: Verdict::Allow,
            reason: None,
            business: BusinessId::new(7),
        }
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn decision_serializes_to_the_documented_shape() {
        let json = serde_json::to_string(&decision(1, 5)).unwrap();
        assert_eq!(
            json,
            r#"{"at":5,"id":"0000000000000abc-0000000000000001","revision":0,"party":"transport","class":"consumer_phone_number","purpose":"delivery","verdict":"allow","business":7}"#
        );
        let back: Decision = serde_json::from_str(&json).unwrap();
        assert_eq!(back, decision(1, 5));
    }

    /// Shreds and hold events name who asked; a trail written before they
    /// did still reads back, the principal empty.
    #[test]
    fn shred_and_hold_records_read_back_old_and_new() {
        let business = BusinessId::new(7).unwrap();
        let hold = HoldEvent {
            at: Timestamp::from_millis(5),
            principal: "operator".into(),
            action: HoldAction::Placed,
            scope: HoldScope::Business(business),
            reference: "case-1".into(),
        };
        let json = serde_json::to_string(&hold).unwrap();
        assert!(json.contains(r#""principal":"operator""#), "{json}");
        assert_eq!(serde_json::from_str::<HoldEvent>(&json).unwrap(), hold);
        let old = json.replace(r#""principal":"operator","#, "");
        let read: HoldEvent = serde_json::from_str(&old).unwrap();
        assert_eq!(read.principal, "");
        assert_eq!(read.reference, "case-1");

        let shred = Change::Shred {
            at: Timestamp::from_millis(5),
            principal: "operator".into(),
            business,
            epoch_end: Timestamp::from_millis(9),
            reference: "breach".into(),
        };
        let json = serde_json::to_string(&shred).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), shred);
        let old = json.replace(r#""principal":"operator","#, "");
        assert_ne!(old, json);
        let Change::Shred { principal, .. } = serde_json::from_str(&old).unwrap() else {
            panic!("not a shred: {old}");
        };
        assert_eq!(principal, "");
    }

    /// Lines no sink writes are refused, however close to one: a key
    /// beside the entry, an entry twice, a field twice.
    #[test]
    fn lines_with_keys_no_sink_writes_are_refused() {
        let hold = r#"{"hold":{"at":5,"principal":"op","action":"placed","scope":{"business":7},"reference":"c"}}"#;
        assert!(
            TrailEntry::from_line(hold.as_bytes()).is_ok(),
            "the sink's own line"
        );
        let cases = [
            r#"{"hold":{"at":5,"principal":"op","action":"placed","scope":{"business":7},"reference":"c"},"x":1}"#,
            r#"{"hold":{"at":5,"principal":"op","action":"placed","scope":{"business":7},"reference":"c"},"hold":{"at":6,"principal":"op","action":"released","scope":{"business":7},"reference":"c"}}"#,
            r#"{"admin":{"change":"retention","at":1,"principal":"ops","digest":"ab"},"admin":{"change":"retention","at":2,"principal":"x","digest":"cd"}}"#,
            r#"{"admin":{"change":"retention","at":1,"principal":"ops","digest":"ab","change":"policy"}}"#,
            r#"{"at":2,"id":"0000000000000abc-0000000000000001","revision":0,"party":"transport","class":"consumer_phone_number","purpose":"delivery","verdict":"allow","business":7,"business":8}"#,
        ];
        for line in cases {
            let read = TrailEntry::from_line(line.as_bytes());
            assert!(read.is_err(), "{line}\n  read as {read:?}");
        }
    }

    #[test]
    fn bounded_memory_sink_keeps_the_latest() {
        let sink = MemoryAuditSink::bounded(2);
        for i in 1..=5 {
            sink.record(&decision(i, i)).unwrap();
        }
        let kept: Vec<u64> = sink.events().iter().map(|d| d.id.sequence()).collect();
        assert_eq!(kept, [4, 5]);
        assert_eq!(sink.recorded(), 5);
        assert_eq!(sink.take().len(), 2);
        assert!(sink.events().is_empty());
    }

    /// A host may configure a generous bound ("keep the last N decisions",
    /// N from its configuration, `usize::MAX` meaning "no practical
    /// limit"). Before, `bounded` preallocated its whole bound: it crashed
    /// at start with "capacity overflow" for `usize::MAX`, and reserved N
    /// decisions of memory up front for a large but representable N.
    #[test]
    fn bounded_memory_sink_with_a_large_bound_does_not_panic() {
        let sink = MemoryAuditSink::bounded(usize::MAX);
        sink.record(&decision(1, 0)).unwrap();
        assert_eq!(sink.events().len(), 1);
    }

    #[test]
    fn buffered_sink_writes_when_full_late_or_flushed() {
        let sink = JsonLinesSink::new(
            Vec::new(),
            FlushPolicy::Buffered {
                max_bytes: 1 << 20,
                max_delay: Duration::from_secs(1),
            },
        );
        sink.record(&decision(1, 0)).unwrap(); // first write is due at once
        sink.record(&decision(2, 10)).unwrap(); // buffered
        sink.record(&decision(3, 500)).unwrap(); // buffered
        assert!(!format!("{sink:?}").contains("buffered_bytes: 0"));
        sink.record(&decision(4, 1_000)).unwrap(); // a second after the last write
        let out = sink.into_inner().unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 4);
    }

    #[test]
    fn write_failure_puts_the_sink_out_of_service() {
        let sink = JsonLinesSink::new(FailingWriter, FlushPolicy::EveryEvent);
        assert!(matches!(
            sink.record(&decision(1, 0)),
            Err(AuditError::Io(_))
        ));
        assert!(matches!(
            sink.record(&decision(2, 0)),
            Err(AuditError::OutOfService)
        ));
        assert!(matches!(sink.flush(), Err(AuditError::OutOfService)));
    }

    /// Takes `room` bytes, then fails as a full disk does.
    struct FillingWriter {
        taken: Vec<u8>,
        room: usize,
    }
    impl Write for FillingWriter {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let n = bytes.len().min(self.room);
            if n == 0 {
                return Err(io::Error::other("disk full"));
            }
            self.taken.extend_from_slice(&bytes[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A buffered decision whose value was released, and whose write the
    /// disk refused, is not lost: the writer has a part of it, and the rest
    /// is handed back.
    #[test]
    fn buffered_decisions_a_failed_write_did_not_take_are_handed_back() {
        let line = |d: Decision| {
            let mut l = serde_json::to_vec(&d).unwrap();
            l.push(b'\n');
            l
        };
        let first = line(decision(1, 0)).len();
        let sink = JsonLinesSink::new(
            FillingWriter {
                taken: Vec::new(),
                room: first + 10,
            },
            FlushPolicy::Buffered {
                max_bytes: 1 << 20,
                max_delay: Duration::from_secs(1),
            },
        );
        sink.record(&decision(1, 0)).unwrap(); // written at once
        sink.record(&decision(2, 10)).unwrap(); // buffered: its value leaves
        assert!(matches!(
            sink.record(&decision(3, 2_000)),
            Err(AuditError::Io(_))
        ));
        // Decision 3's record failed (its value was kept): withdrawn.
        let mut all = line(decision(1, 0));
        all.extend(line(decision(2, 10)));
        let unwritten = sink.take_unwritten();
        assert_eq!(all[first + 10..], unwritten[..]);
        assert!(sink.take_unwritten().is_empty(), "taken once");
        assert!(matches!(
            sink.record(&decision(4, 3_000)),
            Err(AuditError::OutOfService)
        ));
    }

    /// A disk whose free space, and whether its flushes fail, the test
    /// sets.
    #[derive(Clone, Default)]
    struct Disk(Arc<Mutex<(Vec<u8>, usize, bool)>>);
    impl Write for Disk {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut disk = self.0.lock().unwrap();
            let n = bytes.len().min(disk.1);
            if n == 0 {
                return Err(io::Error::other("disk full"));
            }
            disk.0.extend_from_slice(&bytes[..n]);
            disk.1 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            if self.0.lock().unwrap().2 {
                return Err(io::Error::other("flush failed"));
            }
            Ok(())
        }
    }

    /// The decisions of the lines that parse, in order.
    fn parsed(bytes: &[u8]) -> Vec<u64> {
        bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Decision>(line).ok())
            .map(|d| d.id.sequence())
            .collect()
    }

    /// A gate recording to a sink on `disk`, with that sink.
    fn gated(disk: &Disk) -> (Arc<JsonLinesSink<Disk>>, crate::visibility::Gate) {
        use crate::time::ManualClock;
        use crate::visibility::{Gate, VisibilityPolicy};
        let sink = Arc::new(JsonLinesSink::new(disk.clone(), FlushPolicy::EveryEvent));
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1)));
        let gate = Gate::new(VisibilityPolicy::published(), sink.clone(), clock);
        (sink, gate)
    }

    /// A phone number released to the transport for delivery by `gate`.
    fn release_number(
        gate: &crate::visibility::Gate,
    ) -> Result<crate::visibility::Released<u8>, crate::visibility::Denied<u8>> {
        use crate::visibility::Labelled;
        let number = Labelled::new(DataClass::ConsumerPhoneNumber, 1u8);
        gate.release(number, Party::Transport, Purpose::Delivery)
    }

    /// A disk that fills mid-line puts the sink out of service; freed, the
    /// sink resumes and writes what it held. The record whose write failed
    /// was refused, so its cut line is ended and nothing completes it: the
    /// trail never says its value was released.
    #[test]
    fn a_sink_resumes_after_its_disk_is_freed() {
        let disk = Disk::default();
        disk.0.lock().unwrap().1 = 250;
        let sink = JsonLinesSink::new(disk.clone(), FlushPolicy::EveryEvent);
        sink.record(&decision(1, 0)).unwrap();
        assert!(matches!(
            sink.record(&decision(2, 1)),
            Err(AuditError::Io(_))
        ));
        assert!(
            matches!(sink.resume(), Err(AuditError::Io(_))),
            "still full"
        );
        assert!(matches!(
            sink.record(&decision(3, 2)),
            Err(AuditError::OutOfService)
        ));
        disk.0.lock().unwrap().1 = 1 << 20;
        sink.resume().unwrap();
        sink.record(&decision(4, 3)).unwrap();
        let written = disk.0.lock().unwrap().0.clone();
        assert_eq!(parsed(&written), [1, 4]);
        // The cut line stays, ended: one line that does not parse.
        let lines = written.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        assert_eq!(lines.count(), 3);
    }

    /// A line the writer took whole before its flush failed is no cut: the
    /// resumed sink writes its next line after it, and every line parses.
    /// (It was ended with ` <cut>` on a line of its own, which a reader
    /// took for a cut line.)
    #[test]
    fn a_failed_flush_of_a_whole_line_leaves_no_cut() {
        let disk = Disk::default();
        disk.0.lock().unwrap().1 = 1 << 20;
        let sink = JsonLinesSink::new(disk.clone(), FlushPolicy::EveryEvent);
        sink.record(&decision(1, 0)).unwrap();
        disk.0.lock().unwrap().2 = true;
        assert!(matches!(
            sink.record(&decision(2, 1)),
            Err(AuditError::Io(_))
        ));
        disk.0.lock().unwrap().2 = false;
        sink.resume().unwrap();
        sink.record(&decision(3, 2)).unwrap();
        let written = disk.0.lock().unwrap().0.clone();
        let lines = written.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        assert_eq!(
            (parsed(&written), lines.count()),
            (vec![1, 2, 3], 3),
            "{}",
            String::from_utf8_lossy(&written)
        );
    }

    /// Through the gate: a release whose record failed is refused, and
    /// after the sink resumes no line says it was allowed.
    #[test]
    fn a_resumed_sink_never_records_a_refused_release_as_allowed() {
        use crate::visibility::DenyReason;
        let disk = Disk::default();
        disk.0.lock().unwrap().1 = 250;
        let (sink, gate) = gated(&disk);
        let release = || release_number(&gate);
        assert!(release().is_ok());
        let denied = release().unwrap_err();
        assert_eq!(denied.reason(), DenyReason::AuditFailed);
        let refused = denied.decision().id;
        disk.0.lock().unwrap().1 = 1 << 20;
        sink.resume().unwrap();
        assert!(release().is_ok());
        let written = disk.0.lock().unwrap().0.clone();
        let decisions: Vec<Decision> = written
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect();
        assert_eq!(decisions.len(), 2);
        assert!(decisions.iter().all(|d| d.id != refused));
    }

    /// A sink opened on a cut file whose first write fails before the
    /// writer takes a byte, and whose held lines the host takes, still ends
    /// the cut line before its next decision.
    #[test]
    fn a_cut_file_whose_first_write_fails_still_ends_the_line() {
        let disk = Disk::default();
        disk.0.lock().unwrap().0 = b"{\"at\":17".to_vec();
        let sink = JsonLinesSink::new(disk.clone(), FlushPolicy::EveryEvent);
        lock(&sink.inner).cut(); // as `open_with` finds the file
        assert!(matches!(
            sink.record(&decision(1, 0)),
            Err(AuditError::Io(_))
        ));
        let _elsewhere = sink.take_unwritten();
        disk.0.lock().unwrap().1 = 1 << 20;
        sink.resume().unwrap();
        sink.record(&decision(2, 1)).unwrap();
        let written = disk.0.lock().unwrap().0.clone();
        assert_eq!(
            parsed(&written),
            [2],
            "{}",
            String::from_utf8_lossy(&written)
        );
    }

    /// A file left ending mid-line (a process killed mid-write) keeps the
    /// next sink's first decision on a line of its own.
    #[test]
    fn a_sink_opened_on_a_cut_line_ends_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut whole = serde_json::to_vec(&decision(1, 0)).unwrap();
        whole.push(b'\n');
        let cut = serde_json::to_vec(&decision(2, 1)).unwrap();
        std::fs::write(&path, [&whole[..], &cut[..20]].concat()).unwrap();
        let sink = JsonLinesSink::open(&path).unwrap();
        sink.record(&decision(3, 2)).unwrap();
        drop(sink);
        let sink = JsonLinesSink::open(&path).unwrap();
        sink.record(&decision(4, 3)).unwrap();
        drop(sink);
        assert_eq!(parsed(&std::fs::read(&path).unwrap()), [1, 3, 4]);
    }

    /// A disk that fills with exactly one byte of a record's line left
    /// unwritten (its `\n`): the record fails, the gate keeps the value
    /// (`AuditFailed`), and on `resume` the cut line is ended so that it
    /// does not parse. (Ended with a `\n`, it was a whole, parseable
    /// `allow` line for the refused release.)
    #[test]
    fn a_line_cut_just_before_its_newline_is_not_completed_into_an_allow() {
        use crate::visibility::DenyReason;
        let disk = Disk::default();
        let (sink, gate) = gated(&disk);
        let release = || release_number(&gate);
        disk.0.lock().unwrap().1 = 1 << 20;
        let first = release().unwrap();
        let line_len = {
            let written = disk.0.lock().unwrap().0.len();
            assert_eq!(
                written,
                serde_json::to_vec(first.decision()).unwrap().len() + 1
            );
            written
        };
        // Room for the next line (same length: the ids differ only in the
        // sequence's last digit) but its newline.
        disk.0.lock().unwrap().1 = line_len - 1;
        let denied = release().unwrap_err();
        assert_eq!(denied.reason(), DenyReason::AuditFailed);
        let refused = denied.decision().id;
        disk.0.lock().unwrap().1 = 1 << 20;
        sink.resume().unwrap();
        let written = disk.0.lock().unwrap().0.clone();
        let allowed: Vec<DecisionId> = written
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Decision>(line).ok())
            .filter(|d| d.is_allowed())
            .map(|d| d.id)
            .collect();
        assert!(
            !allowed.contains(&refused),
            "the trail says the refused release {refused} was allowed:\n{}",
            String::from_utf8_lossy(&written)
        );
    }

    /// Any entry a processor records: every kind, with any text in its
    /// free fields (so JSON escapes are written and read).
    fn entry() -> impl Strategy<Value = TrailEntry> {
        let at = any::<u64>().prop_map(Timestamp::from_millis);
        let business = (1..=u64::MAX).prop_map(|b| BusinessId::new(b).unwrap());
        let revision =
            (0..=Revision::MAX.get()).prop_map(|r| Revision::new(r).unwrap_or(Revision::PUBLISHED));
        let decision = (
            at.clone(),
            any::<(u64, u64)>(),
            revision.clone(),
            prop::sample::select(Party::ALL),
            prop::sample::select(DataClass::ALL),
            prop::sample::select(Purpose::ALL),
            prop::option::of(prop::sample::select(vec![
                DenyReason::Policy,
                DenyReason::NotOptedIn,
                DenyReason::AuditFailed,
            ])),
            prop::option::of(business.clone()),
        )
            .prop_map(
                |(at, (i, s), revision, party, class, purpose, reason, business)| {
                    TrailEntry::Decision(Decision {
                        at,
                        id: DecisionId::new(i, s),
                        revision,
                        party,
                        class,
                        purpose,
                        verdict: if reason.is_some() {
                            Verdict::Deny
                        } else {
                            Verdict::Allow
                        },
                        reason,
                        business,
                    })
                },
            );
        let scope = prop_oneof![
            business.clone().prop_map(HoldScope::Business),
            (business.clone(), any::<[u8; 16]>())
                .prop_map(|(b, h)| HoldScope::Consumer(b, crate::ids::PhoneHash::from_bytes(h))),
        ];
        let hold = (at.clone(), "\\PC{0,12}", any::<bool>(), scope, "\\PC{0,12}").prop_map(
            |(at, principal, placed, scope, reference)| {
                TrailEntry::Hold(HoldEvent {
                    at,
                    principal,
                    action: if placed {
                        HoldAction::Placed
                    } else {
                        HoldAction::Released
                    },
                    scope,
                    reference,
                })
            },
        );
        let text = "\\PC{0,12}";
        let change = prop_oneof![
            (at.clone(), text, business.clone(), any::<u64>(), text).prop_map(
                |(at, principal, business, end, reference)| Change::Shred {
                    at,
                    principal,
                    business,
                    epoch_end: Timestamp::from_millis(end),
                    reference,
                }
            ),
            (at.clone(), text, text).prop_map(|(at, principal, digest)| Change::Retention {
                at,
                principal,
                digest
            }),
            (at.clone(), text, revision.clone(), text).prop_map(
                |(at, principal, revision, digest)| Change::Policy {
                    at,
                    principal,
                    revision,
                    digest
                }
            ),
            (at.clone(), revision, text, text).prop_map(|(at, revision, visibility, retention)| {
                Change::Start {
                    at,
                    revision,
                    visibility,
                    retention,
                }
            }),
            (at, text, business, any::<bool>()).prop_map(|(at, principal, business, enabled)| {
                Change::OptIn {
                    at,
                    principal,
                    business,
                    enabled,
                }
            }),
        ]
        .prop_map(TrailEntry::Change);
        prop_oneof![decision, hold, change]
    }

    /// The line a sink writes for `entry`.
    fn written(entry: &TrailEntry) -> Vec<u8> {
        let sink = JsonLinesSink::new(Vec::new(), FlushPolicy::EveryEvent);
        match entry {
            TrailEntry::Decision(d) => sink.record(d),
            TrailEntry::Hold(h) => sink.record_hold(h),
            TrailEntry::Change(c) => sink.record_change(c),
        }
        .unwrap();
        sink.into_inner().unwrap()
    }

    proptest! {
        /// A trail reads back as the entries written, in order; a line cut
        /// anywhere and ended as a sink ends it is one unreadable line,
        /// and every other entry is read.
        #[test]
        fn a_trail_reads_back_and_a_cut_line_loses_no_other(
            entries in prop::collection::vec(entry(), 1..8),
            which: prop::sample::Index,
            at: prop::sample::Index,
        ) {
            let lines: Vec<Vec<u8>> = entries.iter().map(written).collect();
            let whole: Vec<TrailEntry> = read_trail(&lines.concat()[..]).map(Result::unwrap).collect();
            prop_assert_eq!(&whole, &entries);

            let cut = which.index(lines.len());
            let mut trail = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                if i == cut {
                    trail.extend_from_slice(&line[..at.index(line.len())]);
                    trail.extend_from_slice(CUT);
                } else {
                    trail.extend_from_slice(line);
                }
            }
            let mut read = Vec::new();
            for (i, entry) in read_trail(&trail[..]).enumerate() {
                match entry {
                    Ok(entry) => read.push(entry),
                    Err(TrailError::Unreadable { line, what, .. }) => {
                        prop_assert_eq!(line, cut as u64 + 1);
                        prop_assert_eq!(i, cut);
                        prop_assert_eq!(what, "a line cut short");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let mut expected = entries.clone();
            expected.remove(cut);
            prop_assert_eq!(read, expected);
        }

        /// A trail whose last line lost its end, cut anywhere (its record
        /// refused: a write failed, or the process died, and no sink
        /// ended the line since): every other entry is read, and the last
        /// line is cut, never an entry, even with only its `\n` lost.
        #[test]
        fn a_trail_whose_last_line_lost_its_end_reads_it_as_cut(
            entries in prop::collection::vec(entry(), 1..6),
            at: prop::sample::Index,
        ) {
            let lines: Vec<Vec<u8>> = entries.iter().map(written).collect();
            let mut trail = lines.concat();
            let last = lines.last().map_or(0, Vec::len);
            trail.truncate(trail.len() - last + at.index(last));
            let read: Vec<_> = read_trail(&trail[..]).collect();
            let whole = entries.len() - 1;
            for (entry, expected) in read.iter().zip(&entries[..whole]) {
                prop_assert_eq!(entry.as_ref().ok(), Some(expected));
            }
            if at.index(last) == 0 {
                prop_assert_eq!(read.len(), whole);
            } else {
                prop_assert_eq!(read.len(), whole + 1);
                let cut = matches!(
                    read[whole],
                    Err(TrailError::Unreadable { what: "a line cut short", .. })
                );
                prop_assert!(cut, "{:?}", read[whole]);
            }
        }

        #[test]
        fn decision_ids_round_trip_and_parse_strictly(instance: u64, sequence: u64, junk in "\\PC{0,40}") {
            let id = DecisionId::new(instance, sequence);
            prop_assert_eq!(id.to_string().parse::<DecisionId>(), Ok(id));
            if let Ok(parsed) = junk.parse::<DecisionId>() {
                prop_assert_eq!(parsed.to_string(), junk);
            }
        }
    }
}
