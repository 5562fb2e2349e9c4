//! Mailboxes and their messages, as the cluster agrees on them (ADR 0014): what a
//! message is, where its audio is (a blob's name and the voters holding it), never the
//! audio itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// At most this many messages in a mailbox (Asterisk's `maxmsg`): a save beyond it is
/// refused and the caller hears that the mailbox is full.
pub const MAX_MESSAGES: usize = 100;

/// Every mailbox, by name (`1001`, `1001@sales`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Voicemail {
    pub boxes: BTreeMap<String, Mailbox>,
    /// Changes applied so far: watchers (message waiting) look again when it moves.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Mailbox {
    /// The PIN as `salt$sha256(salt + pin)` in hex; `None`: no PIN set (login refused).
    pub pin_hash: Option<String>,
    /// The id the next message gets (ids are never reused in a mailbox).
    pub next_id: u64,
    pub messages: BTreeMap<u64, VoiceMessage>,
    /// Greetings the owner recorded.
    pub greetings: BTreeMap<Greeting, GreetingAudio>,
}

/// Where a greeting's audio is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingAudio {
    pub blob: String,
    pub codec: Codec,
    /// The voters known to hold the blob on disk.
    pub holders: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceMessage {
    pub id: u64,
    /// The audio's blob name (hex SHA-256), G.711 `codec`.
    pub blob: String,
    pub codec: Codec,
    pub size: u64,
    pub duration_ms: u64,
    /// Who left it (`"Name" <num>`).
    pub caller_id: String,
    /// The leader's clock when it was saved.
    pub received_ms: u64,
    pub folder: Folder,
    /// The voters known to hold the blob on disk (a majority at least).
    pub holders: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Pcmu,
    Pcma,
}

/// Asterisk's folders: new messages, and those listened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Folder {
    Inbox,
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Greeting {
    Unavailable,
    Busy,
    Name,
}

/// A change to the mailboxes (inside [`crate::Command::Voicemail`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoicemailOp {
    /// A message whose blob a majority of voters hold: it is saved (a new id).
    Save {
        mailbox: String,
        blob: String,
        codec: Codec,
        size: u64,
        duration_ms: u64,
        caller_id: String,
        holders: Vec<u64>,
    },
    /// A message listened to (to `Old`), or back to new.
    Move {
        mailbox: String,
        id: u64,
        folder: Folder,
    },
    Delete {
        mailbox: String,
        id: u64,
    },
    /// A greeting recorded (`Some`) or removed.
    SetGreeting {
        mailbox: String,
        greeting: Greeting,
        audio: Option<GreetingAudio>,
    },
    SetPin {
        mailbox: String,
        pin_hash: String,
    },
    /// More voters hold a message's blob (repair copied it).
    AddHolders {
        mailbox: String,
        id: u64,
        holders: Vec<u64>,
    },
}

/// What a [`VoicemailOp`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoicemailOutcome {
    Saved {
        id: u64,
    },
    Changed,
    /// No such message (deleted meanwhile): nothing changed.
    NoSuchMessage,
    /// The mailbox holds [`MAX_MESSAGES`] already: the message is not saved.
    MailboxFull,
}

impl Voicemail {
    /// Applies `op` at the leader's `now_ms` (deterministic: the same on every node).
    pub fn apply(&mut self, op: VoicemailOp, now_ms: u64) -> VoicemailOutcome {
        self.version += 1;
        match op {
            VoicemailOp::Save {
                mailbox,
                blob,
                codec,
                size,
                duration_ms,
                caller_id,
                mut holders,
            } => {
                let b = self.boxes.entry(mailbox).or_default();
                if b.messages.len() >= MAX_MESSAGES {
                    return VoicemailOutcome::MailboxFull;
                }
                let id = b.next_id.max(1);
                b.next_id = id + 1;
                holders.sort_unstable();
                holders.dedup();
                b.messages.insert(
                    id,
                    VoiceMessage {
                        id,
                        blob,
                        codec,
                        size,
                        duration_ms,
                        caller_id,
                        received_ms: now_ms,
                        folder: Folder::Inbox,
                        holders,
                    },
                );
                VoicemailOutcome::Saved { id }
            }
            VoicemailOp::Move {
                mailbox,
                id,
                folder,
            } => match self.message_mut(&mailbox, id) {
                Some(m) => {
                    m.folder = folder;
                    VoicemailOutcome::Changed
                }
                None => VoicemailOutcome::NoSuchMessage,
            },
            VoicemailOp::Delete { mailbox, id } => {
                match self
                    .boxes
                    .get_mut(&mailbox)
                    .and_then(|b| b.messages.remove(&id))
                {
                    Some(_) => VoicemailOutcome::Changed,
                    None => VoicemailOutcome::NoSuchMessage,
                }
            }
            VoicemailOp::SetGreeting {
                mailbox,
                greeting,
                audio,
            } => {
                let b = self.boxes.entry(mailbox).or_default();
                match audio {
                    Some(audio) => b.greetings.insert(greeting, audio),
                    None => b.greetings.remove(&greeting),
                };
                VoicemailOutcome::Changed
            }
            VoicemailOp::SetPin { mailbox, pin_hash } => {
                self.boxes.entry(mailbox).or_default().pin_hash = Some(pin_hash);
                VoicemailOutcome::Changed
            }
            VoicemailOp::AddHolders {
                mailbox,
                id,
                holders,
            } => match self.message_mut(&mailbox, id) {
                Some(m) => {
                    m.holders.extend(holders);
                    m.holders.sort_unstable();
                    m.holders.dedup();
                    VoicemailOutcome::Changed
                }
                None => VoicemailOutcome::NoSuchMessage,
            },
        }
    }

    fn message_mut(&mut self, mailbox: &str, id: u64) -> Option<&mut VoiceMessage> {
        self.boxes.get_mut(mailbox)?.messages.get_mut(&id)
    }

    /// New and old messages of a mailbox (for message waiting, RFC 3842).
    pub fn counts(&self, mailbox: &str) -> (usize, usize) {
        self.boxes.get(mailbox).map_or((0, 0), |b| {
            let new = b
                .messages
                .values()
                .filter(|m| m.folder == Folder::Inbox)
                .count();
            (new, b.messages.len() - new)
        })
    }

    /// Every blob a message or greeting refers to (what the sweeper must keep).
    pub fn referenced_blobs(&self) -> std::collections::BTreeSet<&str> {
        self.boxes
            .values()
            .flat_map(|b| {
                b.messages
                    .values()
                    .map(|m| m.blob.as_str())
                    .chain(b.greetings.values().map(|g| g.blob.as_str()))
            })
            .collect()
    }
}

/// The form a PIN is kept in: `salt$sha256(salt + pin)` in hex (the salt chosen by the
/// node that takes the PIN, outside the state machine).
pub fn hash_pin(salt: &str, pin: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{salt}{pin}").as_bytes());
    format!("{salt}${}", hex::encode(digest))
}

/// Whether `pin` is the one `stored` ([`hash_pin`]) was made from.
pub fn pin_matches(stored: &str, pin: &str) -> bool {
    match stored.split_once('$') {
        Some((salt, _)) => hash_pin(salt, pin) == stored,
        None => false,
    }
}

/// A PIN a phone can key: 1 to 16 digits.
pub fn valid_pin(pin: &str) -> bool {
    (1..=16).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_kept_salted_and_checked() {
        let h = hash_pin("5a1t", "4242");
        assert!(h.starts_with("5a1t$"));
        assert!(pin_matches(&h, "4242"));
        assert!(!pin_matches(&h, "4243"));
        assert_ne!(hash_pin("other", "4242"), h, "salted");
        assert!(!pin_matches("garbage", "4242"));
        assert!(valid_pin("0000") && !valid_pin("") && !valid_pin("12a"));
    }

    fn save(mailbox: &str, blob: &str) -> VoicemailOp {
        VoicemailOp::Save {
            mailbox: mailbox.into(),
            blob: blob.into(),
            codec: Codec::Pcmu,
            size: 16_000,
            duration_ms: 2_000,
            caller_id: "\"Alice\" <1001>".into(),
            holders: vec![2, 1, 2],
        }
    }

    #[test]
    fn messages_are_saved_moved_and_deleted_with_ids_never_reused() {
        let mut v = Voicemail::default();
        assert_eq!(
            v.apply(save("1002", "aa"), 10),
            VoicemailOutcome::Saved { id: 1 }
        );
        assert_eq!(
            v.apply(save("1002", "bb"), 20),
            VoicemailOutcome::Saved { id: 2 }
        );
        assert_eq!(v.counts("1002"), (2, 0));
        let m = &v.boxes["1002"].messages[&1];
        assert_eq!((m.received_ms, m.holders.clone()), (10, vec![1, 2]));
        let moved = VoicemailOp::Move {
            mailbox: "1002".into(),
            id: 1,
            folder: Folder::Old,
        };
        assert_eq!(v.apply(moved, 30), VoicemailOutcome::Changed);
        assert_eq!(v.counts("1002"), (1, 1));
        let delete = |id| VoicemailOp::Delete {
            mailbox: "1002".into(),
            id,
        };
        assert_eq!(v.apply(delete(2), 40), VoicemailOutcome::Changed);
        assert_eq!(v.apply(delete(2), 41), VoicemailOutcome::NoSuchMessage);
        assert_eq!(
            v.apply(save("1002", "cc"), 50),
            VoicemailOutcome::Saved { id: 3 }
        );
        assert_eq!(
            v.referenced_blobs().into_iter().collect::<Vec<_>>(),
            vec!["aa", "cc"]
        );
        assert_eq!(v.counts("nobody"), (0, 0));
    }

    #[test]
    fn a_full_mailbox_refuses_a_message() {
        let mut v = Voicemail::default();
        for i in 0..MAX_MESSAGES {
            assert!(matches!(
                v.apply(save("1003", &format!("{i}")), 1),
                VoicemailOutcome::Saved { .. }
            ));
        }
        assert_eq!(v.apply(save("1003", "x"), 2), VoicemailOutcome::MailboxFull);
        assert_eq!(v.counts("1003"), (MAX_MESSAGES, 0));
    }
}
