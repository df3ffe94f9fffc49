//! A small MySQL load client for `cargo xtask bench --only mysql`: C
//! concurrent clients run `SELECT 1` for S seconds, on one connection each
//! (`persistent`) or on a new connection per query (`reconnect`), and the
//! run prints queries per second and p50/p99 latency (a query's, or in
//! `reconnect` mode connect + login + query).
//!
//! `mysql_bench HOST PORT USER CONCURRENCY SECONDS persistent|reconnect`;
//! the password comes on stdin (empty for a warden route, with or without
//! `kernel_relay`: a spliced connection answers the same). The login is
//! warden-mysql's own (mysql_native_password, caching_sha2_password,
//! ed25519).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_mysql::packet::{read_packet, write_packet};
use warden_mysql::upstream::{self, ClientParams, Target};

type Stream = warden_core::pgwire::upstream::UpstreamStream;

async fn login(target: &Target, user: &str, password: &[u8]) -> Result<Stream, String> {
    let g = upstream::connect(target)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let params = ClientParams {
        capabilities: 0,
        mariadb_caps: 0,
        max_packet: 1 << 24,
        charset: 45,
        database: None,
        attrs: None,
    };
    upstream::login(target, g, &params, user, password)
        .await
        .map(|l| l.stream)
        .map_err(|e| format!("{e:?}"))
}

/// `SELECT 1` and its whole answer (no CLIENT_DEPRECATE_EOF: column count,
/// column, EOF, row, EOF).
async fn select_one(s: &mut Stream) -> Result<(), String> {
    write_packet(s, 0, b"\x03SELECT 1")
        .await
        .map_err(|e| e.to_string())?;
    let mut eofs = 0;
    loop {
        let p = read_packet(s, 1 << 24).await.map_err(|e| e.to_string())?;
        match p.payload.first() {
            Some(0xff) => return Err(String::from_utf8_lossy(&p.payload[3..]).into_owned()),
            Some(0xfe) if p.payload.len() < 9 => {
                eofs += 1;
                if eofs == 2 {
                    return Ok(());
                }
            }
            _ => {}
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        return Err(
            "usage: mysql_bench HOST PORT USER CONCURRENCY SECONDS persistent|reconnect (password on stdin)"
                .into(),
        );
    }
    let host = args[1].clone();
    let port: u16 = args[2].parse().map_err(|_| "PORT is a number")?;
    let user = args[3].clone();
    let concurrency: usize = args[4].parse().map_err(|_| "CONCURRENCY is a number")?;
    let seconds: u64 = args[5].parse().map_err(|_| "SECONDS is a number")?;
    let reconnect = match args[6].as_str() {
        "persistent" => false,
        "reconnect" => true,
        _ => return Err("the mode is persistent or reconnect".into()),
    };
    let mut password = Vec::new();
    std::io::stdin()
        .read_to_end(&mut password)
        .map_err(|e| e.to_string())?;
    while password.last() == Some(&b'\n') {
        password.pop();
    }
    let target = Arc::new(Target {
        host,
        port,
        tls: None,
        server_name: None,
        ca_label: "none".into(),
        connect_timeout: Duration::from_secs(5),
    });
    let password = Arc::new(password);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (latencies, errors) = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (target, user, password) = (target.clone(), user.clone(), password.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                let mut errors = 0u64;
                let mut conn: Option<Stream> = None;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    if conn.is_none() {
                        match login(&target, &user, &password).await {
                            Ok(s) => conn = Some(s),
                            Err(_) => {
                                errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        }
                    }
                    let Some(s) = conn.as_mut() else { continue };
                    match select_one(s).await {
                        Ok(()) => lat.push(t0.elapsed()),
                        Err(_) => {
                            errors += 1;
                            conn = None;
                            continue;
                        }
                    }
                    if reconnect {
                        if let Some(mut s) = conn.take() {
                            let _ = write_packet(&mut s, 0, &[0x01]).await;
                        }
                    }
                }
                (lat, errors)
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            if let Ok((lat, e)) = t.await {
                all.extend(lat);
                errors += e;
            }
        }
        (all, errors)
    });
    let mut sorted = latencies;
    sorted.sort_unstable();
    println!(
        "qps={:.0} p50_ms={:.3} p99_ms={:.3} queries={} errors={errors}",
        sorted.len() as f64 / seconds.max(1) as f64,
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.len()
    );
    Ok(())
}
