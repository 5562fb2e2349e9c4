//! Call detail records, kept in the replicated state so that the death of the node that
//! ran a call loses none: every call, answered or not, ends as one [`Cdr`] (a call
//! adopted by another node is still one record, with every node that ran it).
//!
//! The cluster keeps the records of a window (by age and count, carried in each command
//! so every node prunes alike); PostgreSQL is the archive: the leader ships records in
//! sequence order and commits how far it got ([`CdrLog::shipped_through`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// One call, as Asterisk's CDR users expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cdr {
    /// The caller's Call-ID: the call's name in the cluster and the record's unique id.
    pub uniqueid: String,
    /// When the INVITE came in, answered and ended (unix ms, the running node's clock).
    pub start_ms: u64,
    pub answer_ms: Option<u64>,
    pub end_ms: u64,
    /// The calling user, and its caller id as `"Name" <num>`.
    pub src: String,
    pub clid: String,
    /// The extension dialled, and the dialplan context it ran in.
    pub dst: String,
    pub dcontext: String,
    /// `ANSWERED`, `NO ANSWER`, `BUSY`, `FAILED` or `CONGESTION`.
    pub disposition: String,
    /// The Q.850 cause it ended with (Asterisk's HANGUPCAUSE).
    pub hangup_cause: u16,
    /// The nodes that ran the call, first to last.
    pub nodes: Vec<u64>,
    /// Position in the cluster's record sequence (set when applied).
    pub seq: u64,
}

impl Cdr {
    /// Seconds from start to end (Asterisk's `duration`).
    pub fn duration_secs(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms) / 1000
    }

    /// Seconds from answer to end (Asterisk's `billsec`; 0 when not answered).
    pub fn billsec(&self) -> u64 {
        self.answer_ms
            .map_or(0, |a| self.end_ms.saturating_sub(a) / 1000)
    }
}

/// What the node that answered a call knows of it and an adopter would not: kept while
/// the call runs, merged into its record when another node ends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdrStart {
    pub uniqueid: String,
    pub start_ms: u64,
    pub answer_ms: u64,
    pub src: String,
    pub clid: String,
    pub dst: String,
    pub dcontext: String,
}

/// How long records are kept: by age (from their end) and count. Records not yet in
/// PostgreSQL are kept past their age (`hold_unshipped`) but never past the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdrKeep {
    pub max_age_ms: u64,
    pub max_count: u64,
    pub hold_unshipped: bool,
}

/// The records the cluster keeps, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CdrLog {
    pub records: VecDeque<Cdr>,
    /// The ids of the kept records: a record is written once (an adopted call's old
    /// owner and its new one cannot both write it). An index of `records`: not in
    /// snapshots, rebuilt when one is read ([`CdrLog::reindex`]).
    #[serde(skip)]
    ids: BTreeSet<String>,
    /// The sequence number the next record gets.
    next_seq: u64,
    /// Records up to this sequence number are in PostgreSQL.
    pub shipped_through: u64,
    /// Start details of answered calls running now, by id.
    pub open: BTreeMap<String, CdrStart>,
    /// Records pruned before they were shipped (the window ran over them).
    pub dropped_unshipped: u64,
}

impl CdrKeep {
    /// For records the state machine writes itself (calls dropped with their node):
    /// the defaults of `[cdr]`.
    pub const DEFAULT: CdrKeep = CdrKeep {
        max_age_ms: 7 * 24 * 3600 * 1000,
        max_count: 200_000,
        hold_unshipped: true,
    };
}

impl CdrLog {
    /// Notes a running answered call's start details (once: the first answer wins).
    pub(crate) fn opened(&mut self, start: CdrStart) {
        self.open.entry(start.uniqueid.clone()).or_insert(start);
    }

    /// Adds a call's record (completed from its start details when the node that ended
    /// it did not run it from the start); false when the call has one already.
    pub(crate) fn record(&mut self, mut cdr: Cdr, keep: CdrKeep) -> bool {
        if let Some(start) = self.open.remove(&cdr.uniqueid) {
            if cdr.start_ms == 0 || cdr.start_ms > start.start_ms {
                cdr.start_ms = start.start_ms;
            }
            cdr.answer_ms = Some(
                cdr.answer_ms
                    .map_or(start.answer_ms, |a| a.min(start.answer_ms)),
            );
            for (mine, theirs) in [
                (&mut cdr.src, start.src),
                (&mut cdr.clid, start.clid),
                (&mut cdr.dst, start.dst),
                (&mut cdr.dcontext, start.dcontext),
            ] {
                if mine.is_empty() {
                    *mine = theirs;
                }
            }
        }
        if self.ids.contains(&cdr.uniqueid) {
            return false;
        }
        if cdr.start_ms == 0 {
            cdr.start_ms = cdr.answer_ms.unwrap_or(cdr.end_ms);
        }
        self.next_seq += 1;
        cdr.seq = self.next_seq;
        let now_ms = cdr.end_ms;
        self.ids.insert(cdr.uniqueid.clone());
        self.records.push_back(cdr);
        self.prune(now_ms, keep);
        true
    }

    /// Rebuilds the index of ids from the records (after a snapshot is read).
    pub(crate) fn reindex(&mut self) {
        self.ids = self.records.iter().map(|c| c.uniqueid.clone()).collect();
    }

    /// The leader shipped every record up to `through` to PostgreSQL.
    pub(crate) fn shipped(&mut self, through: u64) {
        self.shipped_through = self.shipped_through.max(through.min(self.next_seq));
    }

    fn prune(&mut self, now_ms: u64, keep: CdrKeep) {
        while let Some(old) = self.records.front() {
            let over_count = self.records.len() as u64 > keep.max_count;
            let shipped = old.seq <= self.shipped_through;
            let too_old = old.end_ms.saturating_add(keep.max_age_ms) < now_ms
                && (shipped || !keep.hold_unshipped);
            if !(over_count || too_old) {
                break;
            }
            if !shipped {
                self.dropped_unshipped += 1;
            }
            if let Some(old) = self.records.pop_front() {
                self.ids.remove(&old.uniqueid);
            }
        }
    }

    /// The records that ended in `[since_ms, until_ms)`, oldest first.
    pub fn between(&self, since_ms: u64, until_ms: u64) -> impl Iterator<Item = &Cdr> {
        self.records
            .iter()
            .filter(move |c| c.end_ms >= since_ms && c.end_ms < until_ms)
    }

    /// The records after sequence number `after`, at most `max`, oldest first.
    pub fn after(&self, after: u64, max: usize) -> Vec<Cdr> {
        // Sequence numbers rise along the deque: skip by position.
        let first = self.records.partition_point(|c| c.seq <= after);
        self.records.iter().skip(first).take(max).cloned().collect()
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix-ms time: Asterisk's CDR date format.
pub fn utc_datetime(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix ms of `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS]` or the RFC 3339 form with `T` and
/// `Z` (UTC).
pub fn parse_utc(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00:00"));
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&dd) {
        return None;
    }
    let mut t = time.split(':').map(|p| p.parse::<u64>().ok());
    let (hh, mm) = (t.next()??, t.next()??);
    let ss = t.next().unwrap_or(Some(0))?;
    if hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = u64::try_from(days_from_civil(y, m, dd)).ok()?;
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cdr(id: &str, end_ms: u64) -> Cdr {
        Cdr {
            uniqueid: id.into(),
            start_ms: end_ms.saturating_sub(5000),
            answer_ms: Some(end_ms.saturating_sub(3000)),
            end_ms,
            src: "alice".into(),
            clid: "\"Alice\" <alice>".into(),
            dst: "bob".into(),
            dcontext: "default".into(),
            disposition: "ANSWERED".into(),
            hangup_cause: 16,
            nodes: vec![1],
            seq: 0,
        }
    }

    const KEEP: CdrKeep = CdrKeep {
        max_age_ms: 10_000,
        max_count: 3,
        hold_unshipped: true,
    };

    #[test]
    fn dates_both_ways() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(1_796_527_522_225), "2026-12-06 03:25:22");
        assert_eq!(utc_datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(parse_utc("2026-12-06T03:25:22Z"), Some(1_796_527_522_000));
        assert_eq!(parse_utc("2026-12-06 03:25:22"), Some(1_796_527_522_000));
        assert_eq!(parse_utc("2000-02-29"), Some(951_782_400_000));
        assert_eq!(parse_utc("2026-13-01"), None);
        assert_eq!(parse_utc("yesterday"), None);
        for ms in [0, 86_399_000, 1_796_527_522_000, 4_102_444_800_000] {
            assert_eq!(parse_utc(&utc_datetime(ms)), Some(ms));
        }
    }

    #[test]
    fn durations_as_asterisk_counts_them() {
        let c = cdr("a", 100_000);
        assert_eq!((c.duration_secs(), c.billsec()), (5, 3));
        let unanswered = Cdr {
            answer_ms: None,
            ..c
        };
        assert_eq!(unanswered.billsec(), 0);
    }

    #[test]
    fn one_record_a_call_numbered_in_order() {
        let mut log = CdrLog::default();
        assert!(log.record(cdr("a", 1000), KEEP));
        assert!(!log.record(cdr("a", 2000), KEEP), "the same call twice");
        assert!(log.record(cdr("b", 3000), KEEP));
        let seqs: Vec<u64> = log.records.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(log.after(1, 10).len(), 1);
        assert_eq!(log.after(0, 1)[0].uniqueid, "a");
    }

    #[test]
    fn an_adopters_record_is_completed_from_the_start_details() {
        let mut log = CdrLog::default();
        log.opened(CdrStart {
            uniqueid: "a".into(),
            start_ms: 1000,
            answer_ms: 2000,
            src: "alice".into(),
            clid: "\"Alice\" <alice>".into(),
            dst: "bob".into(),
            dcontext: "office".into(),
        });
        // The adopter knows neither when it started nor where it was dialled.
        let adopter = Cdr {
            start_ms: 0,
            answer_ms: Some(2500),
            dcontext: String::new(),
            clid: String::new(),
            nodes: vec![1, 3],
            ..cdr("a", 9000)
        };
        log.record(adopter, KEEP);
        let c = &log.records[0];
        assert_eq!((c.start_ms, c.answer_ms), (1000, Some(2000)));
        assert_eq!(c.dcontext, "office");
        assert_eq!(c.clid, "\"Alice\" <alice>");
        assert_eq!(c.nodes, vec![1, 3]);
        assert!(log.open.is_empty());
    }

    #[test]
    fn the_window_keeps_what_is_not_shipped_yet_but_never_more_than_the_count() {
        let mut log = CdrLog::default();
        log.record(cdr("a", 1000), KEEP);
        log.record(cdr("b", 2000), KEEP);
        // Far later: "a" and "b" are old but not in PostgreSQL yet.
        log.record(cdr("c", 100_000), KEEP);
        assert_eq!(log.records.len(), 3);
        log.shipped(2);
        log.record(cdr("d", 100_001), KEEP);
        let ids: Vec<&str> = log.records.iter().map(|c| c.uniqueid.as_str()).collect();
        assert_eq!(ids, vec!["c", "d"], "shipped and old: pruned");
        assert_eq!(log.dropped_unshipped, 0);
        for (i, id) in ["e", "f", "g"].into_iter().enumerate() {
            log.record(cdr(id, 100_002 + i as u64), KEEP);
        }
        assert_eq!(log.records.len(), 3, "the count bounds memory");
        assert_eq!(log.dropped_unshipped, 2);
        assert!(!log.ids.contains("c"));
    }
}
