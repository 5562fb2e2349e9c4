//! The SIP endpoint of a node, sans-IO (in the spirit of quinn-proto's `Endpoint`).
//!
//! The driver feeds it every message it reads ([`Endpoint::handle`], with `now` and a
//! read view of the replicated state) and carries out the one [`Event`] it returns:
//! send bytes, commit a command and hand the result back ([`Endpoint::commit_done`]),
//! start a call, hand a message to a running call, or relay a phone's message to the
//! node that runs its call. Timers come out of [`Endpoint::poll_timeout`],
//! [`Endpoint::handle_timeout`] and [`Endpoint::poll_transmit`].
//!
//! It owns the server-transaction table, the routing of messages to calls by Call-ID,
//! the memory of calls other nodes run for phones connected here, and every SIP
//! decision about a request: the registrar's answer (from [`pbx_registrar`]), call
//! admission (call limit, no dialplan, no route) and which contacts a Dial rings.
//!
//! Methods take `&self`: the driver's UDP workers call [`Endpoint::handle`] at once, and
//! parsing and digest checks run outside any lock; only the transaction table, the
//! call routes and the relayed calls are locked, each briefly.

mod admission;
mod endpoint;
pub mod mwi;
mod outcomes;
mod overload;
mod relayed;
mod stun;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use bytes::Bytes;
use pbx_dialplan::Execution;
use pbx_sip_core::TransactionKey;
use pbx_sip_msg::{CoreHeaders, SipMessage};
use pbx_state::{Command, Transport};

pub use admission::{
    leg_instance, legs_reachable, resume_dest, udp_target, Contacts, NatPolicy, Refused,
    SkipReason, Skipped,
};
pub use endpoint::{lock, CommitToken, Endpoint, EndpointConfig};
pub use outcomes::RegisterOutcomes;
pub use overload::{OverloadConfig, ShedCounts};

/// Errors of this crate (configuration that cannot work).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Registrar(#[from] pbx_registrar::RegistrarError),
}

/// Where a transaction's responses, or a call's requests, go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    Udp(SocketAddr),
    /// A connection (TCP or TLS) by id, and the peer address: the connection now held
    /// to that address if the id is gone, or (TCP only) a new one.
    Conn(u64, SocketAddr, Transport),
    /// A phone whose connection another node holds: through that node's Relay RPC.
    Peer(u64, SocketAddr, Transport),
}

impl Dest {
    pub fn transport(&self) -> Transport {
        match self {
            Dest::Udp(_) => Transport::Udp,
            Dest::Conn(_, _, t) | Dest::Peer(_, _, t) => *t,
        }
    }
}

impl pbx_b2bua::Destination for Dest {
    fn transport(&self) -> Transport {
        Dest::transport(self)
    }

    fn describe(&self) -> String {
        match self {
            Dest::Udp(a) => a.to_string(),
            Dest::Conn(_, a, t) => format!("{a} ({})", t.as_str()),
            Dest::Peer(node, a, t) => format!("{a} ({}) via node {node}", t.as_str()),
        }
    }
}

/// How a message reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Udp,
    /// On one of our connections (TCP or TLS).
    Conn(u64, Transport),
    /// Relayed by another node from a phone whose connection it holds.
    Peer(u64),
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: Dest,
    pub bytes: Bytes,
}

/// A message for a running call.
#[derive(Debug)]
pub enum CallMessage {
    /// A request of the call's dialogs, or a CANCEL of its INVITE. Its server
    /// transaction (ACK aside) is open: the call answers it with [`Endpoint::respond`].
    Request {
        msg: SipMessage,
        core: CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
    },
    /// A response to one of the call's requests.
    Response { msg: SipMessage, core: CoreHeaders },
}

/// An admitted INVITE: its server transaction is open and the dialplan has a route for
/// it. The driver opens the media relay, then starts the call and registers it with
/// [`Endpoint::start_call`], or refuses it with [`Endpoint::refuse`].
#[derive(Debug)]
pub struct NewCall {
    pub msg: SipMessage,
    pub core: CoreHeaders,
    pub key: TransactionKey,
    pub source: SocketAddr,
    /// Where the INVITE's responses go.
    pub dest: Dest,
    /// The authenticated caller (user name).
    pub caller: String,
    /// The extension dialled (the Request-URI's user).
    pub exten: String,
    /// A `sips:` Request-URI: the call is only put through over TLS (RFC 5630).
    pub secure: bool,
    /// The cluster's SIP domain.
    pub domain: String,
    /// The dialplan, started at the extension.
    pub exec: Execution,
    /// An INVITE with `Replaces` (RFC 3891): the caller takes the place of a party of
    /// another call instead of running the dialplan.
    pub replaces: Option<pbx_b2bua::Replaces>,
}

/// What the driver must do with a message it fed to [`Endpoint::handle`].
// Returned by value and carried out at once: boxing the large variants would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<C> {
    /// Send these bytes.
    Transmit(Transmit),
    /// Nothing could be answered (no Via to reply to): a stream that delivered this is
    /// out of step and should be closed.
    Unanswerable,
    /// Commit this command, then call [`Endpoint::commit_done`] with the token and the
    /// result. The transaction absorbs retransmissions meanwhile.
    Commit {
        command: Box<Command>,
        token: CommitToken,
    },
    /// An INVITE that starts a call.
    StartCall(Box<NewCall>),
    /// An INVITE refused before any call started (the response is in `transmit`).
    CallRefused {
        transmit: Option<Transmit>,
        reason: Refused,
    },
    /// A message for the running call `C`.
    ToCall(C, CallMessage),
    /// A phone's message of a call that `node` runs: hand it to that node.
    Relay {
        node: u64,
        source: SocketAddr,
        bytes: Vec<u8>,
    },
}
