//! A continuous stream of authenticated REGISTERs for the failover benchmark: `--workers`
//! sequential clients per target, each with users of its own, each REGISTER answered
//! 401 then sent again with its digest (UDP, retransmitted as RFC 3261's timer E does,
//! a transaction given up after `--timeout`).
//!
//!   register-stream --targets IP:PORT,.. --local-ip IP --domain D --seconds S
//!                   [--workers N] [--users N] [--timeout SECS] [--marks FILE]
//!                   [--until-file FILE]   (stop early once FILE exists)
//!
//! Users are `u000001`.. with passwords `pw000001`.. (the benchmark's users file).
//! At the end it prints the totals, and for each line `EPOCH_MS LABEL` of `--marks`
//! (written by the benchmark while the stream ran: a kill, a stop) what the stream saw
//! from that moment until the next mark: the longest time without any 200 OK, the
//! REGISTERs answered 503 and those that timed out.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use pbx_tests::RegisterClient;

/// One finished REGISTER transaction (with its challenge).
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Milliseconds since the Unix epoch when it ended.
    at_ms: u64,
    /// Final status; 0 = timed out.
    status: u16,
    latency: Duration,
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let need = |name: &str| get(name).with_context(|| format!("missing {name}"));
    let targets: Vec<SocketAddr> = need("--targets")?
        .split(',')
        .map(|t| t.parse().with_context(|| format!("bad target {t}")))
        .collect::<anyhow::Result<_>>()?;
    let local: IpAddr = need("--local-ip")?.parse()?;
    let domain = need("--domain")?;
    let seconds: u64 = need("--seconds")?.parse()?;
    let workers: usize = get("--workers").map_or(Ok(4), |w| w.parse())?;
    let users: usize = get("--users").map_or(Ok(1000), |w| w.parse())?;
    let timeout = Duration::from_secs_f64(get("--timeout").map_or(Ok(4.0), |t| t.parse())?);
    let marks = get("--marks");
    let until_file = get("--until-file").map(std::path::PathBuf::from);

    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(f) = until_file {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !f.exists() {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let clients = targets.len() * workers;
    let mut threads = Vec::new();
    for (i, target) in targets
        .iter()
        .enumerate()
        .flat_map(|(t, a)| (0..workers).map(move |w| (t * workers + w, *a)))
    {
        let sock = UdpSocket::bind((local, 0))?;
        let mut client = RegisterClient::new(sock, target, &domain, timeout)?;
        let outcomes = outcomes.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            // Each client cycles through a slice of the users of its own.
            let per = (users / clients).max(1);
            let mut n: u64 = 0;
            while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let u = i * per + (n as usize % per) + 1;
                let started = Instant::now();
                let status = client.register(&format!("u{u:06}"), &format!("pw{u:06}"), n);
                record(&outcomes, status, started.elapsed());
                n += 1;
                if status != 200 {
                    // What a phone does after a failure, quicker: try again soon.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let mut all = outcomes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    all.sort_by_key(|o| o.at_ms);
    report(&all, started.elapsed(), marks.as_deref())
}

fn record(outcomes: &Mutex<Vec<Outcome>>, status: u16, latency: Duration) {
    if let Ok(mut o) = outcomes.lock() {
        o.push(Outcome {
            at_ms: epoch_ms(),
            status,
            latency,
        });
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(all: &[Outcome], ran: Duration, marks: Option<&str>) -> anyhow::Result<()> {
    let ok: Vec<&Outcome> = all.iter().filter(|o| o.status == 200).collect();
    let mut lat: Vec<Duration> = ok.iter().map(|o| o.latency).collect();
    lat.sort();
    println!(
        "registers {}  ok {}  503 {}  timeouts {}  other {}  rate {:.0}/s  p50 {:.1} ms  p99 {:.1} ms",
        all.len(),
        ok.len(),
        all.iter().filter(|o| o.status == 503).count(),
        all.iter().filter(|o| o.status == 0).count(),
        all.iter()
            .filter(|o| !matches!(o.status, 0 | 200 | 503))
            .count(),
        ok.len() as f64 / ran.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
    let Some(path) = marks else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let marks: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let (t, label) = l.split_once(' ')?;
            Some((t.parse().ok()?, label.to_string()))
        })
        .collect();
    println!(
        "{:<28} {:>14} {:>10} {:>6} {:>9}",
        "event", "longest gap ms", "gap at ms", "503", "timeouts"
    );
    for (i, (at, label)) in marks.iter().enumerate() {
        let until = marks.get(i + 1).map_or(u64::MAX, |m| m.0);
        let (gap, gap_at) = longest_gap(&ok, *at, until);
        let within = |o: &&Outcome| o.at_ms >= *at && o.at_ms < until;
        println!(
            "{label:<28} {gap:>14} {gap_at:>10} {:>6} {:>9}",
            all.iter()
                .filter(within)
                .filter(|o| o.status == 503)
                .count(),
            all.iter().filter(within).filter(|o| o.status == 0).count(),
        );
    }
    Ok(())
}

/// The longest time without a 200 OK from `from` until `until` (the first 200 before
/// `from` opens the first interval), and when (ms after `from`) it ended.
fn longest_gap(ok: &[&Outcome], from: u64, until: u64) -> (u64, u64) {
    let mut prev = ok
        .iter()
        .rev()
        .find(|o| o.at_ms < from)
        .map_or(from, |o| o.at_ms);
    let mut best = (0, 0);
    for o in ok.iter().filter(|o| o.at_ms >= from && o.at_ms < until) {
        let gap = o.at_ms - prev;
        if gap > best.0 {
            best = (gap, o.at_ms.saturating_sub(from));
        }
        prev = o.at_ms;
    }
    best
}
