//! What the kernel programs cost per `connect()`: loopback connect + close
//! with no monitor, with the monitor attached but the destination not watched
//! (every connect on the host pays this), and to a watched listener (sock_ops
//! attribution + two ring-buffer events), interleaved in one run.
//!
//! `cargo xtask bench` runs it (root only). Usage: `connect_cost [N] [ROUNDS]`.
#![allow(unsafe_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use warden_ebpf::{Monitor, MonitorConfig};

fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, correctly sized option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn sink() -> (SocketAddr, Arc<AtomicBool>) {
    let l = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind: {e}");
            std::process::exit(1);
        }
    };
    let addr = l.local_addr().unwrap_or_else(|_| std::process::exit(1));
    // A deep accept queue: with the default 128, a starved accept thread lets
    // SYNs drop and a connect waits a second for its retransmit.
    // SAFETY: a valid listening socket fd.
    unsafe {
        libc::listen(l.as_raw_fd(), 4096);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if s2.load(Ordering::Relaxed) {
                break;
            }
            drop(c);
        }
    });
    (addr, stop)
}

/// Median-free simple figure: ns per connect+close over `n` connects.
fn measure(addr: SocketAddr, n: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => {
                linger_zero(&s);
                drop(s);
            }
            Err(e) => {
                eprintln!("connect: {e}");
                std::process::exit(1);
            }
        }
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let (watched, _s1) = sink();
    let (unwatched, _s2) = sink();
    let (mut base, mut other, mut hit) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(measure(unwatched, n));
        let monitor = match Monitor::load(&MonitorConfig {
            listeners: vec![watched],
            warden_tgid: std::process::id(),
            ..MonitorConfig::default()
        }) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("cannot load the monitor (root needed): {e}");
                std::process::exit(2);
            }
        };
        // A reader draining on a timer, as the daemon does.
        let done = Arc::new(AtomicBool::new(false));
        let reader = monitor.take_events().map(|mut r| {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    r.drain(|_| {});
                    std::thread::sleep(warden_ebpf::DRAIN_INTERVAL);
                }
            })
        });
        other.push(measure(unwatched, n));
        hit.push(measure(watched, n));
        done.store(true, Ordering::Relaxed);
        if let Some(t) = reader {
            let _ = t.join();
        }
        let c = monitor.counters();
        if c.lost > 0 {
            println!("  note: {} events lost in this round", c.lost);
        }
    }
    let (b, o, h) = (median(base), median(other), median(hit));
    println!("connect+close on loopback, {n} per run, median of {rounds} interleaved rounds:");
    println!("  no monitor (baseline)          {b:>9.0} ns");
    println!(
        "  attached, destination ignored  {o:>9.0} ns  (+{:.0} ns, {:.2}x)",
        o - b,
        o / b
    );
    println!(
        "  attached, watched listener     {h:>9.0} ns  (+{:.0} ns, {:.2}x; attribution + 2 events)",
        h - b,
        h / b
    );
}
