//! SIP and DNS, sans-IO: how a request finds its server (RFC 3263 [`locate`]) and the
//! records through which phones find the cluster ([`zone`]). The resolver driver
//! (`pbx-resolver`) and the cluster's DNS server (`pbx-node`) do the I/O.

pub mod locate;
pub mod zone;
