//! Digest authentication (RFC 7616, with RFC 2617 compatibility), sans-IO.
//!
//! Nonces are stateless: `hex(issued_at_secs) ‖ hex(salt) ‖ hex(HMAC-SHA256(secret,
//! issued_at ‖ salt ‖ realm))[..32]`, so any node holding the cluster secret verifies a
//! nonce another node issued. The salt makes every challenge's nonce unique. What does need memory, nonce-count replay protection, is kept per node.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn parse(s: Option<&str>) -> Option<Algorithm> {
        match s {
            None => Some(Algorithm::Md5),
            Some(a) if a.eq_ignore_ascii_case("MD5") => Some(Algorithm::Md5),
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    pub fn hash_hex(&self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(data)),
            Algorithm::Sha256 => hex::encode(Sha256::digest(data)),
        }
    }
}

/// HA1 = H(username ":" realm ":" password).
pub fn ha1(alg: Algorithm, user: &str, realm: &str, password: &str) -> String {
    alg.hash_hex(format!("{user}:{realm}:{password}").as_bytes())
}

/// Issues and checks stateless nonces.
#[derive(Clone)]
pub struct NonceKey {
    secret: Vec<u8>,
}

/// What a nonce turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Genuine but too old: answer with `stale=true` if the credentials were right.
    Stale,
    Invalid,
}

impl NonceKey {
    pub fn new(secret: &[u8]) -> Self {
        NonceKey {
            secret: secret.to_vec(),
        }
    }

    fn mac(&self, issued: u64, salt: u64, realm: &str) -> String {
        let mut m =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length");
        m.update(&issued.to_be_bytes());
        m.update(&salt.to_be_bytes());
        m.update(realm.as_bytes());
        hex::encode(&m.finalize().into_bytes()[..16])
    }

    /// A new nonce; `salt` must differ between nonces issued in the same second.
    pub fn issue(&self, now_secs: u64, salt: u64, realm: &str) -> String {
        format!(
            "{now_secs:016x}{salt:016x}{}",
            self.mac(now_secs, salt, realm)
        )
    }

    pub fn check(&self, nonce: &str, realm: &str, now_secs: u64, ttl_secs: u64) -> NonceCheck {
        if nonce.len() != 64 || !nonce.is_ascii() {
            return NonceCheck::Invalid;
        }
        let (Ok(issued), Ok(salt)) = (
            u64::from_str_radix(&nonce[..16], 16),
            u64::from_str_radix(&nonce[16..32], 16),
        ) else {
            return NonceCheck::Invalid;
        };
        let expected = self.mac(issued, salt, realm);
        if !constant_time_eq(expected.as_bytes(), &nonce.as_bytes()[32..]) {
            return NonceCheck::Invalid;
        }
        // A little clock skew between nodes is tolerated; a nonce from the future is not.
        if issued > now_secs + 5 {
            return NonceCheck::Invalid;
        }
        if now_secs - issued.min(now_secs) > ttl_secs {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid
    }
}

/// Compares in time independent of where the inputs differ (digest responses, nonce
/// MACs, the admin API's bearer token).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The fields of a Digest `Authorization` header we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestCredentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    /// (qop, nc, cnonce) when qop=auth was used.
    pub qop: Option<(String, u32, String)>,
}

impl DigestCredentials {
    /// From a parsed header; `None` when it is not a usable Digest credential (unknown
    /// scheme, algorithm or qop, missing fields): the request is then challenged afresh.
    pub fn from_header(h: &pbx_sip_msg::AuthHeader) -> Option<Self> {
        if !h.scheme.eq_ignore_ascii_case("Digest") {
            return None;
        }
        let algorithm = Algorithm::parse(h.get("algorithm"))?;
        let qop = match h.get("qop") {
            None => None,
            Some(q) if q.eq_ignore_ascii_case("auth") => {
                let nc = h.get("nc")?;
                if nc.len() != 8 {
                    return None;
                }
                let nc = u32::from_str_radix(nc, 16).ok()?;
                Some(("auth".to_string(), nc, h.get("cnonce")?.to_string()))
            }
            Some(_) => return None,
        };
        Some(DigestCredentials {
            username: h.get("username")?.to_string(),
            realm: h.get("realm")?.to_string(),
            nonce: h.get("nonce")?.to_string(),
            uri: h.get("uri")?.to_string(),
            response: h.get("response")?.to_ascii_lowercase(),
            algorithm,
            qop,
        })
    }

    /// The response a client holding `ha1` would compute for `method`.
    pub fn expected_response(&self, ha1: &str, method: &str) -> String {
        let alg = self.algorithm;
        let ha2 = alg.hash_hex(format!("{method}:{}", self.uri).as_bytes());
        match &self.qop {
            Some((qop, nc, cnonce)) => alg
                .hash_hex(format!("{ha1}:{}:{nc:08x}:{cnonce}:{qop}:{ha2}", self.nonce).as_bytes()),
            None => alg.hash_hex(format!("{ha1}:{}:{ha2}", self.nonce).as_bytes()),
        }
    }

    pub fn verify(&self, ha1: &str, method: &str) -> bool {
        constant_time_eq(
            self.expected_response(ha1, method).as_bytes(),
            self.response.as_bytes(),
        )
    }
}

/// What a client needs to answer a challenge (used by pbxctl and tests).
#[derive(Debug, Clone)]
pub struct ClientAuth<'a> {
    pub algorithm: Algorithm,
    pub user: &'a str,
    pub password: &'a str,
    pub realm: &'a str,
    pub nonce: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    pub nc: u32,
    pub cnonce: &'a str,
}

impl ClientAuth<'_> {
    /// The `Authorization` header value with qop=auth.
    pub fn header_value(&self) -> String {
        let creds = DigestCredentials {
            username: self.user.into(),
            realm: self.realm.into(),
            nonce: self.nonce.into(),
            uri: self.uri.into(),
            response: String::new(),
            algorithm: self.algorithm,
            qop: Some(("auth".into(), self.nc, self.cnonce.into())),
        };
        let ha1 = ha1(self.algorithm, self.user, self.realm, self.password);
        let resp = creds.expected_response(&ha1, self.method);
        format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{resp}\", algorithm={}, qop=auth, nc={:08x}, cnonce=\"{}\"",
            self.user,
            self.realm,
            self.nonce,
            self.uri,
            self.algorithm.as_str(),
            self.nc,
            self.cnonce
        )
    }
}

/// Highest nonce-count seen per nonce, so a captured request cannot be replayed. Two
/// generations rotated every nonce lifetime bound the memory without a sweep.
#[derive(Debug, Default)]
pub struct NonceCounts {
    current: HashMap<String, u32>,
    previous: HashMap<String, u32>,
    rotated_at: u64,
}

impl NonceCounts {
    /// Records `nc` for `nonce`; false when it is not higher than one already used.
    pub fn accept(&mut self, nonce: &str, nc: u32, now_secs: u64, ttl_secs: u64) -> bool {
        if now_secs >= self.rotated_at + ttl_secs.max(1) {
            self.previous = std::mem::take(&mut self.current);
            self.rotated_at = now_secs;
        }
        let seen = self
            .current
            .get(nonce)
            .or_else(|| self.previous.get(nonce))
            .copied();
        if seen.is_some_and(|s| nc <= s) {
            return false;
        }
        self.current.insert(nonce.to_string(), nc);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }

    #[test]
    fn rfc7616_sha256_example() {
        // RFC 7616 §3.9.1 (SHA-256, qop=auth).
        let creds = DigestCredentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            uri: "/dir/index.html".into(),
            response: "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1".into(),
            algorithm: Algorithm::Sha256,
            qop: Some((
                "auth".into(),
                1,
                "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ".into(),
            )),
        };
        let ha1 = ha1(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert!(creds.verify(&ha1, "GET"));
        assert!(!creds.verify(&ha1, "POST"));
    }

    #[test]
    fn rfc7616_md5_example() {
        let creds = DigestCredentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            uri: "/dir/index.html".into(),
            response: "8ca523f5e9506fed4657c9700eebdbec".into(),
            algorithm: Algorithm::Md5,
            qop: Some((
                "auth".into(),
                1,
                "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ".into(),
            )),
        };
        let ha1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert!(creds.verify(&ha1, "GET"));
    }

    #[test]
    fn nonces_verify_across_nodes_and_go_stale() {
        let a = NonceKey::new(b"cluster-secret");
        let b = NonceKey::new(b"cluster-secret");
        let n = a.issue(1000, 1, "pbx.test");
        assert_ne!(n, a.issue(1000, 2, "pbx.test"));
        assert_eq!(b.check(&n, "pbx.test", 1010, 60), NonceCheck::Valid);
        assert_eq!(b.check(&n, "pbx.test", 1061, 60), NonceCheck::Stale);
        assert_eq!(b.check(&n, "other", 1010, 60), NonceCheck::Invalid);
        assert_eq!(
            NonceKey::new(b"x").check(&n, "pbx.test", 1010, 60),
            NonceCheck::Invalid
        );
        let mut forged = n.clone();
        forged.replace_range(0..16, &format!("{:016x}", 2000));
        assert_eq!(b.check(&forged, "pbx.test", 2000, 60), NonceCheck::Invalid);
        assert_eq!(b.check("short", "pbx.test", 1010, 60), NonceCheck::Invalid);
    }

    #[test]
    fn nonce_count_replay_is_refused() {
        let mut nc = NonceCounts::default();
        assert!(nc.accept("n1", 1, 0, 60));
        assert!(!nc.accept("n1", 1, 1, 60), "same nc replayed");
        assert!(nc.accept("n1", 2, 2, 60));
        assert!(nc.accept("n2", 1, 2, 60));
        // survives one rotation
        assert!(!nc.accept("n1", 2, 61, 60));
    }
}
