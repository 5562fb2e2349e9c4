//! RTP load for the media benchmark: one socket per call sends 20 ms G.711 packets to
//! the call's relay port (the caller's side) and counts what comes back through the
//! relay from the callee's RTP echo.
//!
//!   rtp-load --relay IP --ports FILE --local-ip IP --seconds S [--echo IP:PORT]
//!
//! `--echo`: also be the callee's RTP endpoint (the address its answer names): every
//! packet goes back where it came from, from one socket with a large buffer on a thread
//! of its own.
//!
//! FILE holds one relay port per call, or SIPp `-trace_logs` lines
//! `answered USER relay PORT`. Prints: streams, sent, received, lost %.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

fn packet(seq: u16, ssrc: u32) -> [u8; 172] {
    let mut p = [0xd5u8; 172];
    p[0] = 0x80;
    p[1] = 0;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| -> anyhow::Result<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .with_context(|| format!("missing {name}"))
    };
    let relay: IpAddr = get("--relay")?.parse()?;
    let local: IpAddr = get("--local-ip")?.parse()?;
    let seconds: u64 = get("--seconds")?.parse()?;
    let text = std::fs::read_to_string(get("--ports")?)?;
    let ports: Vec<u16> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    if ports.is_empty() {
        bail!("no relay ports");
    }
    if let Ok(addr) = get("--echo") {
        let addr: SocketAddr = addr.parse()?;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        sock.bind(&addr.into())?;
        let sock: std::net::UdpSocket = sock.into();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let sock = tokio::net::UdpSocket::bind((local, 0)).await?;
            let to = SocketAddr::new(relay, *port);
            let (sent, received) = (sent.clone(), received.clone());
            // Spread the streams over the 20 ms period.
            let offset = Duration::from_micros((i as u64 * 20_000 / ports.len() as u64) % 20_000);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
                let mut buf = [0u8; 2048];
                let mut seq = 0u16;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if tokio::time::Instant::now() >= end { break; }
                            seq = seq.wrapping_add(1);
                            if sock.send_to(&packet(seq, 0x10_0000 + i as u32), to).await.is_ok() {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        r = sock.recv_from(&mut buf) => {
                            if r.is_ok() { received.fetch_add(1, Ordering::Relaxed); }
                        }
                    }
                }
                // Late packets still in flight.
                let drain = tokio::time::sleep(Duration::from_millis(300));
                tokio::pin!(drain);
                loop {
                    tokio::select! {
                        _ = &mut drain => break,
                        r = sock.recv_from(&mut buf) => {
                            if r.is_ok() { received.fetch_add(1, Ordering::Relaxed); }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })?;
    let (s, r) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    println!(
        "streams={} sent={s} received={r} lost_pct={:.3}",
        ports.len(),
        100.0 * s.saturating_sub(r) as f64 / s.max(1) as f64
    );
    Ok(())
}
