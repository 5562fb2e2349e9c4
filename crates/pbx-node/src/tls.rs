//! SIP over TLS: the node's certificate, loaded from the files the config names and
//! reloaded when they change (new handshakes get the new one; open connections keep
//! theirs), and the acceptor that uses it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::NodeError;

/// Days before expiry from which every check warns.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// A certificate chain with its key, as loaded.
pub(crate) struct LoadedCert {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate (DER), hex: what `openssl x509 -fingerprint
    /// -sha256` prints, without the colons.
    pub fingerprint: String,
    /// The leaf's notAfter, seconds since the epoch (None: not found in the DER).
    pub not_after: Option<i64>,
}

/// Reads and checks a PEM chain (leaf first) and its private key (PKCS#8, PKCS#1 or
/// SEC1). The error says which file and why.
pub(crate) fn load(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{}: no certificate in the file",
            cert_path.display()
        ));
    };
    let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
    let not_after = not_after(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("{}: no private key: {e}", key_path.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("{} and {}: {e}", cert_path.display(), key_path.display()))?;
    Ok(LoadedCert {
        key: Arc::new(key),
        fingerprint,
        not_after,
    })
}

/// The certificate handshakes get: swapped whole on reload.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    #[cfg(test)]
    fn fingerprint(&self) -> String {
        let key = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        hex::encode(Sha256::digest(key.cert[0].as_ref()))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The TLS side of a node: the acceptor and what reloading needs.
pub(crate) struct SipTls {
    pub acceptor: TlsAcceptor,
    pub store: Arc<CertStore>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub reload_every: Duration,
    pub handshake_timeout: Duration,
}

impl SipTls {
    /// Loads the configured certificate (None: TLS is off). A missing or bad file stops
    /// the node at start, with its path.
    pub fn from_config(config: &Config) -> Result<Option<SipTls>, NodeError> {
        let t = &config.tls;
        let (Some(cert), Some(key)) = (&t.cert, &t.key) else {
            return Ok(None);
        };
        let (cert_path, key_path) = (config.resolve(cert), config.resolve(key));
        let loaded = load(&cert_path, &key_path).map_err(|reason| NodeError::Config {
            path: cert_path.clone(),
            reason: format!("tls: {reason}"),
        })?;
        log_loaded(&loaded, "TLS certificate loaded");
        let store = Arc::new(CertStore {
            current: RwLock::new(loaded.key),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| NodeError::Config {
            path: cert_path.clone(),
            reason: format!("tls: {e}"),
        })?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
        // SIP has no ALPN id; phones send none.
        server.alpn_protocols.clear();
        // No TLS 1.3 session tickets: phones keep one long connection and do not resume,
        // and some stacks (SIPp with wolfSSL) stall on a ticket that arrives after the
        // handshake.
        server.send_tls13_tickets = 0;
        Ok(Some(SipTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            store,
            cert_path,
            key_path,
            reload_every: Duration::from_secs(t.reload_check_secs),
            handshake_timeout: Duration::from_secs(t.handshake_timeout_secs),
        }))
    }

    /// Watches the two files; when either changes and the pair loads, new handshakes
    /// use it. A pair that does not load (half-written, key for another certificate) is
    /// reported and the old certificate stays.
    pub async fn watch(
        store: Arc<CertStore>,
        cert_path: PathBuf,
        key_path: PathBuf,
        every: Duration,
    ) {
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let mut seen = (stamp(&cert_path), stamp(&key_path));
        let mut failed_for = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut warned_day = None;
        loop {
            tick.tick().await;
            let now = (stamp(&cert_path), stamp(&key_path));
            if now != seen && failed_for != Some(now) {
                match load(&cert_path, &key_path) {
                    Ok(loaded) => {
                        *store.current.write().unwrap_or_else(|e| e.into_inner()) =
                            loaded.key.clone();
                        log_loaded(&loaded, "TLS certificate reloaded");
                        seen = now;
                        failed_for = None;
                    }
                    Err(reason) => {
                        // Often a pair caught between two writes: the next change retries.
                        tracing::error!(%reason, "TLS certificate not reloaded: the old one stays");
                        failed_for = Some(now);
                    }
                }
            }
            // Once a day, the expiry warning again.
            let day = unix_now() / 86_400;
            if warned_day != Some(day) {
                warned_day = Some(day);
                let leaf = store
                    .current
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .cert
                    .first()
                    .and_then(|c| not_after(c.as_ref()));
                warn_expiry(leaf);
            }
        }
    }
}

/// The system's CA bundle (Debian's `ca-certificates`), used when `tls.ca_file` is not
/// set.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The client side: connects to servers this node calls over TLS and checks that their
/// certificate chains to the configured CAs and names the SIP domain called.
pub(crate) fn client(config: &Config) -> Result<Option<tokio_rustls::TlsConnector>, NodeError> {
    let (path, configured) = match &config.tls.ca_file {
        Some(p) => (config.resolve(p), true),
        None => (PathBuf::from(SYSTEM_CA_BUNDLE), false),
    };
    let bad = |reason: String| NodeError::Config {
        path: path.clone(),
        reason: format!("tls.ca_file: {reason}"),
    };
    let certs = match CertificateDer::pem_file_iter(&path) {
        Ok(it) => it
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?,
        // No system bundle: no TLS to other domains, said once.
        Err(_) if !configured => {
            tracing::warn!(
                bundle = SYSTEM_CA_BUNDLE,
                "no CA bundle: calls to other domains over TLS are off"
            );
            return Ok(None);
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("no usable CA certificate in the file".into()));
    }
    if ignored > 0 {
        tracing::debug!(ignored, "CA certificates that did not parse were skipped");
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(client))))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn log_loaded(loaded: &LoadedCert, what: &str) {
    tracing::info!(
        sha256 = %loaded.fingerprint,
        not_after = %loaded.not_after.map(format_utc).unwrap_or_else(|| "unknown".into()),
        "{what}"
    );
    warn_expiry(loaded.not_after);
}

fn warn_expiry(not_after: Option<i64>) {
    let Some(t) = not_after else { return };
    let days = (t - unix_now()).div_euclid(86_400);
    if days < 0 {
        tracing::error!(not_after = %format_utc(t), "the TLS certificate has expired: phones will refuse it");
    } else if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(not_after = %format_utc(t), days, "the TLS certificate expires soon");
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn format_utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since the epoch of a civil date (inverse of the above).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One DER element at the start of `b`: (tag, contents, rest).
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The notAfter of an X.509 certificate (RFC 5280 §4.1: Certificate → tbsCertificate →
/// [0] version?, serial, signature, issuer, validity { notBefore, notAfter }).
pub(crate) fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, cert, _) = der_element(der)? else {
        return None;
    };
    let (0x30, tbs, _) = der_element(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, r) = der_element(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2; // serial, signature algorithm, issuer
    }
    let (0x30, validity, _) = der_element(rest)? else {
        return None;
    };
    let (_, _, r) = der_element(validity)?; // notBefore
    let (tag, time, _) = der_element(r)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let num = |s: &str| s.parse::<i64>().ok();
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSS, years 1950-2049.
        0x17 if text.len() == 12 => {
            let yy = num(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        0x18 if text.len() == 14 => (num(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let (mo, d, h, mi, s) = (
        num(&rest[0..2])?,
        num(&rest[2..4])?,
        num(&rest[4..6])?,
        num(&rest[6..8])?,
        num(&rest[8..10])?,
    );
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        let t = days_from_civil(2027, 2, 28) * 86_400 + 23 * 3600 + 59 * 60 + 58;
        assert_eq!(format_utc(t), "2027-02-28T23:59:58Z");
        assert_eq!(
            format_utc(days_from_civil(2024, 2, 29) * 86_400),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(
            format_utc(days_from_civil(2050, 12, 31) * 86_400),
            "2050-12-31T00:00:00Z"
        );
    }

    /// A DER certificate skeleton with the given validity times (tag, text).
    fn cert_with_validity(not_before: (u8, &str), not_after: (u8, &str)) -> Vec<u8> {
        fn el(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
            }
            v.extend_from_slice(content);
            v
        }
        let validity = [
            el(not_before.0, not_before.1.as_bytes()),
            el(not_after.0, not_after.1.as_bytes()),
        ]
        .concat();
        let tbs = [
            el(0xa0, &el(0x02, &[2])),
            el(0x02, &[0x01, 0x23]),
            el(0x30, &el(0x06, &[0x2a, 0x86, 0x48])),
            el(0x30, &[0u8; 200]), // a long issuer: two-byte length
            el(0x30, &validity),
            el(0x30, b"subject"),
        ]
        .concat();
        el(
            0x30,
            &[el(0x30, &tbs), el(0x30, b"sigalg"), el(0x03, b"sig")].concat(),
        )
    }

    #[test]
    fn not_after_reads_utc_and_generalized_time() {
        let c = cert_with_validity((0x17, "260101000000Z"), (0x17, "270315123000Z"));
        assert_eq!(
            not_after(&c).map(format_utc).as_deref(),
            Some("2027-03-15T12:30:00Z")
        );
        let c = cert_with_validity((0x17, "260101000000Z"), (0x18, "20510101000000Z"));
        assert_eq!(
            not_after(&c).map(format_utc).as_deref(),
            Some("2051-01-01T00:00:00Z")
        );
        let c = cert_with_validity((0x17, "260101000000Z"), (0x17, "990101000000Z"));
        assert_eq!(
            not_after(&c).map(format_utc).as_deref(),
            Some("1999-01-01T00:00:00Z")
        );
    }

    #[test]
    fn not_after_of_garbage_is_none() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(not_after(&[0x30, 0x10, 0x30]), None);
        let c = cert_with_validity((0x17, "260101000000Z"), (0x17, "2701Z"));
        assert_eq!(not_after(&c), None);
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/tls")
            .join(name)
    }

    const A_SHA256: &str = "726891ed4304650a638fe9f1bc93317ea39987d1869d6cd254513fbbd74aad83";

    #[test]
    fn a_pair_loads_with_its_fingerprint_and_expiry() {
        let c = load(&fixture("a.crt"), &fixture("a.key")).unwrap();
        assert_eq!(c.fingerprint, A_SHA256);
        assert_eq!(
            c.not_after.map(format_utc).as_deref(),
            Some("2126-10-29T11:57:43Z")
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let e = load(&fixture("a.crt"), &fixture("b.key")).err().unwrap();
        assert!(e.contains("a.crt") && e.contains("b.key"), "{e}");
        assert!(e.to_lowercase().contains("key"), "{e}");
    }

    #[tokio::test]
    async fn changed_files_are_picked_up_and_a_broken_pair_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("sip.crt"), dir.path().join("sip.key"));
        let copy = |from: &str, to: &Path| std::fs::copy(fixture(from), to).unwrap();
        copy("a.crt", &cert);
        copy("a.key", &key);
        let store = Arc::new(CertStore {
            current: RwLock::new(load(&cert, &key).unwrap().key),
        });
        let watcher = tokio::spawn(SipTls::watch(
            store.clone(),
            cert.clone(),
            key.clone(),
            Duration::from_millis(10),
        ));
        let b = load(&fixture("b.crt"), &fixture("b.key"))
            .unwrap()
            .fingerprint;
        // A half-done renewal (new certificate, old key) is not taken...
        copy("b.crt", &cert);
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.fingerprint(), A_SHA256);
        // ...the finished one is.
        copy("b.key", &key);
        while store.fingerprint() != b {
            assert!(
                tokio::time::Instant::now() < until,
                "new certificate not loaded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Garbage over a good pair: the good one stays.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.fingerprint(), b);
        watcher.abort();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("sip.crt");
        let key = dir.path().join("sip.key");
        let e = load(&cert, &key).err().unwrap();
        assert!(e.contains("sip.crt"), "{e}");
        std::fs::write(&cert, "not a pem\n").unwrap();
        let e = load(&cert, &key).err().unwrap();
        assert!(e.contains("sip.crt") && e.contains("no certificate"), "{e}");
    }
}
