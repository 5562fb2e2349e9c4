//! Ships the cluster's call detail records to PostgreSQL (`[cdr] postgres`): a leader
//! job. Records go in sequence order, in batches, each with `ON CONFLICT (uniqueid) DO
//! NOTHING`; once a batch is in, the leader commits how far it got
//! (`Command::CdrsShipped`). A leader that dies between the two makes its successor
//! send that batch again, which the unique key absorbs: at least once, never twice.
//! While the database is down the records wait in the replicated state (kept past
//! their age, see `CdrKeep::hold_unshipped`); calls never wait for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pbx_peer::Cluster;
use pbx_state::{Cdr, Command};

use crate::config::CdrSection;
use crate::metrics::NodeCounts;

/// How often the leader looks for records to ship, and the longest wait between two
/// attempts while the database is unreachable.
const POLL: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(cluster: Cluster, cfg: CdrSection, counts: Arc<NodeCounts>) {
    let Some(conninfo) = cfg.postgres.clone() else {
        return;
    };
    let mut client: Option<tokio_postgres::Client> = None;
    let mut backoff = POLL;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(backoff).await;
        if !cluster.is_leader() {
            // Only the leader ships; a former leader lets go of its connection.
            client = None;
            backoff = POLL;
            continue;
        }
        let batch = {
            let st = cluster.read();
            st.cdrs.after(st.cdrs.shipped_through, cfg.batch)
        };
        let Some(last) = batch.last().map(|c| c.seq) else {
            backoff = POLL;
            continue;
        };
        let result = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(connect(&conninfo, &cfg.table).await?);
            }
            let c = client.as_ref().ok_or("no connection")?;
            insert(c, &cfg.table, &batch).await
        }
        .await;
        match result {
            Ok(()) => {
                counts
                    .cdr
                    .shipped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        down_for_s = since.elapsed().as_secs(),
                        "call detail records reach PostgreSQL again"
                    );
                }
                if let Err(e) = cluster
                    .propose(Command::CdrsShipped { through: last })
                    .await
                {
                    // Sent again by whoever leads next: the unique key absorbs it.
                    tracing::debug!(error = %e, "progress of the CDR shipping not committed");
                }
                backoff = if batch.len() == cfg.batch {
                    Duration::ZERO
                } else {
                    POLL
                };
            }
            Err(e) => {
                counts.cdr.errors.fetch_add(1, Ordering::Relaxed);
                client = None;
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, waiting = batch.len(), "cannot store call detail records in PostgreSQL: kept in the cluster, retrying");
                } else {
                    tracing::debug!(error = %e, "PostgreSQL still unreachable");
                }
                backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
            }
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn connect(conninfo: &str, table: &str) -> Result<tokio_postgres::Client, Failure> {
    let (client, connection) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "connect timed out")??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    // Asterisk's cdr_pgsql column names where they mean the same, plus the answer and
    // end times, the hangup cause and the nodes that ran the call.
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                uniqueid text PRIMARY KEY,
                calldate timestamptz NOT NULL,
                answer timestamptz,
                \"end\" timestamptz NOT NULL,
                duration bigint NOT NULL,
                billsec bigint NOT NULL,
                disposition text NOT NULL,
                src text NOT NULL,
                clid text NOT NULL,
                dst text NOT NULL,
                dcontext text NOT NULL,
                hangupcause integer NOT NULL,
                nodes text NOT NULL,
                sequence bigint NOT NULL
            )"
        ))
        .await?;
    tracing::info!(table, "connected to PostgreSQL for call detail records");
    Ok(client)
}

async fn insert(
    client: &tokio_postgres::Client,
    table: &str,
    batch: &[Cdr],
) -> Result<(), Failure> {
    let secs = |ms: u64| ms as f64 / 1000.0;
    let col = |f: fn(&Cdr) -> String| batch.iter().map(f).collect::<Vec<String>>();
    let uniqueid = col(|c| c.uniqueid.clone());
    let start: Vec<f64> = batch.iter().map(|c| secs(c.start_ms)).collect();
    let answer: Vec<Option<f64>> = batch.iter().map(|c| c.answer_ms.map(secs)).collect();
    let end: Vec<f64> = batch.iter().map(|c| secs(c.end_ms)).collect();
    let duration: Vec<i64> = batch.iter().map(|c| c.duration_secs() as i64).collect();
    let billsec: Vec<i64> = batch.iter().map(|c| c.billsec() as i64).collect();
    let disposition = col(|c| c.disposition.clone());
    let src = col(|c| c.src.clone());
    let clid = col(|c| c.clid.clone());
    let dst = col(|c| c.dst.clone());
    let dcontext = col(|c| c.dcontext.clone());
    let cause: Vec<i32> = batch.iter().map(|c| i32::from(c.hangup_cause)).collect();
    let nodes = col(|c| {
        c.nodes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    });
    let seq: Vec<i64> = batch.iter().map(|c| c.seq as i64).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {table} (uniqueid, calldate, answer, \"end\", duration, billsec,
                    disposition, src, clid, dst, dcontext, hangupcause, nodes, sequence)
                 SELECT u, to_timestamp(s), to_timestamp(a), to_timestamp(e), d, b, disp,
                    src, clid, dst, ctx, hc, n, seq
                 FROM UNNEST($1::text[], $2::float8[], $3::float8[], $4::float8[],
                    $5::int8[], $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[],
                    $11::text[], $12::int4[], $13::text[], $14::int8[])
                    AS x(u, s, a, e, d, b, disp, src, clid, dst, ctx, hc, n, seq)
                 ON CONFLICT (uniqueid) DO NOTHING"
            ),
            &[
                &uniqueid,
                &start,
                &answer,
                &end,
                &duration,
                &billsec,
                &disposition,
                &src,
                &clid,
                &dst,
                &dcontext,
                &cause,
                &nodes,
                &seq,
            ],
        )
        .await?;
    Ok(())
}
