//! Soak: `kesh server` on SoftHSM (through the fault shim) under mixed load from several
//! clients, some sending bad input, with an HSM outage injected part-way. At the end: no
//! errors but the expected ones, every DEK generated during the run still decrypts, memory and
//! file descriptors flat.
//!
//! CI runs it for `KESH_SOAK_SECS` (default 8 s); `softhsm-tests/soak` runs the long version.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::faults::{faulty_server, wait_for_recovery};
use crate::harness;
use crate::harness::shim::now_ms;

const CLIENTS: usize = 6;

/// One generated data key to check at the end.
struct Sealed {
    key: String,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs: u64 = std::env::var("KESH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let srv = faulty_server(4, "2s", "").spawn();
    // One client, shared by every load task.
    let shared = Arc::new(srv.client());
    let pid = srv.pid();
    let started = Instant::now();
    let run_for = Duration::from_secs(secs);
    // The outage: from 40% of the run, for 1 s (or a tenth of a long run).
    let fault_start = now_ms() + u128::from(secs) * 400;
    let fault_len = u128::from((secs * 100).max(1000));
    let fault_end = fault_start + fault_len;
    let in_fault = move || {
        let t = now_ms();
        // Requests sent just before the window may fail in it; recovery takes up to ~2 s after.
        t + 200 >= fault_start && t <= fault_end + 3000
    };
    let sealed = Arc::new(Mutex::new(Vec::<Sealed>::new()));
    // The last outage answer, in ms after the fault window closed: how long recovery took.
    let last_outage = Arc::new(Mutex::new(None::<i128>));
    let tally = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let count = |tally: &Mutex<BTreeMap<String, u64>>, what: &str| {
        *tally.lock().unwrap().entry(what.to_owned()).or_default() += 1;
    };

    let base = harness::name("soak");
    shared.create_key(base.as_str()).await.unwrap();
    let mut baseline = None;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (shared, sealed, tally, base, last_outage) = (
            shared.clone(),
            sealed.clone(),
            tally.clone(),
            base.clone(),
            last_outage.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = &*shared;
            let mut i = 0u64;
            while started.elapsed() < run_for {
                i += 1;
                let own = format!("{base}-c{client}-{}", i % 5);
                let outcome: Result<&str, kesh::client::ClientError> = match i % 10 {
                    0 => c.create_key(&own).await.map(|_| "create"),
                    1 => c.delete_key(&own).await.map(|_| "delete"),
                    2 => c.list_keys(base.as_str()).await.map(|_| "list"),
                    // Bad input: a forged ciphertext and an invalid name.
                    3 => match c.decrypt(base.as_str(), &[7u8; 63], b"").await {
                        Err(e) if e.api().is_some_and(|a| a.status == 400) => {
                            Ok("bad ciphertext refused")
                        }
                        other => other.map(|_| "forged ciphertext accepted?!"),
                    },
                    4 => match c.generate_key("not.a.valid.name", b"").await {
                        Err(e) if e.api().is_some_and(|a| a.status == 400) => {
                            Ok("bad name refused")
                        }
                        other => other.map(|_| "invalid name accepted?!"),
                    },
                    5 | 6 => {
                        let ctx = format!("{{\"bucket\":\"bucket/object-{client}-{i}\"}}");
                        match c.generate_key(base.as_str(), ctx.as_bytes()).await {
                            Ok(dk) => {
                                sealed.lock().unwrap().push(Sealed {
                                    key: format!("{}|{ctx}", base.as_str()),
                                    ciphertext: dk.ciphertext.0.clone(),
                                    plaintext: dk.plaintext.0.to_vec(),
                                });
                                Ok("generate")
                            }
                            Err(e) => Err(e),
                        }
                    }
                    _ => {
                        let pick = sealed
                            .lock()
                            .unwrap()
                            .iter()
                            .rev()
                            .nth((i % 7) as usize)
                            .map(|s| (s.key.clone(), s.ciphertext.clone(), s.plaintext.clone()));
                        match pick {
                            Some((key, ct, pt)) => {
                                let (name, ctx) = key.split_once('|').unwrap();
                                match c.decrypt(name, &ct, ctx.as_bytes()).await {
                                    Ok(got) if got.0[..] == pt[..] => Ok("decrypt"),
                                    Ok(_) => Ok("WRONG PLAINTEXT"),
                                    Err(e) => Err(e),
                                }
                            }
                            None => Ok("decrypt skipped"),
                        }
                    }
                };
                match outcome {
                    Ok(what) => count(&tally, what),
                    Err(e) => {
                        let api = e.api().map(|a| (a.status, a.message.to_string()));
                        let expected = match &api {
                            // Creating what exists, deleting what does not: races between a
                            // client's own create and delete slots.
                            Some((400, m)) if m == "key already exists" => true,
                            Some((404, m)) if m == "key does not exist" => true,
                            Some((504, m)) if m == "key store is not reachable" => {
                                let after = now_ms() as i128 - fault_end as i128;
                                let mut last = last_outage.lock().unwrap();
                                *last = Some(last.map_or(after, |l| l.max(after)));
                                in_fault()
                            }
                            _ => false,
                        };
                        let label = match api {
                            Some((s, m)) => format!("{s} {m}"),
                            None => format!("transport: {e}"),
                        };
                        count(
                            &tally,
                            &format!(
                                "{}{label}",
                                if expected { "expected " } else { "UNEXPECTED " }
                            ),
                        );
                    }
                }
            }
        }));
        // The baseline after the first second of load: allocators and pools are warm.
        if client == CLIENTS - 1 {
            tokio::time::sleep(Duration::from_secs(1).min(run_for / 4)).await;
            baseline = Some((proc_status(pid, "VmRSS:"), open_fds(pid)));
        }
    }
    // The outage, injected when its time comes.
    let hold = u64::try_from(fault_start.saturating_sub(now_ms())).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(hold)).await;
    srv.inject(&format!("fail CKR_DEVICE_ERROR * until={fault_end}\n"));
    for t in tasks {
        t.await.unwrap();
    }
    srv.inject("");
    wait_for_recovery(&shared, base.as_str()).await;

    // Every DEK generated during the run, outage or not, still decrypts.
    let sealed = std::mem::take(&mut *sealed.lock().unwrap());
    for s in &sealed {
        let (name, ctx) = s.key.split_once('|').unwrap();
        let got = shared
            .decrypt(name, &s.ciphertext, ctx.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            &got.0[..],
            &s.plaintext[..],
            "a DEK from the run no longer decrypts"
        );
    }
    let (rss0, fds0) = baseline.unwrap();
    let (rss1, fds1) = (proc_status(pid, "VmRSS:"), open_fds(pid));
    let tally = tally.lock().unwrap().clone();
    let requests: u64 = tally.values().sum();
    crate::harness::report(&format!(
        "soak: {secs} s, {requests} requests, {} DEKs checked, outcomes {tally:?}, last outage answer {:?} ms after the fault, RSS {rss0} → {rss1} kB, fds {fds0} → {fds1}",
        sealed.len(),
        *last_outage.lock().unwrap(),
    ));
    assert!(
        tally
            .keys()
            .all(|k| !k.starts_with("UNEXPECTED") && !k.contains("?!") && k != "WRONG PLAINTEXT"),
        "{tally:?}\nthe server's log:\n{}",
        srv.stderr()
    );
    assert!(
        tally.get("generate").copied().unwrap_or(0) > 0
            && tally.get("decrypt").copied().unwrap_or(0) > 0,
        "{tally:?}"
    );
    // Flat, with room for allocator noise: not unbounded growth.
    assert!(
        rss1 <= rss0 + rss0 / 2 + 8 * 1024,
        "RSS grew from {rss0} to {rss1} kB"
    );
    assert!(
        fds1 <= fds0 + 16,
        "file descriptors grew from {fds0} to {fds1}"
    );
}
