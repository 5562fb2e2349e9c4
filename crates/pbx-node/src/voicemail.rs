//! What a call's voicemail asks of the cluster (ADR 0014): mailboxes from the
//! replicated state, audio from the blob stores of the voters, and saving a recording
//! in the one order that keeps a promise to the caller — the audio durable on a
//! majority of the voters first, then the message committed, and only then "saved".

use std::sync::Arc;

use pbx_b2bua::{Recorded, StoreError, VmReply, VmRequest, MIN_RECORDING_MS};
use pbx_peer::Cluster;
use pbx_state::voicemail::{hash_pin, Codec, GreetingAudio, VoicemailOp, VoicemailOutcome};
use pbx_state::{Command, Response};
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
