//! The event log: `events` rows numbered per account under the account
//! row's lock, written by the group-commit writers of a [`PgStore`].
//!
//! A call to [`PgStore::append_events`] queues its events (one mpsc queue)
//! and waits; a writer takes every call queued so far (up to
//! [`ROUND_EVENTS`] events or [`ROUND_BYTES`] bytes) and commits them in
//! one transaction. There are [`WRITERS`] writers sharing the queue, so
//! that one collects and sends the next round while another waits for its
//! COMMIT (measured: 16 callers × 100 events of 300 bytes, about 32,000
//! events/s with one writer, 58,000 with two). Each round:
//! 1. `INSERT INTO accounts … ON CONFLICT DO UPDATE … RETURNING head_seq`
//!    creates, locks (in ascending account order, so two writers, of this
//!    router or another, cannot deadlock) and reads every account of the
//!    round; a round touching an account another writer holds waits for
//!    its COMMIT;
//! 2. the event ids already stored are looked up;
//! 3. the new events get consecutive sequence numbers after `head_seq`,
//!    inserted with one multi-row `INSERT … SELECT FROM unnest(…)`;
//! 4. `head_seq` is updated, and the transaction commits.
//!
//! Every caller is answered after that COMMIT. Because the account row
//! stays locked until COMMIT, sequence numbers are gap-free and commit
//! order is sequence order: a reader that sees `head_seq = n` sees every
//! event up to `n`. A round that fails on anything but a lost connection
//! is retried one call per transaction, so one bad call does not fail the
//! calls it was merged with. A commit whose outcome is unknown (the
//! connection dropped during COMMIT) is reported [`Error::Unavailable`];
//! retrying the call is safe, duplicates are recognised by event id.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{map_db, map_pool, share_error, to_i64, to_u64, PgStore, Stats};
use crate::domain::catalog::Mode;
use crate::domain::delivery::LaneFilter;
use crate::domain::event::{NewEvent, StoredEvent};
use crate::error::{Error, Result};
use crate::store::{AppendOutcome, Appended};

/// Most events one writer round commits (a round takes at least one call).
const ROUND_EVENTS: usize = 10_000;
/// Most event bytes one writer round commits.
const ROUND_BYTES: usize = 8 << 20;
/// Calls that may wait for the writer before callers wait to queue.
const QUEUE_DEPTH: usize = 4096;

/// `mode` column value of a mode.
pub(super) fn mode_code(m: Mode) -> i16 {
    match m {
        Mode::Realtime => 1,
        Mode::Batch => 2,
    }
}

/// The mode of a `mode` column value.
pub(super) fn mode_of(code: i16) -> Result<Mode> {
    match code {
        1 => Ok(Mode::Realtime),
        2 => Ok(Mode::Batch),
        other => Err(Error::Internal(format!("postgres: unknown mode {other}"))),
    }
}

/// One publish call waiting for the log writer.
pub(super) struct AppendJob {
    account_id: u64,
    events: Vec<NewEvent>,
    ingest_ms: i64,
    reply: oneshot::Sender<Result<Appended>>,
}

/// Where one call's events went: outcomes and first sequence number.
struct Placed {
    outcomes: Vec<AppendOutcome>,
    first_seq: u64,
}

/// Log writers per store: while one commits, the next collects a round.
const WRITERS: usize = 2;

/// Starts the log writers of a store; they end when every sender is dropped.
pub(super) fn spawn_writer(pool: Pool, stats: Arc<Stats>) -> mpsc::Sender<AppendJob> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..WRITERS {
        tokio::spawn(writer(pool.clone(), rx.clone(), stats.clone()));
    }
    tx
}

async fn writer(
    pool: Pool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<AppendJob>>>,
    stats: Arc<Stats>,
) {
    loop {
        let round = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut events = first.events.len();
            let mut bytes = job_bytes(&first);
            let mut round = vec![first];
            while events < ROUND_EVENTS && bytes < ROUND_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        events += job.events.len();
                        bytes += job_bytes(&job);
                        round.push(job);
                    }
                    Err(_) => break,
                }
            }
            round
        };
        write_round(&pool, round, &stats).await;
    }
}

fn job_bytes(job: &AppendJob) -> usize {
    job.events
        .iter()
        .map(|e| e.json.len() + e.event_id.len() + e.event_name.len() + 32)
        .sum()
}

/// Commits `round` in one transaction and answers its callers; on a
/// failure other than a lost connection, retries each call on its own.
async fn write_round(pool: &Pool, round: Vec<AppendJob>, stats: &Stats) {
    match commit_round(pool, &round).await {
        Ok((placed, heads)) => {
            stats.append_commits.fetch_add(1, Ordering::Relaxed);
            answer(round, placed, &heads);
        }
        Err(e) if round.len() > 1 && !matches!(e, Error::Unavailable(_)) => {
            tracing::warn!(error = %e, calls = round.len(), "merged append failed; retrying each call alone");
            for job in round {
                let one = [job];
                match commit_round(pool, &one).await {
                    Ok((placed, heads)) => {
                        stats.append_commits.fetch_add(1, Ordering::Relaxed);
                        answer(Vec::from(one), placed, &heads);
                    }
                    Err(e) => {
                        let [job] = one;
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
        }
        Err(e) => {
            for job in round {
                let _ = job.reply.send(Err(share_error(&e)));
            }
        }
    }
}

fn answer(round: Vec<AppendJob>, placed: Vec<Placed>, heads: &HashMap<u64, u64>) {
    for (job, p) in round.into_iter().zip(placed) {
        let last_seq = heads.get(&job.account_id).copied().unwrap_or(0);
        // A caller that gave up waiting is no reason to stop.
        let _ = job.reply.send(Ok(Appended {
            outcomes: p.outcomes,
            first_seq: p.first_seq,
            last_seq,
            events: job.events,
        }));
    }
}

const LOCK_ACCOUNTS: &str = "INSERT INTO accounts (account_id, head_seq) \
     SELECT a, 0 FROM unnest($1::bigint[]) AS u(a) ORDER BY a \
     ON CONFLICT (account_id) DO UPDATE SET head_seq = accounts.head_seq \
     RETURNING account_id, head_seq";

const EXISTING_IDS: &str = "SELECT e.account_id, e.event_id FROM events e \
     JOIN unnest($1::bigint[], $2::text[]) AS q(a, i) \
     ON e.account_id = q.a AND e.event_id = q.i";

const INSERT_EVENTS: &str =
    "INSERT INTO events (account_id, seq, event_id, event_name, mode, ingest_ms, json) \
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
     $5::smallint[], $6::bigint[], $7::bytea[])";

const UPDATE_HEADS: &str = "UPDATE accounts AS a SET head_seq = u.h, \
       change_seq = nextval('account_changes') \
     FROM unnest($1::bigint[], $2::bigint[]) AS u(a, h) WHERE a.account_id = u.a";

/// One transaction for every call of `round`: the placement of each call's
/// events, and each account's head after the round.
async fn commit_round(
    pool: &Pool,
    round: &[AppendJob],
) -> Result<(Vec<Placed>, HashMap<u64, u64>)> {
    let mut client = pool.get().await.map_err(map_pool)?;
    let tx = client.transaction().await.map_err(map_db)?;

    let mut accounts: Vec<i64> = round.iter().map(|j| to_i64(j.account_id)).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let stmt = tx.prepare_cached(LOCK_ACCOUNTS).await.map_err(map_db)?;
    let mut heads: HashMap<u64, u64> = HashMap::with_capacity(accounts.len());
    for row in tx.query(&stmt, &[&accounts]).await.map_err(map_db)? {
        heads.insert(to_u64(row.get(0)), to_u64(row.get(1)));
    }

    let (qa, qi): (Vec<i64>, Vec<&str>) = round
        .iter()
        .flat_map(|j| {
            j.events
                .iter()
                .map(move |e| (to_i64(j.account_id), e.event_id.as_str()))
        })
        .unzip();
    let stmt = tx.prepare_cached(EXISTING_IDS).await.map_err(map_db)?;
    let mut existing: HashSet<(u64, String)> = HashSet::new();
    for row in tx.query(&stmt, &[&qa, &qi]).await.map_err(map_db)? {
        existing.insert((to_u64(row.get(0)), row.get(1)));
    }

    let total: usize = round.iter().map(|j| j.events.len()).sum();
    let mut col_account = Vec::with_capacity(total);
    let mut col_seq = Vec::with_capacity(total);
    let mut col_id = Vec::with_capacity(total);
    let mut col_name = Vec::with_capacity(total);
    let mut col_mode = Vec::with_capacity(total);
    let mut col_ingest = Vec::with_capacity(total);
    let mut col_json: Vec<&[u8]> = Vec::with_capacity(total);
    // Ids stored by this round: a later call's repeat is a duplicate, as it
    // would be one round later.
    let mut seen: HashSet<(u64, &str)> = HashSet::with_capacity(total);
    let mut placed = Vec::with_capacity(round.len());
    for job in round {
        let head = heads
            .get_mut(&job.account_id)
            .ok_or_else(|| Error::Internal("postgres: account row not locked".into()))?;
        let first_seq = *head + 1;
        let mut outcomes = Vec::with_capacity(job.events.len());
        for e in &job.events {
            let duplicate = !seen.insert((job.account_id, e.event_id.as_str()))
                || existing.contains(&(job.account_id, e.event_id.clone()));
            if !duplicate {
                *head += 1;
                col_account.push(to_i64(job.account_id));
                col_seq.push(to_i64(*head));
                col_id.push(e.event_id.as_str());
                col_name.push(e.event_name.as_str());
                col_mode.push(Some(mode_code(e.mode)));
                col_ingest.push(job.ingest_ms);
                col_json.push(e.json.as_bytes());
            }
            outcomes.push(AppendOutcome {
                event_id: e.event_id.clone(),
                duplicate,
            });
        }
        placed.push(Placed {
            outcomes,
            first_seq,
        });
    }

    if !col_seq.is_empty() {
        let stmt = tx.prepare_cached(INSERT_EVENTS).await.map_err(map_db)?;
        tx.execute(
            &stmt,
            &[
                &col_account,
                &col_seq,
                &col_id,
                &col_name,
                &col_mode,
                &col_ingest,
                &col_json,
            ],
        )
        .await
        .map_err(map_db)?;
        let (ua, uh): (Vec<i64>, Vec<i64>) =
            heads.iter().map(|(a, h)| (to_i64(*a), to_i64(*h))).unzip();
        let stmt = tx.prepare_cached(UPDATE_HEADS).await.map_err(map_db)?;
        tx.execute(&stmt, &[&ua, &uh]).await.map_err(map_db)?;
    }
    tx.commit().await.map_err(map_db)?;
    Ok((placed, heads))
}

/// What [`PgStore::read_for_lane`] found.
#[derive(Debug)]
pub struct LaneRead {
    /// The events the lane takes, oldest first.
    pub events: Vec<StoredEvent>,
    /// The last sequence number examined; the lane's cursor may move there.
    pub scanned_to: u64,
    /// The read stopped at its scan limit: there may be more to read now.
    pub capped: bool,
    /// Sequence numbers of events of the lane's types examined and left
    /// out by its payload filter, in order (the cursor moves past them
    /// like past other types).
    pub skipped: Vec<u64>,
}

fn stored_event(row: &tokio_postgres::Row) -> Result<StoredEvent> {
    let mode: Option<i16> = row.get(3);
    let json: Vec<u8> = row.get(5);
    Ok(StoredEvent {
        seq: to_u64(row.get(0)),
        event_id: row.get(1),
        event_name: row.get(2),
        mode: mode.map(mode_of).transpose()?,
        ingest_time_ms: row.get(4),
        json: Bytes::from(json),
    })
}

impl PgStore {
    /// Appends events to the account's log, all or none, skipping ids
    /// already present (or earlier in the same call): same semantics as
    /// [`crate::store::Store::append_events`], except that sequence numbers
    /// count per account. Durable when it returns Ok (after COMMIT).
    /// Concurrent calls are merged into one transaction by the log writer.
    ///
    /// `first_seq` is the sequence number of the first event stored (the
    /// others follow in order, duplicates skipped; meaningless when none was
    /// stored); `last_seq` the account's highest sequence number after the
    /// transaction, which the cache of heads learns at once (this router's
    /// lanes read up to it).
    pub async fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> Result<Appended> {
        if events.is_empty() {
            let head = self.noted(self.head_seq(account_id).await)?;
            return Ok(Appended {
                outcomes: Vec::new(),
                first_seq: head + 1,
                last_seq: head,
                events,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .appends
            .send(AppendJob {
                account_id,
                events,
                ingest_ms: now_ms,
                reply,
            })
            .await
            .map_err(|_| Error::Internal("postgres: the log writer stopped".into()))?;
        let appended = answer
            .await
            .map_err(|_| Error::Internal("postgres: the log writer stopped".into()))?;
        // A lost connection marks the store failed (this method is also
        // what `Store::append_events` calls).
        let appended = self.noted(appended)?;
        self.note_head(account_id, appended.last_seq);
        Ok(appended)
    }

    /// Up to `limit` events of `account_id` after `after_seq`, oldest first.
    pub async fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, event_id, event_name, mode, ingest_ms, json FROM events \
                 WHERE account_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(map_db)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        client
            .query(&stmt, &[&to_i64(account_id), &to_i64(after_seq), &limit])
            .await
            .map_err(map_db)?
            .iter()
            .map(stored_event)
            .collect()
    }

    /// Highest sequence number of the account's log (0 when it has none).
    /// Every event up to it is committed and readable.
    pub async fn head_seq(&self, account_id: u64) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT head_seq FROM accounts WHERE account_id = $1")
            .await
            .map_err(map_db)?;
        Ok(client
            .query_opt(&stmt, &[&to_i64(account_id)])
            .await
            .map_err(map_db)?
            .map(|r| to_u64(r.get(0)))
            .unwrap_or(0))
    }

    /// Reads, for a lane, up to `limit` events of `account_id` after
    /// `after_seq` that `filter` accepts and no further than `until_seq`,
    /// examining at most `scan_limit` log positions (sequence numbers are
    /// gap-free, so that is the range `after_seq + 1 ..= after_seq +
    /// scan_limit`). Same semantics as the sled store's lane read.
    pub async fn read_for_lane(
        &self,
        account_id: u64,
        after_seq: u64,
        until_seq: u64,
        filter: &LaneFilter,
        limit: usize,
        scan_limit: usize,
    ) -> Result<LaneRead> {
        // The head first: every event up to it is visible to the next
        // statement (read committed takes a new snapshot per statement).
        let head = self.head_seq(account_id).await?;
        self.read_for_lane_at(
            account_id, head, after_seq, until_seq, filter, limit, scan_limit,
        )
        .await
    }

    /// [`PgStore::read_for_lane`] given a head known to be committed (read
    /// from `accounts`, or the cache of [`PgStore::known_head`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn read_for_lane_at(
        &self,
        account_id: u64,
        head: u64,
        after_seq: u64,
        until_seq: u64,
        filter: &LaneFilter,
        limit: usize,
        scan_limit: usize,
    ) -> Result<LaneRead> {
        let end = until_seq.min(head);
        if end <= after_seq || limit == 0 || scan_limit == 0 {
            return Ok(LaneRead {
                events: Vec::new(),
                scanned_to: after_seq,
                capped: end > after_seq && limit > 0,
                skipped: Vec::new(),
            });
        }
        let window = end.min(after_seq.saturating_add(scan_limit as u64));
        let (with_mode, without_mode) = filter_types(filter);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, event_id, event_name, mode, ingest_ms, json FROM events \
                 WHERE account_id = $1 AND seq > $2 AND seq <= $3 \
                 AND ((mode = $4 AND event_name = ANY($5)) \
                      OR (mode IS NULL AND event_name = ANY($6))) \
                 ORDER BY seq LIMIT $7",
            )
            .await
            .map_err(map_db)?;
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &stmt,
                &[
                    &to_i64(account_id),
                    &to_i64(after_seq),
                    &to_i64(window),
                    &mode_code(filter.mode),
                    &with_mode,
                    &without_mode,
                    &limit_sql,
                ],
            )
            .await
            .map_err(map_db)?;
        drop(client);
        let full = rows.len() >= limit;
        let mut last_row = after_seq;
        let mut events = Vec::with_capacity(rows.len());
        let mut skipped = Vec::new();
        for row in &rows {
            let e = stored_event(row)?;
            last_row = e.seq;
            // Without a payload filter this decodes nothing.
            if filter.matches_payload(&e.json) {
                events.push(e);
            } else {
                skipped.push(e.seq);
            }
        }
        if full {
            // The rows stopped at the limit: what follows them is unread
            // (more at once when the payload filter left some out).
            return Ok(LaneRead {
                capped: events.len() < limit,
                events,
                scanned_to: last_row,
                skipped,
            });
        }
        Ok(LaneRead {
            events,
            scanned_to: window,
            capped: window < end,
            skipped,
        })
    }
}

/// The event names a lane takes: those it takes in its mode, and those it
/// takes from events stored without a mode (the catalog decides).
fn filter_types(filter: &LaneFilter) -> (Vec<&str>, Vec<&str>) {
    let mut with_mode = Vec::new();
    let mut without_mode = Vec::new();
    for t in &filter.types {
        with_mode.push(t.as_str());
        if filter.accepts(t, None) {
            without_mode.push(t.as_str());
        }
    }
    (with_mode, without_mode)
}

impl PgStore {
    /// Counts the events of `account_id` after `after_seq` up to `until_seq`
    /// that `filter` accepts, examining at most `scan_limit` positions; true
    /// when it stopped there (the sled store's `count_for_lane`).
    pub(super) async fn count_for_lane(
        &self,
        account_id: u64,
        after_seq: u64,
        until_seq: u64,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<(u64, bool)> {
        if until_seq <= after_seq {
            return Ok((0, false));
        }
        let window = until_seq.min(after_seq.saturating_add(scan_limit as u64));
        let (with_mode, without_mode) = filter_types(filter);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT count(*) FROM events \
                 WHERE account_id = $1 AND seq > $2 AND seq <= $3 \
                 AND ((mode = $4 AND event_name = ANY($5)) \
                      OR (mode IS NULL AND event_name = ANY($6)))",
            )
            .await
            .map_err(map_db)?;
        let n: i64 = client
            .query_one(
                &stmt,
                &[
                    &to_i64(account_id),
                    &to_i64(after_seq),
                    &to_i64(window),
                    &mode_code(filter.mode),
                    &with_mode,
                    &without_mode,
                ],
            )
            .await
            .map_err(map_db)?
            .get(0);
        Ok((n.max(0) as u64, window < until_seq))
    }

    /// The events of `account_id` at `seqs` (those still stored), in log order.
    pub(super) async fn events_at(
        &self,
        account_id: u64,
        seqs: &[u64],
    ) -> Result<Vec<StoredEvent>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = seqs.iter().map(|s| to_i64(*s)).collect();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, event_id, event_name, mode, ingest_ms, json FROM events \
                 WHERE account_id = $1 AND seq = ANY($2) ORDER BY seq",
            )
            .await
            .map_err(map_db)?;
        client
            .query(&stmt, &[&to_i64(account_id), &seqs])
            .await
            .map_err(map_db)?
            .iter()
            .map(stored_event)
            .collect()
    }

    /// Ingest time of the first event after `cursor` that `filter` accepts
    /// within `scan_limit` positions, or else of the first event after
    /// `cursor` (one at least as old); None when there is none.
    pub(super) async fn next_ingest_ms(
        &self,
        account_id: u64,
        cursor: u64,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        let (with_mode, without_mode) = filter_types(filter);
        let window = cursor.saturating_add(scan_limit as u64);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT COALESCE( \
                   (SELECT ingest_ms FROM events \
                    WHERE account_id = $1 AND seq > $2 AND seq <= $3 \
                    AND ((mode = $4 AND event_name = ANY($5)) \
                         OR (mode IS NULL AND event_name = ANY($6))) \
                    ORDER BY seq LIMIT 1), \
                   (SELECT ingest_ms FROM events WHERE account_id = $1 AND seq > $2 \
                    ORDER BY seq LIMIT 1))",
            )
            .await
            .map_err(map_db)?;
        Ok(client
            .query_one(
                &stmt,
                &[
                    &to_i64(account_id),
                    &to_i64(cursor),
                    &to_i64(window),
                    &mode_code(filter.mode),
                    &with_mode,
                    &without_mode,
                ],
            )
            .await
            .map_err(map_db)?
            .get(0))
    }
}
