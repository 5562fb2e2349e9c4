//! The B2BUA, sans-IO: one [`Call`] per caller INVITE. It answers the caller's leg (A),
//! runs the dialplan, places one B-leg per contact of the dialled users (parallel fork,
//! first 2xx wins, the others are cancelled), relays provisional and final responses,
//! CANCEL, BYE, re-INVITE and in-dialog OPTIONS/INFO/UPDATE between the two dialogs, and
//! rewrites every SDP so media flows through the node's relay.
//!
//! Inputs come with `now` (messages routed to the call by Call-ID, timer ticks, media
//! notices, resolved contacts); outputs are queued for the driver ([`Call::poll_output`]):
//! bytes to send, responses for server transactions the driver's table holds, relay
//! commands, records to replicate. The driver owns sockets, clocks and the relay.

mod call;
mod dialog;
mod voicemail;

pub use call::{
    streams_needed, Call, CallParams, Contact, HandOver, MediaNotice, MediaOp, MediaPorts, Output,
    Replaces, FAILOVER_SILENCE,
};
pub use dialog::{Destination, Dialog, Local};
pub use voicemail::{
    Recorded, StoreError, VmReply, VmRequest, KEY_TIMEOUT, LOGIN_ATTEMPTS, MAX_GREETING,
    MAX_MESSAGE, MIN_RECORDING_MS,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum B2buaError {
    /// A replicated call record that cannot be resumed.
    #[error("call {call_id}: cannot resume: {why}")]
    Record { call_id: String, why: String },
}

#[cfg(test)]
mod tests;
