//! A Workload API client for the soak bench (`cargo xtask bench --only
//! soak`): it holds one `FetchX509SVID` stream open (the independent
//! `spiffe` crate as the client) and checks every update it gets.
//!
//! ```text
//! svid_stream <socket path> <expected SPIFFE ID> <seconds>
//! ```
//!
//! With `<seconds>` = 0 it takes the first update and exits (a workload
//! starting up); otherwise it keeps the stream for that long. Each update
//! prints one line, `update <s since start> <serial hex> <s it is valid
//! for> <s the previous SVID still had>` (`-` for the first); the last line
//! is `done <updates>`. It exits 1 with one
//! `error:` line when the stream cannot be opened or ends early, an update
//! does not arrive within two minutes, or an update is wrong: another SPIFFE
//! ID, not valid at the time it arrives, the same certificate again, or a
//! leaf not issued by a CA of the bundle that came with it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_stream::StreamExt;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Longest wait for the next update (the soak's SVID TTL is 2 minutes, so
/// a rotated SVID is due every minute).
const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, expected, seconds] = args.as_slice() else {
        eprintln!("usage: svid_stream <socket path> <expected SPIFFE ID> <seconds>");
        std::process::exit(2);
    };
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("error: <seconds> must be a whole number, got {seconds:?}");
        std::process::exit(2);
    };
    match watch(socket, expected, seconds).await {
        Ok(updates) => println!("done {updates}"),
        Err(e) => {
            println!("error: {e}");
            std::process::exit(1);
        }
    }
}

async fn watch(socket: &str, expected: &str, seconds: u64) -> Result<u64, String> {
    let started = Instant::now();
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{socket}"))
        .await
        .map_err(|e| format!("cannot connect to the Workload API at {socket}: {e}"))?;
    let mut stream = client
        .stream_x509_contexts()
        .await
        .map_err(|e| format!("cannot open the X.509-SVID stream: {e}"))?;
    let until = started + Duration::from_secs(seconds);
    let mut previous: Option<(Vec<u8>, i64)> = None;
    let mut updates = 0u64;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if seconds > 0 && left.is_zero() {
            return Ok(updates);
        }
        let wait = if seconds == 0 {
            PATIENCE
        } else {
            left.min(PATIENCE)
        };
        let next = match tokio::time::timeout(wait, stream.next()).await {
            Err(_) if seconds > 0 && Instant::now() >= until => return Ok(updates),
            Err(_) => {
                return Err(format!(
                    "no update for {} s after update {updates}",
                    wait.as_secs()
                ))
            }
            Ok(None) => return Err(format!("the stream ended after {updates} updates")),
            Ok(Some(Err(e))) => return Err(format!("update {}: {e}", updates + 1)),
            Ok(Some(Ok(context))) => context,
        };
        updates += 1;
        let svid = next
            .default_svid()
            .ok_or_else(|| format!("update {updates} holds no SVID"))?;
        if svid.spiffe_id().to_string() != expected {
            return Err(format!(
                "update {updates} is for {}, not {expected}",
                svid.spiffe_id()
            ));
        }
        let leaf_der = svid.leaf().as_bytes();
        let (_, leaf) = X509Certificate::from_der(leaf_der)
            .map_err(|e| format!("update {updates}: the leaf does not parse: {e}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs() as i64;
        let validity = leaf.validity();
        let expires_in = validity.not_after.timestamp() - now;
        // One second of slack for the clock's granularity at issue time.
        if validity.not_before.timestamp() > now + 1 || expires_in <= 0 {
            return Err(format!(
                "update {updates} is not valid now: {} .. {} (now {now})",
                validity.not_before, validity.not_after
            ));
        }
        if previous.as_ref().is_some_and(|(der, _)| der == leaf_der) {
            return Err(format!("update {updates} repeats the previous certificate"));
        }
        let bundle = next
            .bundle_set()
            .get(svid.spiffe_id().trust_domain())
            .ok_or_else(|| format!("update {updates} came without its trust domain's bundle"))?;
        let issued_by_bundle = bundle.authorities().iter().any(|ca| {
            X509Certificate::from_der(ca.as_bytes())
                .map(|(_, ca)| ca.subject() == leaf.issuer())
                .unwrap_or(false)
        });
        if !issued_by_bundle {
            return Err(format!(
                "update {updates}: the leaf's issuer {} is no CA of the bundle",
                leaf.issuer()
            ));
        }
        let previous_left = previous.as_ref().map_or("-".to_string(), |(_, not_after)| {
            (not_after - now).to_string()
        });
        println!(
            "update {} {} {expires_in} {previous_left}",
            started.elapsed().as_secs(),
            leaf.raw_serial_as_string().replace(':', "")
        );
        previous = Some((leaf_der.to_vec(), validity.not_after.timestamp()));
        if seconds == 0 {
            return Ok(updates);
        }
    }
}
