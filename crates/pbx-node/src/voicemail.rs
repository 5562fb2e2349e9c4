//! What a call's voicemail asks of the cluster (ADR 0014): mailboxes from the
//! replicated state, audio from the blob stores of the voters, and saving a recording
//! in the one order that keeps a promise to the caller — the audio durable on a
//! majority of the voters first, then the message committed, and only then "saved".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbx_b2bua::{Recorded, StoreError, VmReply, VmRequest, MIN_RECORDING_MS};
use pbx_peer::Cluster;
use pbx_state::voicemail::{hash_pin, Codec, GreetingAudio, VoicemailOp, VoicemailOutcome};
use pbx_state::{Command, Response};
use pbx_storage::{BlobId, BlobStore};
use tokio::sync::{mpsc, oneshot};

use crate::calls::CallInput;

fn payload_type(codec: Codec) -> u8 {
    match codec {
        Codec::Pcmu => 0,
        Codec::Pcma => 8,
    }
}

/// Carries out a request of a call's voicemail; answers come back on `reply` as
/// [`CallInput::Voicemail`]. `recording` is the relay's recording, for `Store`.
pub(crate) fn request(
    cluster: &Cluster,
    req: VmRequest,
    recording: Option<oneshot::Receiver<Vec<u8>>>,
    reply: mpsc::UnboundedSender<CallInput>,
) {
    let answer = move |r: VmReply| {
        let _ = reply.send(CallInput::Voicemail(r));
    };
    match req {
        VmRequest::Open { mailbox: key } => {
            let m = cluster.read().mailbox(&key);
            answer(VmReply::Mailbox(m.map(Box::new)));
        }
        VmRequest::Fetch {
            blob,
            codec,
            holders,
            payload_type: pt,
        } => {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let audio = cluster.fetch_blob(&blob, &holders).await.map(|a| {
                    let a = pbx_media_core::g711::transcode(&a, payload_type(codec), pt);
                    Arc::<[u8]>::from(a)
                });
                answer(VmReply::Audio(audio));
            });
        }
        VmRequest::Store {
            mailboxes,
            what,
            codec,
        } => {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let audio = match recording {
                    Some(rx) => rx.await.unwrap_or_default(),
                    None => Vec::new(),
                };
                let r = store(&cluster, mailboxes, what, codec, audio).await;
                if let Err(StoreError::Failed(why)) = &r {
                    tracing::error!(%why, "voicemail: a recording was not saved");
                }
                answer(VmReply::Stored(r));
            });
        }
        VmRequest::Discard => drop(recording),
        VmRequest::Update(op) => {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                answer(VmReply::Updated(update(&cluster, op).await));
            });
        }
        VmRequest::SetPin { mailbox, pin } => {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let salt = format!("{:016x}", rand::random::<u64>());
                let op = VoicemailOp::SetPin {
                    mailbox,
                    pin_hash: hash_pin(&salt, &pin),
                };
                answer(VmReply::Updated(update(&cluster, op).await));
            });
        }
    }
}

/// Saves a recording: durable on a majority of the voters, then committed.
async fn store(
    cluster: &Cluster,
    mailboxes: Vec<String>,
    what: Recorded,
    codec: Codec,
    audio: Vec<u8>,
) -> Result<(), StoreError> {
    if (audio.len() as u64) < MIN_RECORDING_MS * 8 {
        return Err(StoreError::TooShort);
    }
    let size = audio.len() as u64;
    let duration_ms = size / 8;
    let (id, holders) = cluster
        .put_blob_on_majority(audio.into())
        .await
        .map_err(|e| StoreError::Failed(e.to_string()))?;
    let blob = id.to_string();
    match what {
        Recorded::Message { caller_id } => {
            let mut saved = 0;
            for mailbox in mailboxes {
                let op = VoicemailOp::Save {
                    mailbox: mailbox.clone(),
                    blob: blob.clone(),
                    codec,
                    size,
                    duration_ms,
                    caller_id: caller_id.clone(),
                    holders: holders.clone(),
                };
                match propose(cluster, op).await? {
                    VoicemailOutcome::Saved { id } => {
                        tracing::info!(mailbox, id, duration_ms, "voicemail: message saved");
                        saved += 1;
                    }
                    VoicemailOutcome::MailboxFull => {
                        tracing::warn!(mailbox, "voicemail: mailbox full, message not saved")
                    }
                    other => tracing::warn!(mailbox, ?other, "voicemail: unexpected outcome"),
                }
            }
            if saved == 0 {
                return Err(StoreError::MailboxFull);
            }
        }
        Recorded::Greeting(greeting) => {
            let mailbox = mailboxes.into_iter().next().unwrap_or_default();
            let op = VoicemailOp::SetGreeting {
                mailbox,
                greeting,
                audio: Some(GreetingAudio {
                    blob,
                    codec,
                    holders,
                }),
            };
            propose(cluster, op).await?;
        }
    }
    Ok(())
}

async fn propose(cluster: &Cluster, op: VoicemailOp) -> Result<VoicemailOutcome, StoreError> {
    match cluster.propose(Command::Voicemail { op, now_ms: 0 }).await {
        Ok(Response::Voicemail(outcome)) => Ok(outcome),
        Ok(other) => Err(StoreError::Failed(format!("unexpected answer {other:?}"))),
        Err(e) => Err(StoreError::Failed(e.to_string())),
    }
}

async fn update(cluster: &Cluster, op: VoicemailOp) -> bool {
    match propose(cluster, op).await {
        Ok(VoicemailOutcome::Changed) => true,
        Ok(other) => {
            tracing::info!(?other, "voicemail: nothing changed");
            false
        }
        Err(e) => {
            tracing::warn!(error = ?e, "voicemail: change not committed");
            false
        }
    }
}

/// Audio no message or greeting refers to is removed once it stayed so this long (a
/// save in flight writes its blob before committing the message).
const UNREFERENCED_GRACE: Duration = Duration::from_secs(600);

/// The keeper of this node's voicemail audio (ADR 0014's repair): every `every`, a
/// voter fetches the audio of each message or greeting it does not hold from a node
/// that does, and records that it holds it (`AddHolders`), so a message saved on a bare
/// majority ends up on every voter and a wiped disk fills again; audio that nothing has
/// referred to for [`UNREFERENCED_GRACE`] (deleted messages, replaced greetings, failed
/// saves) is removed.
pub(crate) async fn keep_blobs(cluster: Cluster, blobs: Arc<dyn BlobStore>, every: Duration) {
    let mut unreferenced_since: HashMap<BlobId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = cluster.node_id();
        // A node still catching up would take the messages it has not seen yet for
        // audio nothing refers to.
        if !cluster.voters().contains(&me) || !cluster.is_ready() {
            continue;
        }
        // (mailbox, message id or None for a greeting, blob, holders).
        let wanted: Vec<(String, Option<u64>, String, Vec<u64>)> = {
            let state = cluster.read();
            state
                .voicemail
                .boxes
                .iter()
                .flat_map(|(name, b)| {
                    let messages = b
                        .messages
                        .values()
                        .map(|m| (name.clone(), Some(m.id), m.blob.clone(), m.holders.clone()));
                    let greetings = b
                        .greetings
                        .values()
                        .map(|g| (name.clone(), None, g.blob.clone(), g.holders.clone()));
                    messages.chain(greetings).collect::<Vec<_>>()
                })
                .collect()
        };
        let referenced: HashSet<BlobId> = wanted.iter().filter_map(|w| w.2.parse().ok()).collect();
        for (mailbox, id, blob, holders) in wanted {
            let Ok(blob_id) = blob.parse::<BlobId>() else {
                continue;
            };
            if !blobs.contains(&blob_id) {
                let Some(data) = cluster.fetch_blob(&blob, &holders).await else {
                    continue; // logged by fetch_blob; tried again next pass
                };
                let store = blobs.clone();
                let stored = tokio::task::spawn_blocking(move || store.put(&data)).await;
                match stored {
                    Ok(Ok(_)) => tracing::info!(mailbox, blob, "voicemail audio copied here"),
                    Ok(Err(e)) => {
                        tracing::warn!(mailbox, blob, error = %e, "voicemail audio not copied");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(mailbox, blob, error = %e, "voicemail audio not copied");
                        continue;
                    }
                }
            }
            if let (Some(id), false) = (id, holders.contains(&me)) {
                let op = VoicemailOp::AddHolders {
                    mailbox: mailbox.clone(),
                    id,
                    holders: vec![me],
                };
                if let Err(e) = propose(&cluster, op).await {
                    tracing::debug!(mailbox, id, error = ?e, "holder not recorded yet");
                }
            }
        }
        // Audio nothing refers to: removed after the grace period.
        let held = {
            let store = blobs.clone();
            match tokio::task::spawn_blocking(move || store.list()).await {
                Ok(Ok(list)) => list,
                _ => continue,
            }
        };
        let now = Instant::now();
        unreferenced_since.retain(|b, _| held.contains(b) && !referenced.contains(b));
        for blob in held.into_iter().filter(|b| !referenced.contains(b)) {
            let since = *unreferenced_since.entry(blob).or_insert(now);
            if now.duration_since(since) >= UNREFERENCED_GRACE {
                let store = blobs.clone();
                if let Ok(Ok(())) = tokio::task::spawn_blocking(move || store.remove(&blob)).await {
                    tracing::info!(blob = %blob, "voicemail audio nothing refers to removed");
                    unreferenced_since.remove(&blob);
                }
            }
        }
    }
}
