//! The relay against a scripted upstream: warden's own answers keep their
//! place among relayed replies.

use super::*;
use crate::resp::{parse_command, Command};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A fake server: answers each command with `+<NAME>` (or `*` arrays for
/// SUBSCRIBE in RESP2), and records what it received.
async fn fake_upstream(
    mut s: DuplexStream,
    seen: tokio::sync::mpsc::UnboundedSender<Vec<Vec<u8>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut c = Command::default();
        while parse_command(&buf, &mut c).unwrap() {
            let args: Vec<Vec<u8>> = c.args.iter().map(|r| buf[r.clone()].to_vec()).collect();
            buf.drain(..c.len);
            let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
            let reply = match name.as_str() {
                "SUBSCRIBE" => format!(
                    "*3\r\n$9\r\nsubscribe\r\n${}\r\n{}\r\n:1\r\n",
                    args[1].len(),
                    String::from_utf8_lossy(&args[1])
                ),
                "RESET" => "+RESET\r\n".into(),
                // Blocks for ever (until the connection closes).
                "BLPOP" => {
                    let _ = seen.send(args);
                    continue;
                }
                "AUTH" => "+OK\r\n".into(),
                _ => format!("+{name}\r\n"),
            };
            let _ = seen.send(args);
            s.write_all(reply.as_bytes()).await.unwrap();
        }
    }
}

struct Harness {
    client: DuplexStream,
    seen: tokio::sync::mpsc::UnboundedReceiver<Vec<Vec<u8>>>,
}

fn start(policy: CommandPolicy) -> Harness {
    let (client, warden_client) = duplex(1 << 20);
    let (warden_up, upstream) = duplex(1 << 20);
    let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(fake_upstream(upstream, tx));
    tokio::spawn(async move {
        let ctx = Context {
            route: "cache",
            workload: "web",
            policy: &policy,
            user: "app",
            password: b"s3cret",
        };
        relay(warden_client, warden_up, &ctx).await
    });
    Harness { client, seen }
}

async fn read_exact_text(c: &mut DuplexStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(std::time::Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[tokio::test]
async fn refusals_and_auth_keep_their_place_in_a_pipeline() {
    let mut h = start(CommandPolicy::new(Some(&["CONFIG".into()]), None));
    h.client
        .write_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\nAUTH whatever\r\n*1\r\n$4\r\nECHO\r\n")
        .await
        .unwrap();
    read_exact_text(
        &mut h.client,
        "+PING\r\n-NOPERM warden: route \"cache\" does not allow command \"CONFIG\" for workload \"web\"\r\n+OK\r\n+ECHO\r\n",
    )
    .await;
    // Neither the refused command nor the client's AUTH reached the server.
    assert_eq!(h.seen.recv().await.unwrap(), vec![b"PING".to_vec()]);
    assert_eq!(h.seen.recv().await.unwrap(), vec![b"ECHO".to_vec()]);
}

#[tokio::test]
async fn hello_auth_carries_wardens_login_and_a_refusal_in_multi_aborts_exec() {
    let mut h = start(CommandPolicy::new(
        None,
        Some(&["GET".into(), "MULTI".into(), "EXEC".into()]),
    ));
    h.client
        .write_all(b"HELLO 3 AUTH someone guess SETNAME n\r\nMULTI\r\nGET k\r\nDEL k\r\nEXEC\r\n")
        .await
        .unwrap();
    read_exact_text(&mut h.client, "+HELLO\r\n+MULTI\r\n+GET\r\n").await;
    let mut rest = vec![0u8; 200];
    let n = h.client.read(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest[..n]).to_string();
    assert!(
        rest.starts_with("-NOPERM warden: route \"cache\" does not allow command \"DEL\""),
        "{rest}"
    );
    if !rest.contains("EXECABORT") {
        read_exact_text(
            &mut h.client,
            "-EXECABORT Transaction discarded because of previous errors.\r\n",
        )
        .await;
    }
    let hello = h.seen.recv().await.unwrap();
    assert_eq!(
        hello,
        [
            &b"HELLO"[..],
            b"3",
            b"SETNAME",
            b"n",
            b"AUTH",
            b"app",
            b"s3cret"
        ]
        .iter()
        .map(|a| a.to_vec())
        .collect::<Vec<_>>()
    );
    h.seen.recv().await.unwrap(); // MULTI
    h.seen.recv().await.unwrap(); // GET
    assert_eq!(h.seen.recv().await.unwrap(), vec![b"DISCARD".to_vec()]);
}

#[tokio::test]
async fn reset_logs_in_again_without_showing_it_even_after_subscribe() {
    let mut h = start(CommandPolicy::default());
    h.client.write_all(b"SUBSCRIBE ch\r\n").await.unwrap();
    read_exact_text(&mut h.client, "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n").await;
    h.client.write_all(b"RESET\r\nPING\r\n").await.unwrap();
    read_exact_text(&mut h.client, "+RESET\r\n+PING\r\n").await;
    h.seen.recv().await.unwrap();
    h.seen.recv().await.unwrap();
    assert_eq!(
        h.seen.recv().await.unwrap(),
        vec![b"AUTH".to_vec(), b"app".to_vec(), b"s3cret".to_vec()]
    );
}

#[tokio::test]
async fn malformed_input_gets_a_protocol_error_after_earlier_replies() {
    let mut h = start(CommandPolicy::default());
    h.client.write_all(b"PING\r\n*1\r\n:x\r\n").await.unwrap();
    read_exact_text(
        &mut h.client,
        "+PING\r\n-ERR Protocol error: expected '$', got ':'\r\n",
    )
    .await;
    let mut rest = Vec::new();
    h.client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[test]
fn command_policy_matches_names_and_subcommands() {
    let p = CommandPolicy::new(Some(&["config".into(), "CLIENT|KILL".into()]), None);
    assert!(!p.permits("CONFIG", Some(b"GET")));
    assert!(!p.permits("CLIENT", Some(b"kill")));
    assert!(p.permits("CLIENT", Some(b"LIST")));
    assert!(p.permits("GET", None));
    let a = CommandPolicy::new(None, Some(&["GET".into()]));
    assert!(a.permits("GET", None) && !a.permits("SET", None));
}

/// Runs `script` as the client against a relay to the fake upstream; the
/// relay's outcome once the script has dropped the client.
async fn outcome_of(
    script: impl FnOnce(DuplexStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
) -> Outcome {
    let (client, warden_client) = duplex(1 << 16);
    let (mut warden_up, upstream) = duplex(1 << 16);
    let (tx, _seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(fake_upstream(upstream, tx));
    let policy = CommandPolicy::default();
    let ctx = Context {
        route: "cache",
        workload: "web",
        policy: &policy,
        user: "",
        password: b"s3cret",
    };
    let (o, ()) = tokio::join!(relay(warden_client, &mut warden_up, &ctx), script(client));
    o
}

#[tokio::test]
async fn the_outcome_says_whether_the_client_left_at_a_command_boundary() {
    // Every command answered, then closed: at a boundary, in step.
    let o = outcome_of(|mut c| {
        Box::pin(async move {
            c.write_all(b"PING\r\nSET k v\r\n").await.unwrap();
            read_exact_text(&mut c, "+PING\r\n+SET\r\n").await;
        })
    })
    .await;
    assert!(o.at_boundary && !o.unsync, "{o:?}");
    // Subscribed in RESP2: at a boundary, replies no longer in step.
    let o = outcome_of(|mut c| {
        Box::pin(async move {
            c.write_all(b"SUBSCRIBE news\r\n").await.unwrap();
            read_exact_text(&mut c, "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n").await;
        })
    })
    .await;
    assert!(o.at_boundary && o.unsync, "{o:?}");
    // Closed inside a blocking command: the relay half-closes toward the
    // server (which then closes) instead of waiting; not at a boundary.
    let o = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        outcome_of(|mut c| {
            Box::pin(async move {
                c.write_all(b"PING\r\nBLPOP q 0\r\n").await.unwrap();
                read_exact_text(&mut c, "+PING\r\n").await;
            })
        }),
    )
    .await
    .unwrap();
    assert!(!o.at_boundary && o.how == "client closed", "{o:?}");
    // A protocol error ends the session: not at a boundary.
    let o = outcome_of(|mut c| {
        Box::pin(async move {
            c.write_all(b"*1\r\n:x\r\n").await.unwrap();
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        })
    })
    .await;
    assert!(!o.at_boundary, "{o:?}");
}

/// The outcome of a session that sends `commands` (inline, one per
/// line) and reads `replies` before it closes.
async fn state_free_after(commands: &'static str, replies: &'static str) -> bool {
    let o = outcome_of(move |mut c| {
        Box::pin(async move {
            c.write_all(commands.as_bytes()).await.unwrap();
            read_exact_text(&mut c, replies).await;
        })
    })
    .await;
    assert!(o.at_boundary, "{o:?}");
    o.state_free
}

#[tokio::test]
async fn the_outcome_says_whether_the_session_left_state_on_the_connection() {
    // Data commands, a closed MULTI … EXEC and the client's own AUTH
    // (answered by warden, never forwarded) leave none.
    assert!(
        state_free_after(
            "PING\r\nSET k v\r\nGET k\r\nMULTI\r\nINCR n\r\nEXEC\r\nAUTH x\r\nhget h f\r\n",
            "+PING\r\n+SET\r\n+GET\r\n+MULTI\r\n+INCR\r\n+EXEC\r\n+OK\r\n+HGET\r\n",
        )
        .await
    );
    // Anything else does, and so does a MULTI left open.
    for (commands, replies) in [
        ("GET k\r\nSELECT 1\r\n", "+GET\r\n+SELECT\r\n"),
        ("CLIENT SETNAME x\r\n", "+CLIENT\r\n"),
        ("HELLO 2\r\n", "+HELLO\r\n"),
        ("WATCH k\r\n", "+WATCH\r\n"),
        ("EVAL x 0\r\n", "+EVAL\r\n"),
        ("READONLY\r\n", "+READONLY\r\n"),
        ("MULTI\r\nSET a b\r\n", "+MULTI\r\n+SET\r\n"),
    ] {
        assert!(!state_free_after(commands, replies).await, "{commands:?}");
    }
    // RESET (with warden's login after it) puts the connection back as
    // the login left it.
    assert!(
        state_free_after(
            "SELECT 1\r\nRESET\r\nGET k\r\n",
            "+SELECT\r\n+RESET\r\n+GET\r\n"
        )
        .await
    );
}

#[test]
fn only_known_data_commands_leave_no_state() {
    for name in ["GET", "SET", "HSET", "ZADD", "XADD", "EXEC", "BLPOP"] {
        assert!(leaves_no_state(name), "{name}");
    }
    for name in [
        "SELECT",
        "CLIENT",
        "HELLO",
        "WATCH",
        "UNWATCH",
        "RESET",
        "SUBSCRIBE",
        "MONITOR",
        "EVAL",
        "FCALL",
        "READONLY",
        "ASKING",
        "SWAPDB",
        "get",
    ] {
        assert!(!leaves_no_state(name), "{name}");
    }
}

/// A relay to the fake upstream whose hand-over hook answers from
/// `answers` in turn (then `Later`) and counts its offers; the task gives
/// back warden's client side with the outcome.
fn start_offering(
    answers: Vec<Handed>,
) -> (
    DuplexStream,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<(Outcome, DuplexStream)>,
) {
    use std::sync::atomic::Ordering;
    let (client, mut warden_client) = duplex(1 << 20);
    let (warden_up, upstream) = duplex(1 << 20);
    let (tx, _seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = _seen;
        fake_upstream(upstream, tx).await
    });
    let offers = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = offers.clone();
    let task = tokio::spawn(async move {
        let policy = CommandPolicy::default();
        let ctx = Context {
            route: "cache",
            workload: "web",
            policy: &policy,
            user: "",
            password: b"s3cret",
        };
        let mut hook = |_: &&mut DuplexStream, _: &DuplexStream, held: usize| {
            // The reply held back for the hand-over is never empty.
            assert!(held > 0);
            let i = counted.fetch_add(1, Ordering::SeqCst) as usize;
            answers.get(i).copied().unwrap_or(Handed::Later)
        };
        let o = relay_with(&mut warden_client, warden_up, &ctx, Some(&mut hook)).await;
        (o, warden_client)
    });
    (client, offers, task)
}

/// One command, its reply awaited: a round trip.
async fn round_trip(c: &mut DuplexStream, cmd: &str) {
    c.write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
    let name = cmd.split(' ').next().unwrap().to_ascii_uppercase();
    read_exact_text(c, &format!("+{name}\r\n")).await;
}

fn offers_now(o: &std::sync::atomic::AtomicU64) -> u64 {
    o.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn handover_is_offered_at_quiet_moments_after_enough_commands() {
    let (mut c, offers, task) = start_offering(vec![Handed::Later, Handed::Spliced]);
    for _ in 1..HANDOVER_AFTER {
        round_trip(&mut c, "GET k").await;
    }
    assert_eq!(offers_now(&offers), 0, "too early");
    // Not quiet: a second command is in flight when the first reply comes
    // (both written at once, both answered in one read or two).
    c.write_all(b"GET k\r\nGET k\r\n").await.unwrap();
    read_exact_text(&mut c, "+GET\r\n+GET\r\n").await;
    let after_pipeline = offers_now(&offers);
    // At most the second reply's read was quiet (if they came apart).
    assert!(after_pipeline <= 1, "{after_pipeline}");
    // Not quiet: a MULTI is open.
    round_trip(&mut c, "MULTI").await;
    assert_eq!(offers_now(&offers), after_pipeline, "offered inside MULTI");
    round_trip(&mut c, "EXEC").await;
    // Quiet moments now: the hook says Later, then Spliced, and the held
    // reply reaches the client either way.
    while offers_now(&offers) < 2 {
        round_trip(&mut c, "GET k").await;
    }
    // Spliced: what the client sends next is left unread on warden's
    // socket (the kernel relay's TCP path forwards it).
    c.write_all(b"GET next\r\n").await.unwrap();
    let (o, mut warden_client) = tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(o.spliced && !o.at_boundary && o.how == SPLICED, "{o:?}");
    assert_eq!(offers_now(&offers), 2);
    let mut next = [0u8; 10];
    warden_client.read_exact(&mut next).await.unwrap();
    assert_eq!(&next, b"GET next\r\n");
}

#[tokio::test]
async fn sessions_that_leave_resp2_request_reply_are_never_offered() {
    for first in ["HELLO 3", "SUBSCRIBE news", "CLIENT TRACKING on", "MONITOR"] {
        let (mut c, offers, task) = start_offering(vec![Handed::Spliced]);
        // The fake upstream answers `+NAME` (arrays for SUBSCRIBE).
        c.write_all(format!("{first}\r\n").as_bytes())
            .await
            .unwrap();
        if first.starts_with("SUBSCRIBE") {
            read_exact_text(&mut c, "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n").await;
            // RESET puts replies back in step, but the session stays out.
            c.write_all(b"RESET\r\n").await.unwrap();
            read_exact_text(&mut c, "+RESET\r\n").await;
        } else {
            let name = first.split(' ').next().unwrap();
            read_exact_text(&mut c, &format!("+{name}\r\n")).await;
        }
        if first == "MONITOR" {
            c.write_all(b"RESET\r\n").await.unwrap();
            read_exact_text(&mut c, "+RESET\r\n").await;
        }
        for _ in 0..HANDOVER_AFTER + 4 {
            round_trip(&mut c, "GET k").await;
        }
        assert_eq!(offers_now(&offers), 0, "{first}");
        drop(c);
        let (o, _) = task.await.unwrap();
        assert!(!o.spliced, "{first}: {o:?}");
    }
}
