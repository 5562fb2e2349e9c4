//! RTP load for the media benchmark: 20 ms G.711 packets to every call's relay port
//! (the caller's side), counting what comes back through the relay from the callee's
//! RTP echo.
//!
//!   rtp-load --relay IP --ports FILE --local-ip IP --seconds S [--echo IP:PORT]
//!            [--sockets N]
//!
//! The callers send from `--sockets` sockets (default 1; the relay latches each call's
//! caller to the address its packets come from, as for a phone behind NAT), each with
//! a sending and a receiving thread using `sendmmsg`/`recvmmsg`: the load generator
//! shares the machine with the relay it measures and must cost far less than it. Each
//! call's packets are spread over the 20 ms period. Receivers look at their sockets
//! every millisecond rather than sleep on them (see `receive_loop`).
//!
//! `--echo`: also be the callee's RTP endpoint (the address its answer names): every
//! packet goes back where it came from, from one socket with large buffers on a thread
//! of its own.
//!
//! FILE holds one relay port per call, or SIPp `-trace_logs` lines
//! `answered USER relay PORT`. Prints: streams, sent, received, lost %, its own CPU
//! ticks.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

const BATCH: usize = 64;
const LEN: usize = 172;

fn packet(seq: u16, ssrc: u32) -> [u8; LEN] {
    let mut p = [0xd5u8; LEN];
    p[0] = 0x80;
    p[1] = 0;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq).wrapping_mul(160)).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = sock.set_recv_buffer_size(16 << 20);
    let _ = sock.set_send_buffer_size(16 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Receives batches until `stop`: calls `each` with every datagram's bytes and source,
/// `after` after each batch. A drained socket is looked at again 1 ms later, not
/// waited on: a sleeping reader makes every sender pay for waking it (on loopback the
/// relay would be charged for the load generator's wake-ups).
fn receive_loop(
    sock: &UdpSocket,
    stop: &AtomicBool,
    mut each: impl FnMut(&[u8], Option<SockaddrStorage>),
    mut after: impl FnMut(),
) {
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            if let Ok(results) = recvmmsg(
                sock.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                got.extend(results.map(|r| (r.bytes, r.address)));
            }
        }
        for (j, (n, from)) in got.iter().enumerate() {
            each(&bufs[j][..*n], *from);
        }
        after();
        if got.len() < BATCH {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Sends `packets` (all [`LEN`] bytes) to their addresses in batches.
fn send_all(
    sock: &UdpSocket,
    headers: &mut MultiHeaders<SockaddrStorage>,
    packets: &[([u8; LEN], SockaddrStorage)],
) -> usize {
    let mut sent = 0;
    for chunk in packets.chunks(BATCH) {
        let slices: Vec<[IoSlice<'_>; 1]> = chunk.iter().map(|(p, _)| [IoSlice::new(p)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = chunk.iter().map(|(_, a)| Some(*a)).collect();
        let mut off = 0;
        // A full send buffer: what was not taken is tried again (the buffer drains
        // fast on loopback), a few times at most.
        for _ in 0..100 {
            match sendmmsg(
                sock.as_raw_fd(),
                headers,
                slices[off..].iter(),
                &addrs[off..],
                [] as [ControlMessage<'_>; 0],
                MsgFlags::empty(),
            ) {
                Ok(r) => {
                    let n = r.count();
                    off += n;
                    sent += n;
                }
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
            if off >= chunk.len() {
                break;
            }
        }
    }
    sent
}

/// This process's CPU time (user + system, all threads) in clock ticks, from
/// /proc/self/stat: the benchmark reports what the load generator itself cost.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 11 and 12 after the name.
    [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum()
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
    let sockets: usize = get("--sockets").map_or(Ok(1), |s| s.parse())?;
    let text = std::fs::read_to_string(get("--ports")?)?;
    let ports: Vec<u16> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    if ports.is_empty() {
        bail!("no relay ports");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    if let Ok(addr) = get("--echo") {
        let sock = bind(addr.parse()?)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
            let back =
                std::cell::RefCell::new(Vec::<([u8; LEN], SockaddrStorage)>::with_capacity(BATCH));
            let mut out = [0u8; LEN];
            receive_loop(
                &sock,
                &stop,
                |data, from| {
                    if let (Some(from), true) = (from, data.len() == LEN) {
                        out.copy_from_slice(data);
                        back.borrow_mut().push((out, from));
                    }
                },
                || {
                    let mut b = back.borrow_mut();
                    send_all(&sock, &mut headers, &b);
                    b.clear();
                },
            );
        }));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs(seconds);
    let mut senders = Vec::new();
    for k in 0..sockets.max(1) {
        let sock = bind(SocketAddr::new(local, 0))?;
        // This socket's calls: every `sockets`-th.
        let mine: Vec<(usize, SockaddrStorage)> = ports
            .iter()
            .enumerate()
            .filter(|(i, _)| i % sockets.max(1) == k)
            .map(|(i, p)| (i, SockaddrStorage::from(SocketAddr::new(relay, *p))))
            .collect();
        let rx = sock.try_clone()?;
        let (stop_rx, received) = (stop.clone(), received.clone());
        threads.push(std::thread::spawn(move || {
            let n = std::cell::Cell::new(0u64);
            receive_loop(
                &rx,
                &stop_rx,
                |_, _| n.set(n.get() + 1),
                || {
                    received.fetch_add(n.take(), Ordering::Relaxed);
                },
            );
        }));
        let (sent, total) = (sent.clone(), ports.len());
        senders.push(std::thread::spawn(move || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
            let mut due: Vec<([u8; LEN], SockaddrStorage)> = Vec::with_capacity(mine.len());
            // Call i sends at start + i/total of the period, then every 20 ms; each
            // round (every millisecond) sends what fell due since the last one.
            let period_us = 20_000u64;
            let offsets: Vec<u64> = mine
                .iter()
                .map(|(i, _)| *i as u64 * period_us / total as u64)
                .collect();
            let mut count = vec![0u64; mine.len()];
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let t = now.saturating_duration_since(start).as_micros() as u64;
                due.clear();
                for (j, (i, to)) in mine.iter().enumerate() {
                    let want = if now < start || t < offsets[j] {
                        0
                    } else {
                        (t - offsets[j]) / period_us + 1
                    };
                    // Behind by more than two packets (a stalled thread): skip ahead
                    // rather than burst.
                    count[j] = count[j].max(want.saturating_sub(2));
                    while count[j] < want {
                        count[j] += 1;
                        due.push((packet(count[j] as u16, 0x10_0000 + *i as u32), *to));
                    }
                }
                if !due.is_empty() {
                    let n = send_all(&sock, &mut headers, &due);
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    for s in senders {
        let _ = s.join();
    }
    // Late packets still in flight.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let (s, r) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    println!(
        "streams={} sent={s} received={r} lost_pct={:.3} cpu_ticks={}",
        ports.len(),
        100.0 * s.saturating_sub(r) as f64 / s.max(1) as f64,
        cpu_ticks()
    );
    Ok(())
}
