use pbx_sip_msg::{CoreHeaders, Method};

/// Identifies a server transaction (RFC 3261 §17.2.3).
///
/// With an RFC 3261 branch: branch + sent-by + method, where ACK maps to INVITE so that
/// the ACK for a non-2xx final response finds its transaction. Without the magic cookie
/// (RFC 2543 peers, RFC 4475 badbranch): Request-URI, From tag, Call-ID, CSeq number and
/// top Via, which is what §17.2.3 asks for backwards compatibility.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionKey(String);

impl TransactionKey {
    pub fn for_request(method: &Method, request_uri: &str, core: &CoreHeaders) -> Self {
        let via = &core.vias[0];
        let m = match method {
            Method::Ack => "INVITE",
            other => other.as_str(),
        };
        let port = via.port.unwrap_or(0);
        if via.has_rfc3261_branch() {
            let branch = via.branch().unwrap_or_default();
            TransactionKey(format!("{branch}|{}:{port}|{m}", via.host))
        } else {
            TransactionKey(format!(
                "2543|{request_uri}|{}|{}|{}|{}:{port}|{}|{m}",
                core.from.tag().unwrap_or_default(),
                core.call_id,
                core.cseq.seq,
                via.host,
                via.branch().unwrap_or_default(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
